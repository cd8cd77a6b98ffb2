"""A three-node RabbitMQ cluster losing nodes while results flow: nothing lost, nothing twice.

Three private ``rabbitmq-server`` nodes joined into one cluster on loopback; the results, retry and
dead-letter queues are quorum queues with a member on each. Every client is given all three nodes
in ``AMQP_URL`` (each in another order): two consumer processes, the HTTP shim (its default
publish timeout), and publisher threads using the project's :class:`~consumer.publish.Publisher`
with its default budget of 30 s. While they publish a few thousand results (and some malformed
messages), and clients POST some more to the shim as sioworkersd would:

1. the node leading the results queue is SIGKILLed, then started again;
2. then the node one consumer is connected to;
3. then the node the shim is connected to;
4. then two nodes at once, for a few seconds: the queues have no majority, publishes get no
   confirm.

After each kill of one node, and before starting it again, the test waits until every client that
node had works on another one: its consumers consume there, its publishers have a message confirmed
there, the shim answers 200 again, and a result published after the kill has been committed. Then
it waits for the node to be back with every queue's three members online. It prints, for each kill, the time to the first
commit after it, to the first commit of a result published after it, and the longest pause in
commits until the node was back.

Then: every publish was confirmed within the publisher's budget (it outlasted each election), the
shim answered only 200 or 503, a 503 within its own deadline and nothing near 15 s; every result
was applied exactly once and its recipe run once; no job, saved environ or pending run is left; the
results and retry queues are empty; the dead-letter queue holds the malformed messages and nothing
else; both consumers and the shim stop cleanly.

``CLUSTER_RESULTS`` (default 2000) sets the number of valid results.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import queue
import re
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count

from consumer.brokers import node_name
from consumer.config import Settings
from consumer.errors import PublishError, TransportError
from consumer.publish import Publisher
from oioioi.evalmgr.models import QueuedJob, SavedEnviron
from oioioi.workers.models import PendingRun, ReceivedResult
from tests.broker import BrokerUnavailable, RabbitCluster, RabbitNode
from tests.conftest import BrokerClient, ConsumerProcess, make_settings, result_for
from tests.faults import consumer_database_url, waiting_jobs
from tests.recipeapp.models import StepLog

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

VALID = int(os.environ.get("CLUSTER_RESULTS", "2000"))
#: Of the valid results, those sent through the shim (the rest through the publishers).
THROUGH_SHIM = VALID // 6
MALFORMED = 60
#: Publisher threads, and clients POSTing to the shim.
PUBLISHERS = 3
SHIM_CLIENTS = 4
#: While the nodes are being killed, the senders spread their work over this many seconds (more
#: than the kills take, so that each meets a flow of results); after that, as fast as may be.
PACE_SECONDS = 150.0
#: How long two nodes stay down together (no majority for any queue).
NO_QUORUM_SECONDS = 5.0
#: The shim's own deadline here: short of the time without a majority, so that some requests
#: meet it; a 503 must come within it (and a margin), never anywhere near 15 s.
SHIM_PUBLISH_TIMEOUT = 4.0
#: Seconds allowed, after a kill, for the clients to work again (on another node, for one kill).
RECOVERY_TIMEOUT = 60.0


def malformed(i: int) -> bytes:
    kinds = [
        b"{not json %d" % i,
        b"[%d]" % i,
        json.dumps({"workers_jobs": {"job0": {}}, "n": i}).encode(),
    ]
    return kinds[i % len(kinds)]


@dataclass
class Kill:
    """One fault: when it happened (wall clock), what, and when the cluster was whole again."""

    what: str
    at: float
    back_at: float = 0.0
    #: When every client of the killed node worked on another (single kills).
    failed_over_at: float = 0.0
    #: For two nodes down together: when both were started again (the majority returns).
    quorum_at: float = 0.0


@dataclass
class Traffic:
    """What the publishers and the shim's clients did, for the checks and the figures."""

    #: job_id -> wall-clock time its (first) publish or POST started.
    started: dict[str, float] = field(default_factory=dict)
    confirmed: set[str] = field(default_factory=set)
    publisher_failures: list[str] = field(default_factory=list)
    #: (started, seconds, status) of every shim request.
    requests: list[tuple[float, float, int]] = field(default_factory=list)
    #: Publisher thread -> (when, broker node) of its last confirmed publish.
    last_confirm: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set while the nodes are being killed: the senders keep to their pace until it is cleared.
    paced: threading.Event = field(default_factory=threading.Event)


def sender_thread(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def publish_all(
    settings: Settings, work: queue.Queue[tuple[str, bytes]], traffic: Traffic, interval: float
) -> None:
    """The project's publisher, as a worker would use it: confirms on, its default budget."""
    try:
        with Publisher(settings) as publisher:
            while True:
                try:
                    message_id, body = work.get_nowait()
                except queue.Empty:
                    return
                with traffic.lock:
                    traffic.started.setdefault(message_id, time.time())
                while True:
                    try:
                        publisher.publish(body, message_id=message_id)
                        break
                    except (PublishError, TransportError) as e:
                        # Counted as a failure of the test; published again so that the rest of
                        # the checks still mean something.
                        traffic.publisher_failures.append(f"{message_id}: {e}")
                with traffic.lock:
                    traffic.confirmed.add(message_id)
                    traffic.last_confirm[threading.current_thread().name] = (
                        time.time(),
                        publisher.node,
                    )
                if traffic.paced.is_set():
                    time.sleep(interval)
    except BaseException as e:
        traffic.errors.append(e)


def post_all(
    port: int, work: queue.Queue[tuple[str, bytes]], traffic: Traffic, interval: float
) -> None:
    """sioworkersd's POST, repeated until it gets 200 (sioworkersd waits longer in between)."""
    try:
        while True:
            try:
                message_id, body = work.get_nowait()
            except queue.Empty:
                return
            form = urllib.parse.urlencode({"data": body.decode()}).encode()
            with traffic.lock:
                traffic.started.setdefault(message_id, time.time())
            while True:
                began = time.time()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                try:
                    conn.request(
                        "POST",
                        "/",
                        form,
                        {"Content-Type": "application/x-www-form-urlencoded"},
                    )
                    status = conn.getresponse().status
                finally:
                    conn.close()
                with traffic.lock:
                    traffic.requests.append((began, time.time() - began, status))
                if status == 200:
                    break
                time.sleep(0.3)
            with traffic.lock:
                traffic.confirmed.add(message_id)
            if traffic.paced.is_set():
                time.sleep(interval)
    except BaseException as e:
        traffic.errors.append(e)


def consumer_node(cluster: RabbitCluster, consumer: ConsumerProcess) -> RabbitNode:
    """The node a consumer said it is consuming on, last."""
    ports = re.findall(r"Consuming from .* on amqp://[^@]*@127\.0\.0\.1:(\d+)/", consumer.log)
    return cluster.by_port(int(ports[-1]))


def shim_node(cluster: RabbitCluster, timeout: float = 30.0) -> RabbitNode:
    """The node holding most of the shim's connections (one per serving thread that has one)."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.ctl(
            "list_connections", "-q", "--no-table-headers", "name", "client_properties"
        )
        # A connection's name is "client address -> node address".
        ports = Counter(
            int(match.group(1))
            for line in out.splitlines()
            if "oioioi-http-shim" in line and (match := re.search(r"-> [^ ]*:(\d+)", line))
        )
        if ports:
            return cluster.by_port(ports.most_common(1)[0][0])
        assert time.monotonic() < deadline, f"the shim has no connection:\n{out}"
        time.sleep(0.2)


def commits_since(at: float) -> list[tuple[str, float]]:
    rows = ReceivedResult.objects.filter(received_at__gt=datetime.fromtimestamp(at).astimezone())
    return [
        (job_id, when.timestamp()) for job_id, when in rows.values_list("job_id", "received_at")
    ]


@pytest.fixture
def cluster() -> Iterator[RabbitCluster]:
    started = time.monotonic()
    nodes = RabbitCluster(3)
    try:
        nodes.start()
    except BrokerUnavailable as e:
        nodes.stop()
        pytest.fail(f"Cannot start a 3-node RabbitMQ cluster: {e}", pytrace=False)
    print(f"\ncluster of 3 nodes up in {time.monotonic() - started:.0f} s")
    yield nodes
    nodes.stop()


def test_cluster_loses_nodes_and_nothing_is_lost_or_applied_twice(
    cluster, start_consumer, start_shim, waiting_job
):
    began = time.monotonic()
    settings = make_settings(cluster.url, max_retries=2)
    BrokerClient(settings).depth()  # declares the topology, now that the cluster is formed
    queues = [settings.queue, settings.retry_queue, settings.dead_letter_queue]
    for name in queues:
        info = cluster.queue_info(name)
        assert info["members"].count("@") == 3, info  # a quorum queue with a member on each node

    # Given waiting jobs, their results and some malformed messages
    template = waiting_job()
    jobs = [template, *waiting_jobs(template, VALID - 1)]
    results = [result_for(sent) for sent in jobs]
    via_publisher: queue.Queue[tuple[str, bytes]] = queue.Queue()
    via_shim: queue.Queue[tuple[str, bytes]] = queue.Queue()
    for i, result in enumerate(results):
        target = via_shim if i % (VALID // THROUGH_SHIM) == 0 else via_publisher
        target.put((result["job_id"], json.dumps(result).encode()))
    shim_share = via_shim.qsize()
    for i in range(MALFORMED):
        via_publisher.put((f"bad-{i}", malformed(i)))
    bad_ids = {f"bad-{i}" for i in range(MALFORMED)}

    # And two consumers and the shim, each given the three nodes in its own order
    env = {"DATABASE_URL": consumer_database_url()}
    consumers = [
        start_consumer(settings=settings.replace(amqp_url=cluster.urls(*order)), **env)
        for order in ((0, 1, 2), (1, 2, 0))
    ]
    shim = start_shim(
        settings=settings.replace(amqp_url=cluster.urls(2, 0, 1)),
        SHIM_PUBLISH_TIMEOUT=str(SHIM_PUBLISH_TIMEOUT),
    )
    setup_seconds = time.monotonic() - began

    # When results are published while nodes are killed
    traffic = Traffic()
    traffic.paced.set()
    publishers_interval = PUBLISHERS * PACE_SECONDS / via_publisher.qsize()
    shim_interval = SHIM_CLIENTS * PACE_SECONDS / via_shim.qsize()
    senders = [
        sender_thread(
            publish_all,
            settings.replace(amqp_url=cluster.urls(*order)),
            via_publisher,
            traffic,
            publishers_interval,
        )
        for order in ((2, 1, 0), (0, 2, 1), (1, 0, 2))
    ] + [
        sender_thread(post_all, shim.port, via_shim, traffic, shim_interval)
        for _ in range(SHIM_CLIENTS)
    ]

    kills: list[Kill] = []

    def alive() -> None:
        assert not traffic.errors, traffic.errors
        for proc in (*consumers, shim):
            assert proc.alive(), f"a process died:\n{proc.log[-5000:]}"

    def clients_of(node: RabbitNode) -> tuple[list[ConsumerProcess], list[str]]:
        """The consumers and the publisher threads connected to a node, last they said."""
        with traffic.lock:
            publishers = [
                name for name, (_, on) in traffic.last_confirm.items() if on == node_name(node.url)
            ]
        return [c for c in consumers if consumer_node(cluster, c) is node], publishers

    def failed_over(kill: Kill, node: RabbitNode, clients: tuple[list[Any], list[str]]) -> None:
        """Until, with the node still down, every client it had works on another node: each of its
        consumers consumes elsewhere, each of its publishers had a publish confirmed elsewhere,
        the shim answered 200 to a request made after the kill, and a result published after
        the kill has been committed."""
        consumers_there, publishers_there = clients
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            alive()
            waiting = [
                f"consumer {consumers.index(c)}"
                for c in consumers_there
                if consumer_node(cluster, c) is node
            ]
            with traffic.lock:
                waiting += [
                    f"publisher {name}"
                    for name in publishers_there
                    if not (
                        traffic.last_confirm[name][0] > kill.at
                        and traffic.last_confirm[name][1] != node_name(node.url)
                    )
                ]
                if not any(b > kill.at and st == 200 for b, _, st in traffic.requests):
                    waiting.append("the shim")
                later = {j for j, t in traffic.started.items() if t > kill.at}
            if not any(job_id in later for job_id, _ in commits_since(kill.at)):
                waiting.append("a commit")
            if not waiting:
                kill.failed_over_at = time.time()
                return
            if time.monotonic() > deadline:
                pytest.fail(f"after {kill.what}, still waiting for {waiting}", pytrace=False)
            time.sleep(0.2)

    def recovered(kill: Kill) -> None:
        """Until a result published after the kill has been committed."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            alive()
            with traffic.lock:
                later = {j for j, t in traffic.started.items() if t > kill.at}
            if any(job_id in later for job_id, _ in commits_since(kill.at)):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"no result published after {kill.what} was committed", pytrace=False)
            time.sleep(0.2)

    def restart(*nodes: RabbitNode) -> None:
        for node in nodes:
            node.restart()
        cluster.wait_online(queues, 3)

    # (waiting for the first commits first, so that the kills meet a steady flow)
    deadline = time.monotonic() + 60
    while ReceivedResult.objects.count() < 100:
        alive()
        assert time.monotonic() < deadline, "no steady flow of commits before the kills"
        time.sleep(0.2)

    leader = cluster.leader(settings.queue)
    clients = clients_of(leader)
    leader.kill()
    kills.append(Kill(f"the leader of the results queue ({leader.name})", time.time()))
    failed_over(kills[-1], leader, clients)
    restart(leader)
    kills[-1].back_at = time.time()

    # A consumer whose node no longer leads the results queue, if there is one.
    leader = cluster.leader(settings.queue)
    node = next(
        (n for c in consumers if (n := consumer_node(cluster, c)) is not leader),
        consumer_node(cluster, consumers[0]),
    )
    clients = clients_of(node)
    node.kill()
    kills.append(Kill(f"a consumer's node ({node.name})", time.time()))
    failed_over(kills[-1], node, clients)
    restart(node)
    kills[-1].back_at = time.time()

    node = shim_node(cluster)
    clients = clients_of(node)
    node.kill()
    kills.append(Kill(f"the shim's node ({node.name})", time.time()))
    failed_over(kills[-1], node, clients)
    restart(node)
    kills[-1].back_at = time.time()

    # Two at once: the shim's node stays, and its requests meet a node without a majority.
    survivor = shim_node(cluster)
    down = [n for n in cluster.nodes if n is not survivor]
    for node in down:
        node.kill()
    # From when the second is gone: the queues have no majority from then on.
    kills.append(Kill(f"two nodes at once ({down[0].name}, {down[1].name})", time.time()))
    time.sleep(NO_QUORUM_SECONDS)  # the fault's duration, not a wait for anything
    alive()
    down[0].restart()
    kills[-1].quorum_at = time.time()  # two of three: a majority again
    down[1].restart()
    cluster.wait_online(queues, 3)
    recovered(kills[-1])
    kills[-1].back_at = time.time()
    chaos_seconds = time.monotonic() - began - setup_seconds

    # (and the rest, as fast as it goes)
    traffic.paced.clear()
    for sender in senders:
        sender.join(300)
        assert not sender.is_alive(), "a sender is stuck"
    alive()

    # Then every publish was confirmed within the publisher's budget
    assert not traffic.publisher_failures, traffic.publisher_failures[:5]
    everything = {r["job_id"] for r in results} | bad_ids
    assert traffic.confirmed == everything

    # And the shim answered 200 or 503, a 503 within its own deadline, nothing near 15 s
    statuses = Counter(status for _, _, status in traffic.requests)
    assert set(statuses) <= {200, 503}, statuses
    slowest_503 = max((s for _, s, status in traffic.requests if status == 503), default=0.0)
    slowest = max(s for _, s, _ in traffic.requests)
    assert slowest_503 <= SHIM_PUBLISH_TIMEOUT + 2.0, slowest_503
    assert slowest < 15.0, slowest
    no_quorum = kills[-1]
    assert any(
        no_quorum.at <= began_at <= no_quorum.quorum_at and status == 503
        for began_at, _, status in traffic.requests
    ), "no request met the cluster without a majority"

    # And once the consumers have caught up, every result was applied exactly once
    def settled() -> bool:
        return (
            not QueuedJob.objects.exists()
            and not PendingRun.objects.exists()
            and sum(queue_counts(cluster, settings.queue)) == 0
            and sum(queue_counts(cluster, settings.retry_queue)) == 0
        )

    deadline = time.monotonic() + 180
    while not settled():
        alive()
        if time.monotonic() > deadline:
            left = Counter(QueuedJob.objects.values_list("state", flat=True))
            pytest.fail(
                f"not settled: jobs left {left}, pending runs {PendingRun.objects.count()}, "
                f"results {queue_counts(cluster, settings.queue)}, "
                f"retry {queue_counts(cluster, settings.retry_queue)}",
                pytrace=False,
            )
        time.sleep(0.5)
    drain_seconds = time.monotonic() - began - setup_seconds - chaos_seconds

    job_ids = {sent["job_id"] for sent in jobs}
    resumed = Counter(
        ReceivedResult.objects.filter(outcome="resumed").values_list("job_id", flat=True)
    )
    assert set(resumed) == job_ids and set(resumed.values()) == {1}
    ran = dict(
        StepLog.objects.filter(step="after-results")
        .values_list("job_id")
        .annotate(n=Count("id"))
        .values_list("job_id", "n")
    )
    assert set(ran) == job_ids, f"{len(job_ids - set(ran))} jobs never ran their recipe"
    assert {j: n for j, n in ran.items() if n != 1} == {}, "a recipe ran twice"
    assert not SavedEnviron.objects.exists()

    # And the dead-letter queue holds the malformed messages, and nothing else
    dead = BrokerClient(settings).drain(settings.dead_letter_queue)
    assert {p.message_id for p, _ in dead} == bad_ids
    extra_copies = len(dead) - len(bad_ids)

    # And the consumers and the shim stop cleanly
    for proc in (*consumers, shim):
        assert proc.stop(60) == 0, proc.log[-5000:]

    commits = sorted(when for _, when in commits_since(0))
    lines = []
    for kill in kills:
        after = [when for when in commits if when > kill.at]
        later = {j for j, t in traffic.started.items() if t > kill.at}
        first_new = min(w for j, w in commits_since(kill.at) if j in later)
        # Until the node is back with every queue member online (the next kill is later).
        window = [kill.at, *(w for w in after if w < kill.back_at)]
        pause, paused_at = max((b - a, a) for a, b in itertools.pairwise(window))
        lines.append(
            f"  kill {kill.what}: first commit after {after[0] - kill.at:.1f} s, first commit "
            f"of a result published after it {first_new - kill.at:.1f} s, longest pause in "
            f"commits until it was back {pause:.1f} s (from {paused_at - kill.at:+.1f} s)"
            + (
                f" (the majority back {kill.quorum_at - kill.at:.1f} s after the kill)"
                if kill.quorum_at
                else ""
            )
            + (
                f"; every client of the node working on another after "
                f"{kill.failed_over_at - kill.at:.1f} s"
                if kill.failed_over_at
                else ""
            )
            + f"; node back, all members online, after {kill.back_at - kill.at:.0f} s"
        )
    total = time.monotonic() - began
    print(
        f"\ncluster: {VALID} results ({VALID - shim_share} by {PUBLISHERS} publishers, "
        f"{shim_share} through the shim) and "
        f"{MALFORMED} malformed; shim requests {dict(statuses)}, slowest 503 "
        f"{slowest_503:.1f} s, slowest request {slowest:.1f} s; {extra_copies} extra "
        f"dead-letter copies; setup {setup_seconds:.0f} s, kills {chaos_seconds:.0f} s, drain "
        f"{drain_seconds:.0f} s, total {total:.0f} s\n" + "\n".join(lines)
    )
    connection.close()


def queue_counts(cluster: RabbitCluster, name: str) -> tuple[int, int]:
    out = cluster.ctl(
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    )
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name!r} not listed:\n{out}")
