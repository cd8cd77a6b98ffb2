"""What went wrong with the broker, in words an operator acts on.

The operator pages and commands show a failed broker call as one sentence of a known kind,
never as a Python repr: the broker cannot be reached, the virtual host does not exist, the broker
refused the login or the access, it did not answer in time, or a queue or exchange is missing.
The kind is read from the errors themselves, not from their text: the library's, and pika's kept on
:class:`~consumer.errors.ConnectionClosed` by :func:`consumer.transport.connect`, as
:func:`consumer.transport.cause_facts` reads them.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from consumer.errors import BrokerRefused, ConnectionClosed, ConsumerError, PublishError
from consumer.redact import redact_text
from consumer.transport import cause_facts

#: The kinds of failure, each with what it means for the operator.
UNREACHABLE = "unreachable"
NO_VHOST = "no-such-vhost"
ACCESS_REFUSED = "access-refused"
TIMEOUT = "timeout"
MISSING = "missing"
REFUSED = "refused"
SETTINGS = "settings"

_SENTENCES = {
    UNREACHABLE: "The broker cannot be reached: nothing answers at its address.",
    NO_VHOST: "The broker has no such virtual host: check the virtual host in AMQP_URL.",
    ACCESS_REFUSED: (
        "The broker refused access: the user or password in AMQP_URL is wrong, or the user "
        "may not use this virtual host, queue or exchange."
    ),
    TIMEOUT: "The broker did not answer in time (it accepted the connection, then said nothing).",
    MISSING: "A queue or exchange of the return path does not exist on the broker.",
    REFUSED: "The broker refused the operation.",
    SETTINGS: "The broker settings are not valid.",
}


@dataclass(frozen=True)
class BrokerFailure:
    """One failed broker call, as an operator reads it."""

    kind: str
    #: One plain sentence for the kind.
    sentence: str
    #: What the broker or the network said, short and without credentials ("" when nothing).
    detail: str

    def __str__(self) -> str:
        return f"{self.sentence} ({self.detail})" if self.detail else self.sentence


def _chain(error: BaseException) -> list[BaseException]:
    """The error, the pika errors a ConnectionClosed keeps, and what each one wraps."""
    seen: list[BaseException] = []
    pending = [error, *getattr(error, "causes", ())]
    while pending and len(seen) < 20:
        current = pending.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        for candidate in (*getattr(current, "args", ()), getattr(current, "exception", None)):
            if isinstance(candidate, BaseException):
                pending.append(candidate)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return seen


def _kind(chain: list[BaseException]) -> str:
    for error in chain:
        # The library's own errors may say their kind (a missing queue, for instance).
        stated = getattr(error, "failure_kind", None)
        if isinstance(stated, str) and stated in _SENTENCES:
            return stated
        if isinstance(error, BrokerRefused):
            return ACCESS_REFUSED if error.reply_code == 403 else REFUSED
        facts = cause_facts(error)
        if facts.timeout or isinstance(error, socket.timeout | TimeoutError):
            return TIMEOUT
        if facts.login_refused:
            return ACCESS_REFUSED
        if facts.connection_reply is not None:
            code, text = facts.connection_reply
            if code == 530 and "vhost" in text and "not found" in text:
                return NO_VHOST
            if code in (403, 530):
                return ACCESS_REFUSED
        if facts.channel_reply is not None:
            if facts.channel_reply[0] == 403:
                return ACCESS_REFUSED
            if facts.channel_reply[0] == 404:
                return MISSING
            return REFUSED
        if facts.handshake_refused:
            # During the handshake, before the broker said why: usually the virtual host.
            continue
        if isinstance(error, socket.gaierror | ConnectionRefusedError | OSError):
            return UNREACHABLE
    text = " ".join(str(e) for e in chain)
    if "no answer" in text and "within" in text:
        return TIMEOUT
    if any(cause_facts(e).handshake_refused for e in chain):
        return NO_VHOST if "vhost" in text else ACCESS_REFUSED
    if any(isinstance(e, ConnectionClosed) for e in chain):
        return UNREACHABLE
    if any(isinstance(e, PublishError) for e in chain):
        return REFUSED
    return REFUSED


#: A broker's reply as pika writes it into its errors' text: ``(530) 'NOT_ALLOWED - ...'``.
_REPLY = re.compile(r"\((\d{3})\) '([^']*)'")

#: ``host:port`` of each broker node a :class:`ConnectionClosed` names.
_NODE = re.compile(r"(?:node |; |\()([^\s;:()]+:\d+):")


def _nodes(chain: list[BaseException]) -> str:
    found: list[str] = []
    for error in chain:
        if isinstance(error, ConnectionClosed):
            found += [n for n in _NODE.findall(str(error)) if n not in found]
    return ", ".join(found)


def _detail(chain: list[BaseException], kind: str) -> str:
    said = _said(chain, kind)
    nodes = _nodes(chain)
    if nodes:
        return f"broker {'node' if ',' not in nodes else 'nodes'} {nodes}" + (
            f": {said}" if said else ""
        )
    return said


def _said(chain: list[BaseException], kind: str) -> str:
    if kind == TIMEOUT:
        for error in chain:
            text = str(error)
            if "within" in text:
                start = text.find("no answer") if "no answer" in text else 0
                return redact_text(text[start:])[:200]
        return ""
    for error in chain:
        said = _REPLY.search(str(error)) if not isinstance(error, ConnectionClosed) else None
        if said:
            return redact_text(f"{said.group(1)} {said.group(2)}")[:300]
    for error in reversed(chain):
        facts = cause_facts(error)
        reply = facts.connection_reply or facts.channel_reply
        if reply is not None:
            return redact_text(f"{reply[0]} {reply[1]}")[:300]
        if isinstance(error, OSError) and error.strerror:
            return redact_text(error.strerror)[:300]
    top = chain[0]
    if isinstance(top, ConsumerError):
        return redact_text(str(top))[:300]
    return ""


def describe_failure(error: BaseException, *, kind: str | None = None) -> BrokerFailure:
    """The kind of ``error`` (any error a broker call raised) and what to tell the operator."""
    chain = _chain(error)
    found = kind or _kind(chain)
    return BrokerFailure(found, _SENTENCES[found], _detail(chain, found))
