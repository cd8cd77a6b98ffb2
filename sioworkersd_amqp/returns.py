"""Publishing returned results on threads of their own, retried until the broker confirms them.

A pika ``BlockingConnection`` belongs to the thread that uses it, and a publish with confirms
blocks until the broker answers; sioworkersd is a Twisted reactor that must never block. So each
broker connection is a :class:`Lane`: one :class:`consumer.publish.Publisher` on a one-thread
pool, to which the reactor hands one publish at a time and gets a ``Deferred`` back. A few lanes
publish at once; a result goes to the least busy.

:meth:`QueueReturns.deliver` is the whole policy for one result: publish; on any failure (no
broker, a nack, an unroutable message, a broken connection) wait with jittered exponential backoff,
bounded by ``retry_max``, and publish again, for as long as it takes. It never gives up, so a
result leaves sioworkersd's task database only after a confirm (the caller deletes it then). A
confirm wakes every result that is waiting, so that a broker back after an outage gets what was
held at once rather than one backoff later. Each result logs one line when it is first held back
and one when it is confirmed; nothing in between.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from consumer.publish import Publisher
from consumer.redact import Redactor, redact_url
from consumer.retry import Backoff
from consumer.transport import Properties
from sioworkersd_amqp.config import ReturnConfig

log = Logger()

#: ``app_id`` of the messages sioworkersd publishes (the HTTP shim's are ``oioioi-http-shim``).
APP_ID = "sioworkersd"


class Stopped(Exception):
    """Raised into a delivery when sioworkersd stops before the broker confirmed its result."""


class Lane:
    """One broker connection on a thread of its own; only that thread ever touches it."""

    def __init__(self, config: ReturnConfig, name: str, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        self._publisher = Publisher(config.broker, attempts=1, app_id=APP_ID)
        #: Calls handed to the thread and not finished (read and written in the reactor only).
        self.pending = 0

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """Close the connection after the calls in hand, and join the thread."""
        self._pool.callInThread(self._publisher.close)
        self._pool.stop()

    def _call(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        self.pending += 1

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        return deferToThreadPool(self._reactor, self._pool, function, *args).addBoth(done)

    def publish(self, body: bytes, properties: Properties) -> defer.Deferred[Any]:
        """One attempt; fires once the broker confirmed, fails with the library's error."""
        return self._call(self._publisher.publish_once, body, properties)

    def service(self) -> None:
        """Answer the broker's heartbeats if the connection is idle (a busy one answers them)."""
        if not self.pending:
            self._call(self._publisher.service).addErrback(
                lambda failure: log.failure("Servicing an idle broker connection", failure)
            )


class QueueReturns:
    """Results on their way to the results exchange; see the module's docstring."""

    def __init__(self, config: ReturnConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self._reactor = reactor
        self._redact = Redactor([config.broker.amqp_url])
        self._lanes = [
            Lane(config, f"sioworkersd-amqp-{n}", reactor) for n in range(config.connections)
        ]
        self._heartbeats = LoopingCall(self._service)
        self._heartbeats.clock = reactor
        #: Results waiting for their next attempt: their timer and the Deferred it fires.
        self._waiting: dict[Any, defer.Deferred[None]] = {}
        #: Results handed to :meth:`deliver` and not yet confirmed.
        self.held = 0
        self.stopping = False

    def start(self) -> None:
        for lane in self._lanes:
            lane.start()
        # Idle connections must answer the broker's heartbeats, or it closes them.
        self._heartbeats.start(max(1.0, self.config.broker.heartbeat / 3), now=False)
        broker = self.config.broker
        log.info(
            "Results whose return URL is 'amqp:' are published to exchange {exchange!r} "
            "(routing key {routing_key!r}) at {url}, over {connections} connection(s), with "
            "confirms; a result the broker has not confirmed stays in the task database and is "
            "tried again at most {retry_max:g} s later.",
            exchange=broker.exchange,
            routing_key=broker.routing_key,
            url=redact_url(broker.amqp_url),
            connections=self.config.connections,
            retry_max=self.config.retry_max,
        )

    def stop(self) -> None:
        held = self.held  # counted before the waiting deliveries end below
        self.stopping = True
        if self._heartbeats.running:
            self._heartbeats.stop()
        for timer, waiting in list(self._waiting.items()):
            timer.cancel()
            waiting.errback(Stopped())
        for lane in self._lanes:
            lane.stop()
        if held:
            log.info(
                "Stopping with {held} result(s) not yet confirmed by the broker: they stay in the "
                "task database and are published after the next start.",
                held=held,
            )

    def _service(self) -> None:
        for lane in self._lanes:
            lane.service()

    def _lane(self) -> Lane:
        return min(self._lanes, key=lambda lane: lane.pending)

    def _wait(self, seconds: float) -> defer.Deferred[None]:
        waiting: defer.Deferred[None] = defer.Deferred()
        timer = self._reactor.callLater(seconds, waiting.callback, None)
        self._waiting[timer] = waiting

        def forget(result: Any) -> Any:
            self._waiting.pop(timer, None)
            return result

        return waiting.addBoth(forget)

    def _wake_all(self) -> None:
        for timer in list(self._waiting):
            if timer.active():
                timer.reset(0)

    @defer.inlineCallbacks
    def deliver(self, tid: str, body: bytes, properties: Properties) -> Any:
        """Publish until the broker confirms; fails only with :class:`Stopped`."""
        backoff = Backoff(self.config.retry_initial, self.config.retry_max)
        started = self._reactor.seconds()
        attempts = 0
        self.held += 1
        try:
            while True:
                if self.stopping:
                    raise Stopped()
                attempts += 1
                try:
                    yield self._lane().publish(body, properties)
                    break
                except Exception as e:  # any failure: the result is kept and tried again
                    if self.stopping:
                        raise Stopped() from None
                    if attempts == 1:
                        log.warn(
                            "Result {tid} not published ({error}): kept in the task database, "
                            "trying again until the broker confirms it.",
                            tid=tid,
                            error=self._redact(str(e) or type(e).__name__),
                        )
                    yield self._wait(backoff.next())
        finally:
            self.held -= 1
        if attempts == 1:
            log.info("Result {tid} published, confirmed by the broker.", tid=tid)
        else:
            log.info(
                "Result {tid} published after {attempts} attempts in {seconds:.1f} s, confirmed "
                "by the broker.",
                tid=tid,
                attempts=attempts,
                seconds=self._reactor.seconds() - started,
            )
        # The broker answers: what waits need not wait out its backoff.
        self._wake_all()
