"""The broker nodes of one ``AMQP_URL``, which of them to try first, and what became of each.

``AMQP_URL`` names one broker, or the nodes of a cluster separated by :data:`URL_SEPARATOR`
(as Celery's ``BROKER_URL`` does): ``amqp://u:p@rabbit1/%2F;amqp://u:p@rabbit2/%2F``. A client
connects to the first node that answers, in the order of :meth:`Nodes.order`: the node that last
answered first, and after a connection to it was lost, the node after it, so that a client whose
node died goes to the next one rather than knocking on the dead one first.

Every connection of a process reports to the same :class:`Nodes` (:func:`nodes_of`), which logs
each change of a node's state once per process, however many connections saw it (the HTTP shim
has one per serving thread): a node lost, a node that does not answer, a node that answers again.
Only host and port are ever logged, never the URL's credentials.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: Separates the broker URLs of a cluster in ``AMQP_URL``; a ``;`` inside one URL's query would
#: be written ``%3B``.
URL_SEPARATOR = ";"


def split_urls(value: str) -> list[str]:
    """The entries of a URL setting, stripped of surrounding blanks (not validated)."""
    return [part.strip() for part in value.split(URL_SEPARATOR)]


def node_name(url: str) -> str:
    """``host:port`` of a broker URL: how logs name a node (never with credentials)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        return "(unreadable URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


class _Node:
    def __init__(self, url: str) -> None:
        self.url = url
        self.name = node_name(url)
        #: True answered last time, False lost or not answering, None never tried.
        self.up: bool | None = None
        self.down_since = 0.0


class Nodes:
    """The nodes of one broker setting, in the order a new connection tries them."""

    def __init__(self, urls: Sequence[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self._nodes = [_Node(url) for url in urls]
        self._first = 0
        self._lock = threading.Lock()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._nodes)

    def url(self, index: int) -> str:
        return self._nodes[index].url

    def name(self, index: int) -> str:
        return self._nodes[index].name

    def order(self) -> list[int]:
        """Indexes of the nodes, in the order to try them."""
        with self._lock:
            first = self._first
        count = len(self._nodes)
        return [(first + k) % count for k in range(count)]

    def answered(self, index: int) -> None:
        """A connection to the node was made: it is the first to try from now on."""
        with self._lock:
            self._first = index
            node = self._nodes[index]
            was, node.up = node.up, True
            down_for = self._clock() - node.down_since
        if was is False:
            log.info("Broker node %s answers again, after %.1f s.", node.name, down_for)

    def refused(self, index: int, reason: str) -> None:
        """A connection to the node could not be made."""
        self._down(index, "Broker node %s does not answer: %s.", reason)

    def lost(self, index: int, reason: str) -> None:
        """An open connection to the node broke: the next connection starts at the next node."""
        with self._lock:
            if self._first == index:
                self._first = (index + 1) % len(self._nodes)
        self._down(index, "Connection to broker node %s lost: %s.", reason)

    def passed_over(self, index: int) -> None:
        """Something went wrong on a connection to the node that says nothing about the node (no
        confirm in time): the next connection tries another node first, nothing is logged."""
        with self._lock:
            if self._first == index and len(self._nodes) > 1:
                self._first = (index + 1) % len(self._nodes)

    def _down(self, index: int, message: str, reason: str) -> None:
        with self._lock:
            node = self._nodes[index]
            was, node.up = node.up, False
            if was is not False:
                node.down_since = self._clock()
        if was is not False:
            # Once per node per outage: the connections that notice it after the first, and
            # every attempt while it stays away, add nothing an operator needs.
            log.warning(message, node.name, reason)
        else:
            log.debug(message, node.name, reason)


_registry: dict[tuple[str, ...], Nodes] = {}
_registry_lock = threading.Lock()


def nodes_of(urls: Sequence[str]) -> Nodes:
    """The process's one :class:`Nodes` for this list of URLs."""
    key = tuple(urls)
    with _registry_lock:
        nodes = _registry.get(key)
        if nodes is None:
            nodes = _registry[key] = Nodes(key)
        return nodes
