"""Log formatters: ``human`` (the default) and ``json``, chosen with ``LOG_FORMAT``.

Both carry the per-message fields the consumer passes in ``extra=`` (message id, job id, group id,
outcome), and both run every finished line, traceback included, through a redactor that removes
URL passwords and the configured secrets, so no credential reaches a log whatever a library put in
its exception text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from consumer.redact import Redactor

#: Fields of a log record that identify the message it is about.
MESSAGE_FIELDS = ("message_id", "job_id", "group_id", "outcome")


def _message_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name, None) for name in MESSAGE_FIELDS}


def _about_a_message(fields: dict[str, Any]) -> bool:
    return any(value is not None for value in fields.values())


class HumanFormatter(logging.Formatter):
    """``time LEVEL logger: message [message_id=... job_id=... group_id=... outcome=...]``."""

    def __init__(self, secrets: Iterable[str | None] = (), **kwargs: Any) -> None:
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s: %(message)s")
        super().__init__(**kwargs)
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _message_fields(record)
        if _about_a_message(fields):
            tail = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            head, sep, rest = text.partition("\n")
            text = f"{head} [{tail}]{sep}{rest}"
        return self._redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the message fields, exception."""

    def __init__(self, secrets: Iterable[str | None] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        fields = _message_fields(record)
        if _about_a_message(fields):
            # All four keys on every line about a message, null when unknown, so that a query
            # on a field never has to tell "absent" from "not known".
            out.update({k: None if v is None else self._redact(str(v)) for k, v in fields.items()})
        if record.exc_info:
            out["exception"] = self._redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = self._redact(self.formatStack(record.stack_info))
        out["process"] = record.process
        out["thread"] = record.threadName
        return json.dumps(out, ensure_ascii=False, default=str)


class PikaAtDebug(logging.Filter):
    """pika's records as DEBUG lines.

    pika logs a refused or lost connection as several errors, each with a traceback, on every
    attempt (hundreds of lines in a minute's outage). The return path says in one line what each
    change means (a node lost, reconnecting in N s, reconnected to which node); pika's account
    is for whoever runs at ``LOG_LEVEL=DEBUG``, and says so by its level.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return True


def pika_logger_config(level: str | int) -> dict[str, Any]:
    """How the ``pika`` logger is set up: nothing below DEBUG, and at DEBUG all of it, demoted."""
    debug = logging.getLevelName(level) == "DEBUG" or level == logging.DEBUG
    # Above CRITICAL when not debugging: pika's own levels mean nothing once it is demoted.
    return {"level": logging.DEBUG if debug else logging.CRITICAL + 1, "filters": ["pika_at_debug"]}


#: ``LOG_FORMAT`` values and their formatter classes.
FORMATTERS = {"human": HumanFormatter, "json": JsonFormatter}


def logging_config(log_format: str, level: str, secrets: Iterable[str | None]) -> dict[str, Any]:
    """The ``LOGGING`` setting: one console handler in the chosen format."""
    if log_format not in FORMATTERS:
        raise ValueError(f"LOG_FORMAT must be one of {sorted(FORMATTERS)}, not {log_format!r}")
    cls = FORMATTERS[log_format]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": f"{cls.__module__}.{cls.__qualname__}", "secrets": list(secrets)},
        },
        "filters": {"pika_at_debug": {"()": f"{PikaAtDebug.__module__}.PikaAtDebug"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "default"},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"pika": pika_logger_config(level)},
    }


#: The queue library's logger (``consumer.*``).
LIBRARY_LOGGER = "consumer"
#: The logger OIOIOI's own ``LOGGING`` configures for all of its code.
PROJECT_LOGGER = "oioioi"


def route_library_logs() -> None:
    """Let the queue library's lines appear where the project's own do.

    OIOIOI's ``LOGGING`` configures only the ``oioioi`` logger (console, at INFO): without this,
    the library's lines ("Consuming from ...", "Result ... committed.") would go nowhere. When the
    settings configure no ``consumer`` logger themselves, it gets the handlers and level of the
    ``oioioi`` logger. Standalone, the project's ``LOGGING`` configures the root logger and this
    does nothing. Safe to call more than once.
    """
    library = logging.getLogger(LIBRARY_LOGGER)
    if library.handlers or library.level != logging.NOTSET:
        return
    project = logging.getLogger(PROJECT_LOGGER)
    if not project.handlers:
        return
    for handler in project.handlers:
        library.addHandler(handler)
    library.setLevel(project.level)
    library.propagate = project.propagate


def quiet_pika(level: int) -> None:
    """Set the ``pika`` logger up as :func:`pika_logger_config` says, unless something has."""
    pika_logger = logging.getLogger("pika")
    if pika_logger.level != logging.NOTSET or pika_logger.filters:
        return
    config = pika_logger_config(level)
    pika_logger.setLevel(config["level"])
    pika_logger.addFilter(PikaAtDebug())
