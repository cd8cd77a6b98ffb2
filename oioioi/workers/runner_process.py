"""The recipes run by a process of their own: the consumer writes, its runner runs, on two cores.

:class:`ProcessDispatcher` writes each resumed job's ``PendingRun`` row inside the resume's
transaction, claimed for the hand-off lease, exactly as :class:`~oioioi.workers.dispatch.
LocalDispatcher` does; after the caller's commit and ack it hands the batch's keys (not its
environs) to a runner process it started, which reads the environs back from the rows and runs
them as the local dispatcher would, batch by batch, each phase checkpointed. The consumer goes on
decoding and writing the next batch meanwhile.

What stays as it was, and why nothing is lost:

- The row is the hand-off. The runner holds no more than the consumer's claim on it: if the runner
  dies, its runs are abandoned runs like any other, taken over by the next sweep once their claim
  has expired (the consumer starts a new runner at once). A job that kills its runner again and
  again is charged an attempt each time it is taken over, up to the claims' limit.
- The consumer never runs far ahead: at most twice ``RESULTS_BATCH_SIZE`` runs wait for the runner
  (their keys only: the runner reads a batch's environs when it starts it), and past that the
  consumer waits for the runner before it takes the next batch, so that the hand-off's claims do
  not expire while their runs wait, and the drain rate is the rate at which recipes finish.
- The sweep's query for abandoned runs is made by the consumer (so that an idle consumer still
  learns whether its database answers); the runs it finds go to the runner, which claims each.
- SIGTERM/SIGINT reach the runner too (a terminal's Ctrl-C, a supervisor stopping the group): it
  ignores them and stops when the consumer does, after the batches in hand, or when its pipe
  closes (the consumer died).

The runner is started with ``spawn`` (a fresh interpreter that sets Django up again), never by
forking a process that holds database and broker connections. Its logs go where the consumer's go.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from oioioi.workers import runner_child
from oioioi.workers.claims import abandoned
from oioioi.workers.conf import setting
from oioioi.workers.dispatch import DurableDispatcher, Environ, LocalDispatcher

log = logging.getLogger(__name__)

#: Runs waiting for the runner, at the most, in batches of the consumer's (``RESULTS_BATCH_SIZE``):
#: enough that the consumer writes while the runner runs, even when large results make its
#: batches small; few enough to be run well within the hand-off lease.
WAITING_BATCHES = 2
#: How long the consumer waits on its runner before it looks whether the runner is still alive.
_POLL_SECONDS = 1.0
#: A runner that dies this soon after it started died starting; after this many such deaths in
#: a row the recipes run in the consumer's own process.
_EARLY_DEATH_SECONDS = 10.0
_EARLY_DEATHS = 3
#: How long a stopping consumer waits for its runner to finish the batches in hand.
_STOP_SECONDS = 60.0


class _RunnersFailing(Exception):
    """Runners keep dying as they start: the recipes run in the consumer's process."""


class ProcessDispatcher(DurableDispatcher):
    """Durable hand-off; runs the recipes in a runner process of this consumer's own."""

    description = "run by a runner process of their own (the second core), in batches, each phase checkpointed"
    _first_attempts = 1

    def __init__(self) -> None:
        super().__init__()
        self._runner: Any = None  # multiprocessing's SpawnProcess
        self._pipe: Connection | None = None
        #: How many runs each message handed over and not yet reported done holds, oldest first.
        self._outstanding: collections.deque[int] = collections.deque()
        self._max_waiting = WAITING_BATCHES * setting("RESULTS_BATCH_SIZE")
        self._lock = threading.Lock()
        #: Set when runners keep dying as they start (a broken environment): then the recipes
        #: run in this process, as the local dispatcher runs them.
        self._inline: LocalDispatcher | None = None
        self._started_at = 0.0
        self._early_deaths = 0
        self._close_registered = False

    def _for_runner(
        self, pks: Sequence[int], texts: Sequence[bytes], environs: Sequence[Environ]
    ) -> dict[int, tuple[bytes, dict[str, Any] | None]]:
        # Only the runs' keys: the runner reads each environ back from its row, so this process
        # lets the batch's bodies go as soon as it has written them.
        return {pk: (b"", None) for pk in pks}

    def run_pending(self, limit: int | None = None, *, sweep: bool = True) -> int:
        with self._lock:
            if self._inline is None:
                with contextlib.suppress(_RunnersFailing):
                    self._ensure_runner()  # at the consumer's start, before its first result
            handed = 0
            while self._ready:
                token, runs = self._ready[0]
                self._hand(("written", token, list(runs)))
                self._ready.pop(0)
                handed += len(runs)
            if sweep and (limit is None or handed < limit):
                pks = abandoned([], (limit - handed) if limit else 100)
                if pks:
                    self._hand(("abandoned", pks))
                    handed += len(pks)
            return handed

    def close(self) -> None:
        """Let the runner finish the batches in hand, then stop it."""
        with self._lock:
            runner, pipe = self._runner, self._pipe
            self._runner = self._pipe = None
            if runner is None or pipe is None:
                return
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
            runner.join(_STOP_SECONDS)
            if runner.is_alive():
                log.warning(
                    "The recipe runner did not stop within %.0f s; killing it.", _STOP_SECONDS
                )
                runner.kill()
                runner.join()
            pipe.close()
            log.info("The recipe runner stopped (pid %d).", runner.pid)

    # --- the runner process, seen from the consumer ----------------------------------------------

    def _hand(self, message: tuple[Any, ...]) -> None:
        """Send the runner a message, starting it first if need be; wait while it has too many."""
        while True:
            try:
                pipe = self._ensure_runner()
            except _RunnersFailing:
                assert self._inline is not None
                runner_child.run(self._inline, message)
                return
            try:
                pipe.send(message)
                break
            except OSError:
                # It died since its last answer: start another (or give up on runners, after
                # a few that died starting) and send it again.
                self._lost_runner()
        self._outstanding.append(len(message[-1]))
        while len(self._outstanding) > 1 and sum(self._outstanding) > self._max_waiting:
            self._await_one()

    def _await_one(self) -> None:
        pipe = self._pipe
        while pipe is not None:
            try:
                if pipe.poll(_POLL_SECONDS):
                    pipe.recv()
                    self._outstanding.popleft()
                    return
            except (EOFError, OSError):
                pass
            else:
                if self._runner is not None and self._runner.is_alive():
                    continue
            self._lost_runner()
            return

    def _lost_runner(self) -> None:
        code = self._runner.exitcode if self._runner is not None else None
        if self._pipe is not None:
            self._pipe.close()
        self._runner = self._pipe = None
        self._outstanding.clear()
        if time.monotonic() - self._started_at > _EARLY_DEATH_SECONDS:
            self._early_deaths = 0
        else:
            self._early_deaths += 1
        if self._early_deaths >= _EARLY_DEATHS:
            log.error(
                "The recipe runner exited (code %s) %d times in a row soon after it started; "
                "running the recipes in this process from now on.",
                code,
                self._early_deaths,
            )
            self._inline = LocalDispatcher()
            return
        log.warning(
            "The recipe runner exited (code %s); starting another. The runs it held are taken "
            "over once their claims expire.",
            code,
        )

    def _ensure_runner(self) -> Connection:
        while self._runner is None or self._pipe is None:
            if self._inline is not None:
                raise _RunnersFailing
            self._start_runner()
        return self._pipe

    def _start_runner(self) -> None:
        """Start a runner and wait until it has set Django up (so that the consumer takes its
        first results with a runner ready for them)."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        runner = context.Process(
            target=runner_child.main,
            args=(theirs, os.environ.get("DJANGO_SETTINGS_MODULE", "")),
            name="recipe-runner",
        )
        runner.start()
        self._started_at = time.monotonic()
        theirs.close()
        self._runner, self._pipe = runner, ours
        if not self._close_registered:
            # Before multiprocessing's own exit handler (atexit runs last-in first), which would
            # otherwise wait for a runner nobody told to stop.
            atexit.register(self.close)
            self._close_registered = True
        while True:
            try:
                if ours.poll(_POLL_SECONDS):
                    ours.recv()  # ("ready",)
                    break
            except (EOFError, OSError):
                pass
            else:
                if runner.is_alive():
                    continue
            self._lost_runner()
            return
        log.info("Started the recipe runner (pid %d).", runner.pid)
