"""sioworkersd's ``TaskManager`` with a return to the results queue.

Upstream's ``TaskManager.returnToSio(x, url, orig_env, tid, count)`` (sioworkers 1.5.9,
``sio/sioworkersd/taskmanager.py``) is the one place where sioworkersd returns a finished group:
from ``run_group`` once the group is done, and from ``startService`` for what its task database
still held at the last stop. Here it is overridden for return URLs naming the queue only; every
other URL goes to upstream's method unchanged, so one sioworkersd serves both.

The body published is what upstream POSTs as the form field ``data``: ``json_dumps(env)`` of the
same environ, UTF-8 encoded. The task stays in the task database (status ``to_return``, as
upstream leaves it) until the broker has confirmed the message; then upstream's ``_returnDone``
deletes it.
"""

from __future__ import annotations

import time
from typing import Any

from sio.sioworkersd.taskmanager import TaskManager
from sio.workers.util import json_dumps
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from consumer.publish import message_properties
from sioworkersd_amqp.config import names_more_than_the_queue, names_the_queue
from sioworkersd_amqp.returns import APP_ID, QueueReturns, Stopped

log = Logger()


class QueueTaskManager(TaskManager):  # type: ignore[misc]
    """Upstream's task manager; results for ``amqp:`` go to :class:`QueueReturns`."""

    def __init__(
        self,
        db_filename: str,
        workerm: Any,
        sched: Any,
        max_task_ram_mb: int,
        returns: QueueReturns,
    ) -> None:
        super().__init__(db_filename, workerm, sched, max_task_ram_mb)
        self.returns = returns
        self._warned_about_url = False

    def startService(self) -> Any:
        # First: upstream's start returns what the task database held, through returnToSio.
        self.returns.start()
        return super().startService()

    def stopService(self) -> Any:
        self.returns.stop()
        return super().stopService()

    def returnToSio(
        self,
        x: Any,
        url: str,
        orig_env: dict[str, Any] | None = None,
        tid: str | None = None,
        count: int = 0,
    ) -> Any:
        if not names_the_queue(url):
            return super().returnToSio(x, url, orig_env=orig_env, tid=tid, count=count)
        # As upstream: a failed group returns its original environ, which holds the error.
        if isinstance(x, Failure):
            if orig_env is None:
                raise ValueError("a failed group cannot be returned without its environ")
            env = orig_env
            log.failure("Returning with error", x, LogLevel.warn)
        else:
            env = x
        if not tid:
            tid = env["group_id"]
        if names_more_than_the_queue(url) and not self._warned_about_url:
            self._warned_about_url = True
            log.warn(
                "A return URL says more than 'amqp:' ('amqps:', a host, a user or a path): that "
                "is ignored; results go to the broker of sioworkersd's own configuration."
            )
        self._keep(tid, env)
        body = json_dumps(env).encode("utf-8")
        delivery = self.returns.deliver(tid, body, message_properties(env, app_id=APP_ID))
        delivery.addCallback(self._returnDone, tid=tid)
        delivery.addErrback(_left_for_next_start)
        return delivery

    def _keep(self, tid: str, env: dict[str, Any]) -> None:
        """Make sure the task database holds the result until its confirm.

        A finished group is already there (``to_return``). One that sioworkersd refused at once
        (a job needing more memory than allowed) never was: it is written now, so that it
        outlives a restart too.
        """
        if tid.encode("utf-8") in self.database.db:
            return
        self.database.update(
            tid,
            {
                "id": tid,
                "env": env,
                "status": "to_return",
                "timestamp": time.time(),
                "retry_cnt": 0,
            },
            sync=True,
        )


def _left_for_next_start(failure: Failure) -> None:
    # Stopping: the result stays in the task database, returned again after the next start.
    failure.trap(Stopped, defer.CancelledError)
