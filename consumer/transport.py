"""The only module that talks to pika. Its exceptions are wrapped before they leave.

One :class:`Transport` is one broker connection with one channel in confirm mode, used both to
consume (prefetch-bounded, manual acks) and to publish the copies that dead-lettering and delayed
retries need. A publish returns only once the broker has confirmed it. The connection goes to the
first node of ``AMQP_URL`` that answers (:func:`connect`, :mod:`consumer.brokers`).

For the operator's tools (dead letters, the status panel), :class:`Connection` and its
:class:`Channel` make single calls with pika's errors wrapped the same way, and
:func:`cause_facts` reads the pika errors a :class:`~consumer.errors.ConnectionClosed` keeps.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.adapters.utils.connection_workflow import (
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)

from consumer import topology
from consumer.brokers import nodes_of
from consumer.config import Settings
from consumer.errors import (
    BrokerRefused,
    ConfirmTimeout,
    ConnectionClosed,
    ConsumerCancelled,
    PublishError,
    StaleDelivery,
)
from consumer.redact import redact_text, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Each channel gets a number; a delivery remembers its channel's, so that a tag from a channel
#: that is gone can never be acknowledged on its successor (it would ack an unrelated message).
_generations = itertools.count(1)


@dataclass(frozen=True)
class Properties:
    """The AMQP properties this project reads or writes; any of them may be absent."""

    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: int | None = None
    content_type: str | None = None
    app_id: str | None = None
    correlation_id: str | None = None

    @classmethod
    def from_pika(cls, props: pika.BasicProperties | None) -> Properties:
        if props is None:
            return cls()
        return cls(
            message_id=props.message_id or None,
            headers=dict(props.headers or {}),
            timestamp=props.timestamp,
            content_type=props.content_type,
            app_id=props.app_id,
            correlation_id=props.correlation_id,
        )

    def to_pika(self) -> pika.BasicProperties:
        return pika.BasicProperties(
            message_id=self.message_id,
            headers=self.headers or None,
            timestamp=self.timestamp,
            content_type=self.content_type,
            app_id=self.app_id,
            correlation_id=self.correlation_id,
            delivery_mode=pika.DeliveryMode.Persistent,
        )


@dataclass(frozen=True)
class Delivery:
    tag: int
    body: bytes
    properties: Properties
    redelivered: bool
    generation: int

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id


def connection_parameters(settings: Settings) -> list[pika.URLParameters]:
    """pika's parameters for each broker node of ``settings.amqp_url``, in its order.

    Raises ``ValueError`` (its text without the password) for a URL pika cannot use.
    """
    out = []
    for url in settings.amqp_urls:
        try:
            params = pika.URLParameters(url)
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(
                f"AMQP_URL: {redact_url(url)!r} is not valid: {redact_text(str(e), [url])}"
            ) from None
        params.heartbeat = settings.heartbeat
        params.blocked_connection_timeout = settings.blocked_connection_timeout
        params.client_properties = {"connection_name": "oioioi-results"}
        out.append(params)
    return out


#: Everything pika raises when a connection fails or breaks. The connector's errors (a broker that
#: accepts TCP but never finishes the handshake) do not derive from ``AMQPError``.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError,
    AMQPConnectorException,
    OSError,
)

#: What says nothing about the node: the channel was closed (a queue argument refused, ...), the
#: connection stands.
_CHANNEL_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.UnroutableError,
    pika.exceptions.NackError,
    pika.exceptions.ConsumerCancelled,
)


class _OutOfTime(pika.exceptions.AMQPConnectionError):
    """Ends a connection whose broker did not answer in time (see :func:`_deadline`)."""


def describe(error: BaseException) -> str:
    """A short account of a connection error for a log line: its innermost cause, redacted."""
    inner = error
    for _ in range(5):
        # pika wraps the cause in args, its connector's errors in an ``exception`` attribute.
        candidates = [*getattr(inner, "args", ()), getattr(inner, "exception", None)]
        nested = next((a for a in candidates if isinstance(a, BaseException)), None)
        if nested is None:
            break
        inner = nested
    text = str(inner).strip()
    if isinstance(inner, OSError) and inner.strerror:
        text = inner.strerror
    shown = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    return redact_text(shown)[:300]


def connect(
    settings: Settings,
    *,
    name: str = "oioioi-results",
    timeout: float | None = None,
    tune: Callable[[pika.URLParameters], None] | None = None,
) -> tuple[BlockingConnection, int]:
    """A connection to the first broker node that answers, and that node's index.

    Nodes are tried in the order :meth:`consumer.brokers.Nodes.order` gives, each reported to
    the process's :class:`~consumer.brokers.Nodes`. ``timeout`` bounds the whole attempt, every
    node included; ``tune`` may change each node's parameters (shorter timeouts). Raises
    :class:`ConnectionClosed` naming each node and why it did not answer.
    """
    nodes = nodes_of(settings.amqp_urls)
    params = connection_parameters(settings)
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []
    causes: list[BaseException] = []
    for index in nodes.order():
        node_params = params[index]
        node_params.client_properties = {"connection_name": name}
        if tune is not None:
            tune(node_params)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append(f"{nodes.name(index)}: not tried, out of time")
                continue
            node_params.socket_timeout = min(node_params.socket_timeout or remaining, remaining)
            node_params.stack_timeout = min(node_params.stack_timeout or remaining, remaining)
        try:
            connection = pika.BlockingConnection(node_params)
        except CONNECTION_ERRORS as e:
            reason = describe(e)
            if "AMQPConnectorStackTimeout" in reason:
                # pika's text is a dump of the socket address; what happened is simpler.
                reason = f"no answer within {node_params.stack_timeout:g} s"
            nodes.refused(index, reason)
            failures.append(f"{nodes.name(index)}: {reason}")
            causes.append(e)
            continue
        nodes.answered(index)
        return connection, index
    if len(failures) == 1:
        error = ConnectionClosed(f"cannot connect to broker node {failures[0]}")
    else:
        error = ConnectionClosed("no broker node answered (" + "; ".join(failures) + ")")
    error.causes = tuple(causes)
    raise error


#: How much pika reads from its socket at once (its own default is 4 KB), and at most per turn of
#: its I/O loop (100 KB). Each read is appended to a frame buffer that is copied whole each time:
#: at 4 KB a 1 MB message took some 250 reads and 16 MB of copying, 1.3 ms of the consumer's time.
PIKA_READ_BYTES = 128 * 1024
PIKA_READ_BYTES_PER_TURN = 2 * 1024 * 1024


def _tune_pika_reads() -> None:
    from pika.adapters.utils import io_services_utils

    # Private attributes of pika's (1.3 and 1.4 have them); a pika without them reads as it does.
    transport = getattr(io_services_utils, "_AsyncTransportBase", None)
    for name, wanted in (
        ("_MAX_RECV_BYTES", PIKA_READ_BYTES),
        ("_MAX_CONSUME_BYTES", PIKA_READ_BYTES_PER_TURN),
    ):
        current = getattr(transport, name, None)
        if isinstance(current, int) and current < wanted:
            setattr(transport, name, wanted)


@contextmanager
def _deadline(connection: BlockingConnection, seconds: float | None) -> Iterator[None]:
    """Cut ``connection`` if the block has not finished within ``seconds``.

    pika's blocking calls wait for the broker for ever (a publish for its confirm, which a quorum
    queue without a majority never sends). Its own blocked-connection timeout ends a connection
    the same way: a timer on the connection's I/O loop, which the blocking call keeps running,
    terminates the stream with an error, and the call raises it.
    """
    if seconds is None:
        yield
        return
    impl = connection._impl

    def expire() -> None:
        impl._terminate_stream(_OutOfTime(f"no answer from the broker within {seconds:.1f} s"))

    timer = impl._adapter_call_later(max(seconds, 0.001), expire)
    try:
        yield
    finally:
        impl._adapter_remove_timeout(timer)


def within(connection: BlockingConnection, seconds: float | None) -> AbstractContextManager[None]:
    """Cut ``connection`` unless the block finishes within ``seconds`` (None: no bound)."""
    return _deadline(connection, seconds)


class Transport:
    """A confirmed channel on a fresh connection; use as a context manager.

    The connection goes to the first broker node that answers (:func:`connect`); ``node`` names
    it. ``timeout`` bounds connecting and setting the channel up; ``name`` is the connection's
    name in the broker's management tools.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        consume: bool = True,
        name: str = "oioioi-results",
        timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self._consume = consume
        self._pending: collections.deque[Delivery] = collections.deque()
        self._cancelled = False
        self._prefetch = 0
        self._consumer_tag = ""
        #: Tags of the deliveries the current consumer has made and nothing has acked yet.
        self._held: collections.deque[int] = collections.deque()
        _tune_pika_reads()
        self._nodes = nodes_of(settings.amqp_urls)
        self._lost = False
        started = time.monotonic()
        self._connection, self._index = connect(settings, name=name, timeout=timeout)
        #: ``host:port`` of the broker node this transport is connected to.
        self.node = self._nodes.name(self._index)
        #: Its URL, password masked.
        self.node_url = redact_url(self._nodes.url(self._index))
        remaining = None if timeout is None else timeout - (time.monotonic() - started)
        try:
            with self._guard(), _deadline(self._connection, remaining):
                self._channel: BlockingChannel = self._connection.channel()
                self.generation = next(_generations)
                self._channel.confirm_delivery()
                if settings.declare_topology:
                    topology.declare(self._channel, settings)
                if consume:
                    # Cautious at first: what a fresh channel receives first is what earlier
                    # channels left unacknowledged (see consumer.policy on suspects).
                    self._prefetch = 1
                    self._channel.basic_qos(prefetch_count=1)
                    self._channel.add_on_cancel_callback(self._on_cancel)
                    self._consumer_tag = self._channel.basic_consume(
                        settings.queue, self._on_message, auto_ack=False
                    )
        except BaseException:
            self._close_quietly()
            raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """pika's errors as the library's; a broken connection reported against its node."""
        try:
            yield
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            raise PublishError(f"broker did not accept the message: {e!r}") from None
        except pika.exceptions.ConsumerCancelled:
            raise ConsumerCancelled("the broker cancelled the consumer") from None
        except _OutOfTime as e:
            # The node answered, but not in time (a queue without a majority holds its
            # confirms): the next connection tries another node first, if there is one.
            self._nodes.passed_over(self._index)
            raise ConfirmTimeout(f"{e} (node {self.node})") from None
        except CONNECTION_ERRORS as e:
            reason = describe(e)
            if not isinstance(e, _CHANNEL_ERRORS) and not self._lost:
                self._lost = True
                self._nodes.lost(self._index, reason)
            raise ConnectionClosed(f"broker connection lost: {reason}") from None

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- receiving -------------------------------------------------------------------------

    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        if method.consumer_tag == self._consumer_tag:
            self._held.append(method.delivery_tag)
        self._pending.append(
            Delivery(
                tag=method.delivery_tag,
                body=body,
                properties=Properties.from_pika(props),
                redelivered=bool(method.redelivered),
                generation=self.generation,
            )
        )

    def _on_cancel(self, frame: Any) -> None:
        self._cancelled = True

    def receive(
        self, max_count: int, timeout: float, max_bytes: int | None = None
    ) -> list[Delivery]:
        """Up to ``max_count`` deliveries, and bodies of ``max_bytes`` in all (but at least one
        delivery): waits at most ``timeout`` seconds for the first."""
        with self._guard():
            if not self._pending:
                self._connection.process_data_events(time_limit=timeout)
            # Take what else has arrived meanwhile, without waiting, to fill the batch.
            if self._pending and len(self._pending) < max_count:
                self._connection.process_data_events(time_limit=0)
        if self._cancelled:
            raise ConsumerCancelled("the broker cancelled the consumer")
        batch: list[Delivery] = []
        size = 0
        while self._pending and len(batch) < max_count:
            size += len(self._pending[0].body)
            if batch and max_bytes is not None and size > max_bytes:
                break
            batch.append(self._pending.popleft())
        if batch and not any(d.redelivered for d in batch):
            # A quorum queue charges a delivery to every message a dead consumer held: a fresh
            # channel holds one at a time while what earlier channels left comes back, and many
            # once first-time deliveries arrive.
            self._set_prefetch(self._prefetch_for(batch))
        return batch

    def _prefetch_for(self, batch: list[Delivery]) -> int:
        """``settings.prefetch``, or fewer: as many bodies as the batch's largest as fit in half
        of ``settings.batch_bytes``.

        What the consumer holds of a result outlives its message: the resumed environ's text,
        about as large, waits in memory until its recipe has run, while the broker sends the
        next messages. Bodies in hand and on their way within half the budget keep the two
        together within about one batch's bytes, whatever the size of the results.
        """
        largest = max(len(d.body) for d in batch)
        fit = max(1, self.settings.batch_bytes // 2 // max(1, largest))
        wanted = min(self.settings.prefetch, fit)
        # Not for every batch a little larger or smaller than the last: halving or doubling.
        if wanted < self._prefetch or wanted >= 2 * self._prefetch:
            return wanted
        return self._prefetch

    def _set_prefetch(self, count: int) -> None:
        if count == self._prefetch or len(self._held) < self._prefetch:
            # Changing it takes cancelling the consumer, and pika nacks (requeues) what is on
            # its way to a consumer being cancelled: those messages would come back as
            # redeliveries, charged a delivery each. Nothing is on its way only when the
            # consumer holds as many deliveries as its prefetch lets the broker send; until
            # then the change waits (a fresh channel, at one, holds one with its first).
            return
        with self._guard():
            # RabbitMQ gives a consumer the prefetch in force when it started; a later basic.qos
            # reaches only consumers started after it. So the consumer is started again. The
            # deliveries in hand stay unacked on this channel and are acked as usual.
            self._channel.basic_qos(prefetch_count=count)
            self._channel.basic_cancel(self._consumer_tag)
            self._held.clear()
            self._consumer_tag = self._channel.basic_consume(
                self.settings.queue, self._on_message, auto_ack=False
            )
        self._prefetch = count

    # --- settling --------------------------------------------------------------------------

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        if delivery.generation != self.generation:
            raise StaleDelivery(
                f"delivery {delivery.tag} belongs to channel {delivery.generation}, "
                f"not the current {self.generation}"
            )
        with self._guard():
            self._channel.basic_ack(delivery.tag, multiple=multiple)
        if multiple:
            while self._held and self._held[0] <= delivery.tag:
                self._held.popleft()
        elif delivery.tag in self._held:
            self._held.remove(delivery.tag)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties,
        *,
        timeout: float | None = None,
    ) -> None:
        """Publish persistent and mandatory; returns once the broker has confirmed it.

        Without a confirm within ``timeout`` seconds the connection is cut and
        :class:`~consumer.errors.ConfirmTimeout` raised: the message may still arrive, and this
        transport is done for (a later confirm must not be taken for another message's).
        """
        with self._guard(), _deadline(self._connection, timeout):
            self._channel.basic_publish(
                exchange, routing_key, body, properties.to_pika(), mandatory=True
            )

    # --- waiting ---------------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Sleep while keeping heartbeats flowing (``time.sleep`` would starve them)."""
        with self._guard():
            self._connection.sleep(seconds)

    def wait(self, future: Future[T]) -> T:
        """Service the connection until ``future`` (work on another thread) is done."""

        def wake(_: Future[T]) -> None:
            # If the connection is gone, the loop below notices on its own.
            with contextlib.suppress(Exception):
                self._connection.add_callback_threadsafe(lambda: None)

        future.add_done_callback(wake)
        try:
            with self._guard():
                while not future.done():
                    self._connection.process_data_events(time_limit=1.0)
        except ConnectionClosed:
            # The work goes on regardless; let it end before anyone reconnects, so that a
            # redelivery of the same message is never written while this write still runs.
            future.exception()
            raise
        return future.result()

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; unacknowledged deliveries return to the queue."""
        self._pending.clear()
        self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except Exception:
            log.debug("Error while closing the broker connection.", exc_info=True)

    @property
    def is_open(self) -> bool:
        return bool(self._connection.is_open and self._channel.is_open)


# --- single calls, for the operator's tools --------------------------------------------------------

#: Changes a broker node's connection parameters before :func:`connect` uses them.
Tune = Callable[[pika.URLParameters], None]


def short_timeouts(seconds: float) -> Tune:
    """A ``tune`` for :func:`connect` that gives up soon: one attempt per node, ``seconds`` for
    the TCP connection, twice that for the whole handshake and for a blocked connection."""

    def tune(params: pika.URLParameters) -> None:
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = seconds
        params.stack_timeout = seconds * 2
        params.blocked_connection_timeout = seconds * 2

    return tune


#: AMQP's ``delivery_mode`` of a message the broker keeps on disk.
PERSISTENT = 2


@dataclass(frozen=True)
class AmqpProperties:
    """Every AMQP basic property of a message, any of them absent: what a copy must carry when a
    message leaves as it came (a dead letter kept, archived or replayed)."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: int | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None


#: The names of :class:`AmqpProperties` (pika's names too).
PROPERTY_NAMES = tuple(f.name for f in fields(AmqpProperties))


def _from_pika(props: pika.BasicProperties | None) -> AmqpProperties:
    if props is None:
        return AmqpProperties()
    return AmqpProperties(**{name: getattr(props, name, None) for name in PROPERTY_NAMES})


def _to_pika(props: AmqpProperties) -> pika.BasicProperties:
    return pika.BasicProperties(**{name: getattr(props, name) for name in PROPERTY_NAMES})


@dataclass(frozen=True)
class Got:
    """A message taken with :meth:`Channel.get`, not yet settled."""

    tag: int
    properties: AmqpProperties
    body: bytes


@dataclass(frozen=True)
class QueueState:
    """What the broker says of a queue it has."""

    messages: int
    consumers: int


class Connection:
    """One broker connection for separate calls (the operator's tools), on channels of its own.

    Connects like :func:`connect` (``tune``: shorter timeouts). Every call raises pika's errors as
    ours: :class:`~consumer.errors.PublishError` (the broker did not take a message),
    :class:`~consumer.errors.BrokerRefused` (it closed the channel; the connection stands) or
    :class:`~consumer.errors.ConnectionClosed`; each message starts with what the caller said it
    was doing (:meth:`doing`). Use as a context manager.
    """

    def __init__(self, settings: Settings, *, name: str, tune: Tune | None = None) -> None:
        self.name = name
        self._connection = connect(settings, name=name, tune=tune)[0]
        self._doing: list[str] = []

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """The calls of the block are part of ``what`` (the start of an error's message)."""
        self._doing.append(what)
        try:
            yield
        finally:
            self._doing.pop()

    @contextmanager
    def wrapped(self) -> Iterator[None]:
        """pika's errors in the block as ours, said as part of what the caller is doing."""
        what = f"{self._doing[-1]}: " if self._doing else ""
        try:
            yield
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            raise PublishError(f"{what}the broker did not accept the message: {e!r}") from None
        except pika.exceptions.ChannelClosedByBroker as e:
            refused = BrokerRefused(f"{what}the broker refused ({e.reply_code} {e.reply_text})")
            refused.reply_code, refused.reply_text = e.reply_code, e.reply_text
            raise refused from None
        except CONNECTION_ERRORS as e:
            raise ConnectionClosed(f"{what}broker connection lost: {e!r}") from None

    def within(self, seconds: float | None) -> AbstractContextManager[None]:
        """Cut the connection unless the block finishes within ``seconds`` (None: no bound)."""
        return _deadline(self._connection, seconds)

    def channel(self) -> Channel:
        with self.wrapped():
            return Channel(self, self._connection.channel())

    def sleep(self, seconds: float) -> None:
        """Sleep while keeping heartbeats flowing."""
        with self.wrapped():
            self._connection.sleep(seconds)

    @property
    def is_open(self) -> bool:
        return bool(self._connection.is_open)

    def close(self) -> None:
        """Close the connection; what its channels hold unsettled returns to its queue."""
        try:
            if self._connection.is_open:
                self._connection.close()
        except Exception:
            log.debug("Error while closing the broker connection %r.", self.name, exc_info=True)


class Channel:
    """A channel of a :class:`Connection`; its calls raise what the connection's do."""

    def __init__(self, connection: Connection, channel: BlockingChannel) -> None:
        self._connection = connection
        self._channel = channel

    def confirm(self) -> None:
        """From now on a publish returns only once the broker has confirmed it."""
        with self._connection.wrapped():
            self._channel.confirm_delivery()

    def queue_state(self, queue: str) -> QueueState:
        """Asks without creating anything: :class:`~consumer.errors.BrokerRefused` (404, which
        closes the channel) if the broker has no such queue."""
        with self._connection.wrapped():
            ok = self._channel.queue_declare(queue, passive=True)
        return QueueState(int(ok.method.message_count), int(ok.method.consumer_count))

    def check_exchange(self, exchange: str) -> None:
        """:class:`~consumer.errors.BrokerRefused` (404, which closes the channel) if the broker
        has no such exchange."""
        with self._connection.wrapped():
            self._channel.exchange_declare(exchange, passive=True)

    def declare_queue(self, queue: str, arguments: dict[str, Any]) -> None:
        """Declare a durable queue; the broker refuses (406) if it has one with other arguments."""
        with self._connection.wrapped():
            self._channel.queue_declare(queue, durable=True, arguments=arguments)

    def get(self, queue: str) -> Got | None:
        """The message at the head of ``queue``, to be acked or requeued; None if it is empty."""
        with self._connection.wrapped():
            method, properties, body = self._channel.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        return Got(method.delivery_tag, _from_pika(properties), body)

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        with self._connection.wrapped():
            self._channel.basic_ack(tag, multiple=multiple)

    def requeue(self, tag: int, *, multiple: bool = False) -> None:
        """Give back to the queue (with ``multiple``: every message up to ``tag``)."""
        with self._connection.wrapped():
            self._channel.basic_nack(tag, multiple=multiple, requeue=True)

    def publish(self, exchange: str, routing_key: str, body: bytes, props: AmqpProperties) -> None:
        """Publish mandatory; on a confirming channel, returns once the broker has confirmed."""
        with self._connection.wrapped():
            self._channel.basic_publish(
                exchange, routing_key, body, _to_pika(props), mandatory=True
            )

    def purge(self, queue: str) -> int:
        """Remove every ready message of ``queue``; how many."""
        with self._connection.wrapped():
            return int(self._channel.queue_purge(queue).method.message_count)

    @property
    def is_open(self) -> bool:
        return bool(self._connection.is_open and self._channel.is_open)

    def close(self) -> None:
        """Close the channel; a broker refusing to close it is ignored."""
        with self._connection.wrapped(), contextlib.suppress(pika.exceptions.AMQPError):
            self._channel.close()


@dataclass(frozen=True)
class CauseFacts:
    """What one of pika's errors (a cause kept on :class:`~consumer.errors.ConnectionClosed`)
    says about a failure, read here so that no other module needs pika's classes."""

    #: The broker accepted the connection and did not finish the handshake in time.
    timeout: bool = False
    #: The broker refused the login.
    login_refused: bool = False
    #: The broker closed the connection during the handshake without saying why (in practice,
    #: no such virtual host or no access to it).
    handshake_refused: bool = False
    #: ``(reply code, reply text)`` of the broker closing the connection, or a channel.
    connection_reply: tuple[int, str] | None = None
    channel_reply: tuple[int, str] | None = None


def cause_facts(error: BaseException) -> CauseFacts:
    """What ``error`` says if it is one of pika's (nothing for any other error)."""
    closed: tuple[Any, ...] = ()
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        closed = error.args
    channel: tuple[int, str] | None = None
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        channel = (error.reply_code, error.reply_text)
    return CauseFacts(
        timeout=isinstance(error, AMQPConnectorStackTimeout),
        login_refused=isinstance(
            error,
            pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError,
        ),
        handshake_refused=isinstance(error, pika.exceptions.ProbableAccessDeniedError),
        connection_reply=(closed[0], str(closed[1])) if len(closed) >= 2 else None,
        channel_reply=channel,
    )
