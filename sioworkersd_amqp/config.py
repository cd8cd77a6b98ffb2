"""What sioworkersd's return path is configured with, and which return URLs it takes.

The broker, its credentials and the topology come from sioworkersd's own configuration only:
environment variables named as the Django settings (``AMQP_URL``, ``RESULTS_EXCHANGE``, ...,
read by :func:`consumer.config.from_environ`, as every client outside Django reads them), and a
file of ``KEY=VALUE`` lines (``--amqp-env-file``) whose values override the environment's. Never
from a job: a return URL only says *that* its result goes to the queue, not where or as whom.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consumer.config import ENVIRONMENT, Settings, from_environ

#: The schemes of a return URL that names the results queue: ``amqp:`` (``amqps:`` too, lest it
#: go to sioworkersd's HTTP return, which cannot take it; TLS is the broker URL's business).
QUEUE_SCHEMES = frozenset({"amqp", "amqps"})

#: What a return URL naming the queue may look like beyond its scheme without a warning.
_PLAIN_REMAINDERS = {"", "//", "///"}


class ConfigError(Exception):
    """Raised when the return path's configuration cannot be read; the message names no secret."""


def names_the_queue(url: object) -> bool:
    """Whether a group's ``return_url`` asks for the results queue (scheme ``amqp:``)."""
    if not isinstance(url, str):
        return False
    scheme, colon, _ = url.partition(":")
    return bool(colon) and scheme.strip().lower() in QUEUE_SCHEMES


def names_more_than_the_queue(url: str) -> bool:
    """Whether such a URL carries more than ``amqp:`` (a host, credentials, a path): all of it
    is ignored, since a job never chooses the broker or the user."""
    scheme, _, rest = url.partition(":")
    return scheme.strip().lower() != "amqp" or rest.strip() not in _PLAIN_REMAINDERS


@dataclass(frozen=True)
class ReturnConfig:
    """The return path's whole configuration, built once when sioworkersd starts."""

    #: The broker and topology, as the project's other clients have them.
    broker: Settings
    #: Broker connections publishing at once, each on a thread of its own.
    connections: int = 4
    #: Backoff between attempts to publish one result: first delay, and the bound.
    retry_initial: float = 0.5
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ConfigError("--amqp-connections must be at least 1")
        if not 0 < self.retry_initial <= self.retry_max:
            raise ConfigError("need 0 < --amqp-retry-initial <= --amqp-retry-max")


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, an optional ``export``, values optionally
    quoted), as systemd's ``EnvironmentFile`` or a shell would take them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            # The line itself is not repeated: it may hold a password.
            raise ConfigError(f"{path}, line {number}: not a KEY=VALUE line")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def readable_by_others(path: str | os.PathLike[str]) -> bool:
    """Whether a file holding a password can be read by users other than its owner and group."""
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def broker_settings(environ: Mapping[str, str], env_file: str | None = None) -> Settings:
    """The broker settings: the environment, overridden by ``env_file``'s variables."""
    merged = dict(environ)
    if env_file:
        merged.update(read_env_file(env_file))
    try:
        return from_environ(merged)
    except ValueError as e:
        raise ConfigError(str(e)) from None


#: The variables the return path reads (from the environment or the file), for the README.
VARIABLES = tuple(ENVIRONMENT)
