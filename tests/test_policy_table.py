"""The failure policy as a table: :func:`consumer.policy.decide`, row by row, against the outcomes
that :mod:`consumer.policy`'s docstring lists (a pure unit test: no broker, no database).

Each row names the docstring's entry it follows; the tests below also check that the docstring
and the function name the same outcomes and the same dead-letter reasons.
"""

from __future__ import annotations

import re

import pytest

from consumer import errors, policy
from consumer.config import Settings
from consumer.policy import Decision, Facts, Kind, Outcome, Stage

#: Limits small enough to reach in a row: dead-lettered after 2 retries, or past 3 deliveries.
LIMITS = Settings(max_retries=2, delivery_limit=3)

DECODE, COUNT, WRITE = Stage.DECODE, Stage.COUNT, Stage.WRITE

#: (docstring entry, what went wrong, the facts, the decision)
TABLE: list[tuple[str, Kind, Facts, Decision]] = [
    # Decoding and checking the body.
    ("written with its batch", Kind.NONE, Facts(DECODE), Decision(Outcome.WRITE_WITH_BATCH)),
    ("written alone", Kind.NONE, Facts(DECODE, redelivered=True), Decision(Outcome.WRITE_ALONE)),
    ("dead-lettered", Kind.PERMANENT, Facts(DECODE), Decision(Outcome.DEAD_LETTERED)),
    (
        "dead-lettered",
        Kind.UNEXPECTED,
        Facts(DECODE),
        Decision(Outcome.DEAD_LETTERED, "undecodable"),
    ),
    # Classic queues: a suspect's attempt counted before its write.
    (
        "broker dead-lettered",
        Kind.NONE,
        Facts(COUNT, redelivered=True, attempts=3),
        Decision(Outcome.WRITE_ALONE),
    ),
    (
        "broker dead-lettered",
        Kind.NONE,
        Facts(COUNT, redelivered=True, attempts=4),
        Decision(Outcome.DEAD_LETTERED, "delivery-limit"),
    ),
    (
        "duplicate",  # 0: already applied; the write then says so
        Kind.NONE,
        Facts(COUNT, redelivered=True, attempts=0),
        Decision(Outcome.WRITE_ALONE),
    ),
    (
        "broker dead-lettered",  # the count could not be made: as if its first attempt
        Kind.UNEXPECTED,
        Facts(COUNT, redelivered=True),
        Decision(Outcome.WRITE_ALONE),
    ),
    ("held", Kind.DATABASE_AWAY, Facts(COUNT, redelivered=True), Decision(Outcome.HELD)),
    (
        "left unacked",
        Kind.BROKER_GONE,
        Facts(COUNT, redelivered=True),
        Decision(Outcome.LEFT_UNACKED),
    ),
    (
        "left unacked",
        Kind.STOPPING,
        Facts(COUNT, redelivered=True),
        Decision(Outcome.LEFT_UNACKED),
    ),
    # The write answered.
    ("committed", Kind.NONE, Facts(WRITE), Decision(Outcome.COMMITTED)),
    ("committed", Kind.NONE, Facts(WRITE, batch=50), Decision(Outcome.COMMITTED)),
    ("duplicate", Kind.NONE, Facts(WRITE, duplicate=True), Decision(Outcome.DUPLICATE)),
    (
        "duplicate",
        Kind.NONE,
        Facts(WRITE, redelivered=True, duplicate=True),
        Decision(Outcome.DUPLICATE),
    ),
    # A batch that failed: each message again, alone (unless the database or broker is away).
    (
        "written with its batch",
        Kind.PERMANENT,
        Facts(WRITE, batch=5),
        Decision(Outcome.WRITE_ALONE),
    ),
    (
        "written with its batch",
        Kind.UNEXPECTED,
        Facts(WRITE, batch=5, retries=2),
        Decision(Outcome.WRITE_ALONE),
    ),
    ("held", Kind.DATABASE_AWAY, Facts(WRITE, batch=5), Decision(Outcome.HELD)),
    ("left unacked", Kind.BROKER_GONE, Facts(WRITE, batch=5), Decision(Outcome.LEFT_UNACKED)),
    ("left unacked", Kind.STOPPING, Facts(WRITE, batch=5), Decision(Outcome.LEFT_UNACKED)),
    # A message written alone that failed.
    ("dead-lettered", Kind.PERMANENT, Facts(WRITE), Decision(Outcome.DEAD_LETTERED)),
    (
        "dead-lettered",
        Kind.PERMANENT,
        Facts(WRITE, redelivered=True, retries=2),
        Decision(Outcome.DEAD_LETTERED),
    ),
    ("retried", Kind.UNEXPECTED, Facts(WRITE), Decision(Outcome.RETRIED)),
    ("retried", Kind.UNEXPECTED, Facts(WRITE, retries=1), Decision(Outcome.RETRIED)),
    (
        "retried",
        Kind.UNEXPECTED,
        Facts(WRITE, retries=2),
        Decision(Outcome.DEAD_LETTERED, "failed", with_traceback=True),
    ),
    # The database away: held, unless it answers its probe at once round after round.
    ("held", Kind.DATABASE_AWAY, Facts(WRITE), Decision(Outcome.HELD)),
    ("held", Kind.DATABASE_AWAY, Facts(WRITE, answered_rounds=2), Decision(Outcome.HELD)),
    ("held", Kind.DATABASE_AWAY, Facts(WRITE, retries=2), Decision(Outcome.HELD)),
    (
        "held",
        Kind.DATABASE_AWAY,
        Facts(WRITE, answered_rounds=3),
        Decision(Outcome.RETRIED),
    ),
    (
        "held",
        Kind.DATABASE_AWAY,
        Facts(WRITE, answered_rounds=3, retries=2),
        Decision(Outcome.DEAD_LETTERED, "failed", with_traceback=True),
    ),
    (
        "held",
        Kind.DATABASE_AWAY,
        Facts(WRITE, batch=5, answered_rounds=3),
        Decision(Outcome.WRITE_ALONE),
    ),
    # The broker gone, or SIGTERM while the database is away: nothing of the batch is acked.
    ("left unacked", Kind.BROKER_GONE, Facts(WRITE), Decision(Outcome.LEFT_UNACKED)),
    ("left unacked", Kind.BROKER_GONE, Facts(DECODE), Decision(Outcome.LEFT_UNACKED)),
    ("left unacked", Kind.STOPPING, Facts(WRITE), Decision(Outcome.LEFT_UNACKED)),
    (
        "left unacked",
        Kind.STOPPING,
        Facts(WRITE, answered_rounds=2, retries=2),
        Decision(Outcome.LEFT_UNACKED),
    ),
]


def docstring_entries() -> dict[str, str]:
    """The docstring's entries: each ````term```` alone on a line, with the indented text under it."""
    entries: dict[str, str] = {}
    term = None
    for line in (policy.__doc__ or "").splitlines():
        heading = re.fullmatch(r"``([^`]+)``", line)
        if heading:
            term = heading[1]
            entries[term] = ""
        elif term and line.startswith("    "):
            entries[term] += line.strip() + " "
        else:
            term = None
    return entries


@pytest.mark.parametrize(
    ("entry", "kind", "facts", "expected"),
    TABLE,
    ids=[f"{i}-{entry}-{kind.value}" for i, (entry, kind, _, _) in enumerate(TABLE)],
)
def test_each_row_of_the_table(entry: str, kind: Kind, facts: Facts, expected: Decision):
    assert entry in docstring_entries()
    assert policy.decide(kind, facts, LIMITS) == expected


def test_the_docstring_names_every_outcome_the_function_has_and_no_other():
    terms = set(docstring_entries())
    outcomes = {outcome.value for outcome in Outcome}
    # The broker's delivery limit is the one outcome the consumer does not decide.
    assert terms == outcomes | {"broker dead-lettered"}
    assert {decision.outcome for *_, decision in TABLE} == set(Outcome)
    assert {entry for entry, *_ in TABLE} == terms


def test_the_outcomes_the_docstring_was_missing_are_there():
    entries = docstring_entries()
    # SIGTERM while the database is away leaves the batch unacked...
    assert "SIGTERM" in entries["left unacked"] and "held" in entries["left unacked"]
    assert policy.decide(Kind.STOPPING, Facts(), LIMITS).outcome is Outcome.LEFT_UNACKED
    # ...and a copy confirmed before an ack that never came is there twice.
    assert "second copy in the dead-letter queue" in entries["dead-lettered"]


def permanent_errors() -> list[type[errors.PermanentError]]:
    found, pending = [], [errors.PermanentError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if cls is not errors.PermanentError]


def test_every_dead_letter_reason_is_named_in_the_docstring():
    named = set(re.findall(r"``([a-z-]+)``", docstring_entries()["dead-lettered"]))
    reasons = {cls.reason for cls in permanent_errors()}
    reasons |= {d.reason for *_, d in TABLE if d.outcome is Outcome.DEAD_LETTERED and d.reason}
    assert reasons <= named
    assert {"undecodable", "failed", "delivery-limit", "mismatch", "no-saved-environ"} <= reasons


class Transient(Exception):
    """Stands for a database error the store names as transient."""


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        *((cls("bad"), Kind.PERMANENT) for cls in permanent_errors()),
        (ValueError("a bug"), Kind.UNEXPECTED),
        (errors.WriteKeepsFailing("the database answers"), Kind.UNEXPECTED),
        (Exception("not ours"), Kind.UNEXPECTED),
        (Transient("busy"), Kind.DATABASE_AWAY),
        (errors.DatabaseUnavailable("past the retries"), Kind.DATABASE_AWAY),
        (errors.ConnectionClosed("gone"), Kind.BROKER_GONE),
        (errors.ConsumerCancelled("queue deleted"), Kind.BROKER_GONE),
        (errors.StaleDelivery("earlier channel"), Kind.BROKER_GONE),
        (errors.ShuttingDown("SIGTERM"), Kind.STOPPING),
    ],
    ids=repr,
)
def test_classify_names_each_error_its_kind(error: BaseException, kind: Kind):
    assert policy.classify(error, (Transient,)) is kind


def test_only_the_errors_the_store_names_are_transient():
    assert policy.classify(Transient("busy")) is Kind.UNEXPECTED


def test_the_django_sides_database_errors_are_transient_read_only_included():
    from django.db import InterfaceError, OperationalError

    from oioioi.workers.errors import TRANSIENT_ERRORS, ReadOnlyDatabase

    for error in (OperationalError(), InterfaceError(), ReadOnlyDatabase("failover")):
        assert policy.classify(error, TRANSIENT_ERRORS) is Kind.DATABASE_AWAY
