"""Django settings for the processes the benchmark starts: the project's own, logging through the
project's formatter (its per-message fields and redaction cost what they cost in production) with
one change: each line starts with the record's wall-clock time to the microsecond, which is what
the benchmark reads commit times from."""

from oioioi.settings import *  # noqa: F403
from oioioi.settings import LOGGING

LOGGING = {
    **LOGGING,
    "formatters": {
        name: {**formatter, "fmt": "%(created).6f %(levelname)s %(name)s: %(message)s"}
        for name, formatter in LOGGING["formatters"].items()
    },
}
