"""Keeping credentials out of logs, error texts and metrics.

Broker and database URLs carry their passwords (``amqp://user:secret@host/vhost``). Wherever a URL
may end up in text a person or a log collector reads, it goes through :func:`redact_url`; the log
formatters run every finished line through :func:`redact_text`, which also catches URLs inside
third-party exception messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

#: What a removed secret is replaced with.
MASK = "***"

# scheme://user:password@ : the password is everything up to the last '@' before the host.
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s/@]*@")

#: Secrets shorter than this are not replaced as plain words (it would mangle ordinary text).
_MIN_SECRET = 4


def redact_url(url: str) -> str:
    """``url`` with its password and query (if any) replaced by :data:`MASK`; never raises.

    The query goes too: an ``amqps://`` URL's ``ssl_options`` may hold a key's passphrase.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            netloc = f"{parts.username or ''}:{MASK}@{host}"
        return urlunsplit(parts._replace(netloc=netloc, query=MASK if parts.query else ""))
    except ValueError:
        return _URL_CREDENTIALS.sub(rf"\g<head>{MASK}@", url.split("?", 1)[0])


def password_of(url: str) -> str | None:
    """The (decoded) password in ``url``, or None."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


class Redactor:
    """Removes URL passwords from any text, and the given secrets wherever they appear."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        words: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            # A URL contributes its password, in both the encoded and the decoded spelling.
            password = password_of(secret) if "://" in secret else secret
            for word in (password, _encoded_password(secret)):
                if word and len(word) >= _MIN_SECRET:
                    words.add(word)
        # Longest first, so that a secret containing another is removed whole.
        self._words = sorted(words, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        return redact_text(text, self._words)


def _encoded_password(url: str) -> str | None:
    if "://" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords and each of ``secrets`` replaced by :data:`MASK`."""
    if "://" in text:
        text = _URL_CREDENTIALS.sub(rf"\g<head>{MASK}@", text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text
