"""Command line of the queue library: ``python -m consumer publish FILE``.

Publishes one environ (a JSON file, or ``-`` for standard input) to the results exchange with
publisher confirms and bounded retries, declaring the topology if it does not exist yet: what a
worker or a patched sioworkersd runs instead of POSTing to OIOIOI. Defaults come from the same
environment variables as the Django settings (``AMQP_URL``, ``RESULTS_EXCHANGE``...).

Exit status: 0 published and confirmed; 1 the broker could not be reached or did not accept the
message; 2 bad usage or input (unreadable file, not a JSON object, not a result environ).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from consumer.config import Settings, from_environ
from consumer.decode import parse_environ, validate
from consumer.errors import ConsumerError, PublishError, TransportError
from consumer.publish import Publisher

EXIT_OK = 0
EXIT_BROKER = 1
EXIT_INPUT = 2


def _environment() -> Settings:
    """The defaults of the options: the environment's settings, read as every client reads them."""
    try:
        return from_environ(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None


def build_parser() -> argparse.ArgumentParser:
    env = _environment()
    parser = argparse.ArgumentParser(prog="python -m consumer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser(
        "publish",
        help="publish one environ to the results exchange, with confirms",
        description="Publish one environ (a JSON object) to the results exchange and wait for "
        "the broker's confirm. Exit status: 0 confirmed, 1 broker failure, 2 bad input.",
    )
    pub.add_argument("file", help="JSON file holding the environ, or - for standard input")
    pub.add_argument(
        "--amqp-url",
        default=env.amqp_url,
        help="broker URL, or the URLs of a cluster's nodes separated by ';' (default: $AMQP_URL, "
        "else the local broker as guest)",
    )
    pub.add_argument(
        "--exchange",
        default=env.exchange,
        help="exchange to publish to (default: $RESULTS_EXCHANGE or %(default)s)",
    )
    pub.add_argument(
        "--routing-key",
        default=env.routing_key,
        help="routing key (default: $RESULTS_ROUTING_KEY or %(default)s)",
    )
    pub.add_argument(
        "--queue",
        default=env.queue,
        help="results queue declared and bound if missing (default: $RESULTS_QUEUE)",
    )
    pub.add_argument(
        "--dead-letter-queue",
        default=env.dead_letter_queue,
        help="dead-letter queue declared if missing (default: $RESULTS_DEAD_LETTER_QUEUE)",
    )
    pub.add_argument(
        "--retry-queue",
        default=env.retry_queue,
        help="retry queue declared if missing (default: $RESULTS_RETRY_QUEUE)",
    )
    pub.add_argument(
        "--queue-type",
        choices=("quorum", "classic"),
        default=env.queue_type,
        help="type of the queues if they must be declared (default: $RESULTS_QUEUE_TYPE or "
        "%(default)s); must match the existing queues",
    )
    pub.add_argument(
        "--retry-delay-ms",
        type=int,
        default=env.retry_delay_ms,
        help="TTL of the retry queue if it must be declared (default: $RESULTS_RETRY_DELAY_MS "
        "or %(default)s); must match the existing queue",
    )
    pub.add_argument(
        "--delivery-limit",
        type=int,
        default=env.delivery_limit,
        help="delivery limit of the results queue if it must be declared (default: "
        "$RESULTS_DELIVERY_LIMIT or %(default)s); must match the existing queue",
    )
    pub.add_argument(
        "--no-declare",
        action="store_true",
        default=not env.declare_topology,
        help="do not declare the exchange and queues (for a user without configure permission; "
        "default: on when $RESULTS_DECLARE_TOPOLOGY is false)",
    )
    pub.add_argument(
        "--message-id", help="message id (default: the environ's group_id, if it has one)"
    )
    pub.add_argument(
        "--timeout",
        type=float,
        default=env.publish_timeout,
        help="seconds to keep trying until the broker confirms, connecting and retrying "
        "included (default: $RESULTS_PUBLISH_TIMEOUT or %(default)g)",
    )
    pub.add_argument(
        "--attempts",
        type=int,
        help="most publish attempts within that time (default: as many as fit)",
    )
    pub.add_argument(
        "--force",
        action="store_true",
        help="publish a JSON object even if it is not a result environ (it will be dead-lettered)",
    )
    pub.add_argument("-v", "--verbose", action="store_true", help="log each attempt")
    return parser


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def publish_command(args: argparse.Namespace) -> int:
    try:
        body = _read(args.file)
    except OSError as e:
        print(f"error: cannot read {args.file}: {e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        env = parse_environ(body)
        if not args.force:
            validate(dict(env))
    except ConsumerError as e:
        hint = "" if args.force else " (--force publishes an object anyway)"
        print(f"error: {args.file} is not a result environ: {e}{hint}", file=sys.stderr)
        return EXIT_INPUT
    if args.attempts is not None and args.attempts < 1:
        print("error: --attempts must be at least 1", file=sys.stderr)
        return EXIT_INPUT
    if args.timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return EXIT_INPUT
    try:
        settings = _environment().replace(
            amqp_url=args.amqp_url,
            exchange=args.exchange,
            routing_key=args.routing_key,
            queue=args.queue,
            dead_letter_queue=args.dead_letter_queue,
            retry_queue=args.retry_queue,
            queue_type=args.queue_type,
            retry_delay_ms=args.retry_delay_ms,
            delivery_limit=args.delivery_limit,
            declare_topology=not args.no_declare,
            publish_timeout=args.timeout,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        # The body goes out as read, byte for byte; the parse above only checked it.
        with Publisher(settings, attempts=args.attempts) as publisher:
            message_id = publisher.publish(body, message_id=args.message_id)
    except (PublishError, TransportError) as e:
        print(f"error: not published: {e}", file=sys.stderr)
        return EXIT_BROKER
    print(
        f"published {len(body)} bytes to exchange {settings.exchange!r} "
        f"(routing key {settings.routing_key!r}, message id {message_id!r}), confirmed",
        file=sys.stderr,
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # pika narrates every connection step, and logs a refused connection as several errors with
    # a traceback; the command reports the outcome itself (-v: each node's state, each attempt).
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    if not args.verbose:
        # The final failure is reported once, on standard error, by the command itself.
        logging.getLogger("consumer").setLevel(logging.ERROR)
    if args.command == "publish":
        return publish_command(args)
    return EXIT_INPUT  # pragma: no cover (argparse requires a command)


if __name__ == "__main__":
    sys.exit(main())
