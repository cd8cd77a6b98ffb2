"""Library log records (the queue library's, pika's) into sioworkersd's Twisted log, redacted.

sioworkersd logs through ``twisted.logger``; the queue library and pika log through the standard
``logging`` module, which nothing in ``twistd`` configures. Their records are passed on here,
with every broker password removed, and pika's narration of each connection attempt is held back:
the return path itself says in one line what each state change means.
"""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

from consumer.redact import Redactor

_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


class TwistedHandler(logging.Handler):
    """Emits standard ``logging`` records as Twisted log events, passed through a redactor."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._redact(self.format(record))
            level = _LEVELS.get(record.levelno, LogLevel.error)
            Logger(namespace=record.name).emit(level, "{text}", text=text)
        except Exception:  # a log line must never break a return
            self.handleError(record)


def bridge(redact: Redactor) -> None:
    """Send the queue library's records (info and up) and pika's (critical only) to Twisted."""
    handler = TwistedHandler(redact)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name, level in (("consumer", logging.INFO), ("pika", logging.CRITICAL)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
