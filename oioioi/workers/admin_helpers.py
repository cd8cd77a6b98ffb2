"""Pieces the operator pages share: ages, badges, age filters and read-only JSON."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

#: Colours of the badges; the admin's own palette, readable in its light and dark themes.
_BADGE_COLOURS = {
    "danger": ("#ba2121", "#fff"),
    "warning": ("#b8860b", "#fff"),
    "info": ("#417690", "#fff"),
    "ok": ("#2e7d32", "#fff"),
    "muted": ("#666", "#fff"),
}


def duration(value: timedelta | float | int | None) -> str:
    """A short, readable age: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    if value is None:
        return "—"
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} h {minutes % 60} min" if minutes % 60 else f"{hours} h"
    return f"{hours // 24} d {hours % 24} h" if hours % 24 else f"{hours // 24} d"


def age(since: datetime | None, now: datetime | None = None) -> str:
    if since is None:
        return "—"
    return duration((now or timezone.now()) - since)


def badge(text: str, kind: str = "info", title: str = "") -> SafeString:
    background, colour = _BADGE_COLOURS[kind]
    return format_html(
        '<span class="oioioi-badge oioioi-badge-{}" title="{}" style="background:{};color:{};'
        'padding:1px 7px;border-radius:9px;font-weight:bold;white-space:nowrap">{}</span>',
        kind,
        title,
        background,
        colour,
        text,
    )


def pretty_json(text: str | bytes) -> str:
    """Indented JSON when ``text`` is JSON, else the text as it is (never raises)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return f"(not UTF-8: {len(text)} bytes) {text[:4096]!r}"
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text


def pre(text: str) -> SafeString:
    """Read-only, scrollable block of text for a change page."""
    return format_html(
        '<pre class="oioioi-pre" style="max-height:40em;overflow:auto;white-space:pre-wrap;'
        'word-break:break-all;margin:0">{}</pre>',
        text,
    )


#: ``(value, label, lower bound, upper bound)`` of the age filters; ages in seconds.
AGE_BUCKETS: list[tuple[str, str, int | None, int | None]] = [
    ("5m", "Less than 5 minutes", None, 5 * 60),
    ("1h", "Less than an hour", None, 3600),
    ("1d", "Less than a day", None, 86400),
    ("older", "More than a day", 86400, None),
]


class AgeFilter(admin.SimpleListFilter):
    """Filter by the age of a date field; subclasses name the field."""

    title = "age"
    parameter_name = "age"
    field_name = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(value, label) for value, label, _, _ in AGE_BUCKETS]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        now = timezone.now()
        for value, _, older_than, younger_than in AGE_BUCKETS:
            if self.value() != value:
                continue
            if younger_than is not None:
                queryset = queryset.filter(
                    **{f"{self.field_name}__gte": now - timedelta(seconds=younger_than)}
                )
            if older_than is not None:
                queryset = queryset.filter(
                    **{f"{self.field_name}__lt": now - timedelta(seconds=older_than)}
                )
            return queryset
        return None


class ReadOnlyAdminMixin:
    """No adding or editing from the admin: these rows are written by the return path only."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class KeptRowsMixin:
    """Rows nobody deletes from the admin, one at a time or in bulk. Bulk actions are off as well:
    OIOIOI's site gives every page its own *delete selected* action, which asks a superuser for
    no permission at all."""

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        return {}

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
