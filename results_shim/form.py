"""The ``data`` field of sioworkersd's result POST, from either form encoding it may use.

:func:`form_data` returns the field's raw bytes or raises :class:`Reject` with the status the
shim answers (400, 415); the JSON inside is the decoder's business.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import multipart

#: Most form fields (multipart parts or ``key=value`` pairs) looked at in one body.
MAX_FORM_FIELDS = 64



class Reject(Exception):
    """Raised while handling a request that gets a non-200 answer; carries status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- the form --------------------------------------------------------------------------------


def form_data(content_type: str | None, body: bytes) -> bytes:
    """The raw value of the ``data`` field of a form body; raises :class:`Reject`."""
    mime, options = multipart.parse_options_header(content_type or "")
    if mime == "multipart/form-data":
        return _multipart_field(body, options.get("boundary"), "data")
    if mime == "application/x-www-form-urlencoded":
        return _urlencoded_field(body, b"data")
    raise Reject(
        415,
        f"unsupported Content-Type {mime or 'none'!r}: "
        "send multipart/form-data or application/x-www-form-urlencoded",
    )


def _multipart_field(body: bytes, boundary: str | None, name: str) -> bytes:
    if not boundary:
        raise Reject(400, "multipart/form-data without a boundary")
    values: list[bytearray] = []
    current: bytearray | None = None
    try:
        parser = multipart.PushMultipartParser(
            boundary, content_length=len(body), max_segment_count=MAX_FORM_FIELDS
        )
        # The empty chunk marks the end of input: an incomplete stream raises there.
        for chunk in (body, b""):
            for event in parser.parse(chunk):
                if isinstance(event, multipart.MultipartSegment):
                    current = bytearray() if event.name == name else None
                    if current is not None:
                        values.append(current)
                elif event is None:
                    current = None
                elif current is not None:
                    current += event
    except multipart.MultipartError as e:
        raise Reject(400, f"malformed multipart body: {e}") from None
    return _single(values, name)


def _urlencoded_field(body: bytes, name: bytes) -> bytes:
    # By hand rather than with urllib.parse.parse_qs, which decodes to text and would replace
    # bytes that are not UTF-8; the JSON decoder is the one to refuse those, with its reason.
    values: list[bytes] = []
    pairs = [pair for pair in body.split(b"&") if pair]
    if len(pairs) > MAX_FORM_FIELDS:
        raise Reject(400, f"more than {MAX_FORM_FIELDS} form fields")
    for pair in pairs:
        key, _, value = pair.partition(b"=")
        if urllib.parse.unquote_to_bytes(key.replace(b"+", b" ")) == name:
            values.append(urllib.parse.unquote_to_bytes(value.replace(b"+", b" ")))
    return _single(values, name.decode())


def _single(values: list[Any], name: str) -> bytes:
    if not values:
        raise Reject(400, f"no {name!r} field in the form")
    if len(values) > 1:
        raise Reject(400, f"{len(values)} {name!r} fields in the form, expected one")
    return bytes(values[0])


def identifiers(env: Mapping[str, Any]) -> dict[str, Any]:
    """What the request log shows of an environ: its identifiers, never its content."""
    return {key: env.get(key) for key in ("job_id", "group_id", "submission_id")}
