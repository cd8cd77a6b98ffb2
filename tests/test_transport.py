"""Transport against sockets that misbehave: pika's errors must never leave the transport module."""

from __future__ import annotations

import socket
import threading

import pytest

from consumer.config import Settings
from consumer.errors import ConnectionClosed
from consumer.transport import Transport


def silent_server() -> tuple[socket.socket, int]:
    """Accepts TCP connections and never says a word (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def test_a_broker_that_never_answers_the_handshake_is_a_connection_error():
    server, port = silent_server()
    try:
        url = f"amqp://guest:guest@127.0.0.1:{port}/%2F?socket_timeout=1&stack_timeout=1"
        with pytest.raises(ConnectionClosed, match="no answer within 1 s"):
            Transport(Settings(amqp_url=url))
    finally:
        server.close()


def test_a_closed_port_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionClosed):
        Transport(Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F"))
