"""Django settings for the processes the benchmark starts: the project's, with a log format the
benchmark can read (the wall-clock time of each record to the microsecond)."""

from oioioi.settings import *  # noqa: F403
from oioioi.settings import LOGGING

LOGGING = {
    **LOGGING,
    "formatters": {"bench": {"format": "%(created).6f %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "bench"}},
}
