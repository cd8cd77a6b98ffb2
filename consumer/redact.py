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

from consumer.brokers import URL_SEPARATOR, split_urls

#: What a removed secret is replaced with.
MASK = "***"

# scheme://user:password@ : the password is everything up to the last '@' before the host.
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s/@]*@")

# user:password@ anywhere, scheme or not: what is left of a password in text that is not one
# well-formed URL (two URLs run together, a URL without its scheme).
_LOOSE_CREDENTIALS = re.compile(r"(?P<head>[^\s:/@]*:)[^\s/@]*@")

#: Secrets shorter than this are not replaced as plain words (it would mangle ordinary text).
_MIN_SECRET = 4


def redact_url(url: str) -> str:
    """``url`` with its password and query (if any) replaced by :data:`MASK`; never raises.

    The query goes too: an ``amqps://`` URL's ``ssl_options`` may hold a key's passphrase. A list
    of URLs (a cluster's nodes, see :mod:`consumer.brokers`) has each of them redacted.
    """
    if URL_SEPARATOR in url:
        return URL_SEPARATOR.join(redact_url(part) for part in split_urls(url))
    return _LOOSE_CREDENTIALS.sub(rf"\g<head>{MASK}@", _redact_one_url(url))


def _redact_one_url(url: str) -> str:
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
            # A URL contributes its password, in both the encoded and the decoded spelling; a
            # list of URLs, each URL's.
            if "://" in secret:
                urls = split_urls(secret) if URL_SEPARATOR in secret else [secret]
                found = [w for url in urls for w in (password_of(url), _encoded_password(url))]
            else:
                found = [secret]
            for word in found:
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
