"""Which admin site the operator pages live on, and the URLs of its pages.

Installed in OIOIOI, the pages register on OIOIOI's own site (``oioioi.base.admin.site``, mounted
at ``admin/`` under the instance namespace ``oioioiadmin``) and add entries to its system-admin
menu; Django's default site is not mounted there. Standalone they register on Django's default
site (``admin``). Every URL of the pages is reversed in the chosen site's namespace, through
:func:`admin_url`, never under a hard-coded ``admin:``.

What differs between the two sites, and why:

- *Queued jobs*: OIOIOI has its own page (``SystemJobsQueueAdmin``, with rejudge and cancel), so
  there the pages link to it rather than register a second one; standalone they register theirs.
- *Who may enter*: OIOIOI's site lets in every active user (``has_permission``), Django's only
  staff; on both, each page then checks its own permission (a ``view`` permission of the model,
  or :data:`~oioioi.workers.permissions.VIEW_PERMISSION`), so a user without it gets a 403.
- *Status panel*: standalone it is on the admin index as well; OIOIOI's index is not ours to
  replace, so there it is the *Return path status* page of the system-admin menu (on both sites,
  also shown above the dead letters).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from types import ModuleType
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.db.models import Model
from django.http import HttpRequest
from django.urls import reverse

from oioioi.workers.permissions import VIEW_PERMISSION

#: Upstream OIOIOI's base app, whose ``admin`` module holds its site and system-admin menu.
OIOIOI_BASE_APP = "oioioi.base"


def _oioioi_admin() -> ModuleType | None:
    """OIOIOI's ``oioioi.base.admin`` when this runs inside OIOIOI, else None."""
    if not apps.is_installed(OIOIOI_BASE_APP):
        return None
    return import_module(f"{OIOIOI_BASE_APP}.admin")


_oioioi = _oioioi_admin()

#: True when installed inside OIOIOI (its base app is installed).
IN_OIOIOI = _oioioi is not None

#: The site every operator page registers on.
site: admin.AdminSite = _oioioi.site if _oioioi is not None else admin.site


def admin_url(name: str, *args: Any, **kwargs: Any) -> str:
    """The URL of the admin page ``name`` (``index``, ``workers_pendingrun_changelist``...)."""
    return reverse(f"{site.name}:{name}", args=args or None, kwargs=kwargs or None)


def register(model: type[Model], admin_class: type[admin.ModelAdmin[Any]]) -> None:
    """Register ``admin_class`` for ``model`` on :data:`site`, unless the site has one already
    (OIOIOI's own page wins: a later upstream registering the model must not crash on ours)."""
    if not site.is_registered(model):
        site.register(model, admin_class)


#: The return path's entries of OIOIOI's system-admin menu, after its *Evaluation queue* (60)
#: and before *Manage workers* (100): ``(name, text, URL name, permission, order)``.
SYSTEM_MENU = [
    ("results_status", "Return path status", "workers_deadletterqueue_status", VIEW_PERMISSION, 61),
    (
        "results_deadletters",
        "Dead letters",
        "workers_deadletter_changelist",
        VIEW_PERMISSION,
        62,
    ),
    (
        "results_inbox",
        "Received results",
        "workers_receivedresult_changelist",
        "workers.view_receivedresult",
        63,
    ),
    (
        "results_pending",
        "Pending runs",
        "workers_pendingrun_changelist",
        "workers.view_pendingrun",
        64,
    ),
    (
        "results_saved_environs",
        "Saved environs",
        "evalmgr_savedenviron_changelist",
        "evalmgr.view_savedenviron",
        65,
    ),
]


def _menu_entry(url_name: str, permission: str) -> tuple[Callable[[HttpRequest], str], Any]:
    def url(request: HttpRequest) -> str:
        return admin_url(url_name)

    def condition(request: HttpRequest) -> bool:
        return request.user.has_perm(permission)

    return url, condition


def add_system_menu_entries() -> None:
    """The entries of :data:`SYSTEM_MENU` in OIOIOI's system-admin menu; nothing standalone.

    OIOIOI shows that menu to superusers only; each entry also asks for its page's permission.
    """
    if _oioioi is None:
        return
    for name, text, url_name, permission, order in SYSTEM_MENU:
        url, condition = _menu_entry(url_name, permission)
        _oioioi.system_admin_menu_registry.register(
            name, text, url, condition=condition, order=order
        )
