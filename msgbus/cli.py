"""The ``msgbus`` command: send, consume and inspect messages on any backend, and run the demo.

Every command takes the bus URL as its first positional argument or as ``--url``; without one it
resolves the URL like ``msgbus.connect()`` (``MSGBUS_URL``, the config file, the embedded default).
Errors from msgbus print one line ``msgbus: error: ...`` and exit with status 2; URLs are always
shown redacted (``bus.url``), so secrets never reach the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import msgbus

from . import _demo, _progress, _registry
from ._bus import _check_name
from ._url import parse_url
from .errors import MsgbusError

__all__ = ["main"]

log = logging.getLogger("msgbus")

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
_SEND_CHUNK = 100  # messages per send_many call for --count
_POLL = 0.25  # seconds a receive waits before checking for Ctrl-C / SIGTERM again


class UsageError(Exception):
    """A command-line mistake argparse cannot see (bad JSON body, conflicting URL arguments)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msgbus`` command line; returns the exit status (0 ok, 1 failed check, 2 error, 130 Ctrl-C)."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in ("contract", "bench"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    command: Callable[[argparse.Namespace, list[str]], int] = args.run
    with _logging(args.verbose, quiet_warnings=args.command == "demo"):
        try:
            return command(args, extra)
        except SystemExit as exc:  # a delegated parser (contract) exiting on a usage error
            return exc.code if isinstance(exc.code, int) else EXIT_ERROR
        except (MsgbusError, UsageError) as err:
            print(f"msgbus: error: {printable(_one_line(err))}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("msgbus: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader went away (`msgbus consume ... | head`); unsettled ones were released
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # silence the flush at exit
            return EXIT_OK


# --- argument parsing -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msgbus",
        description="Send, consume and inspect messages on any msgbus backend, chosen by URL.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "msgbus demo                                  # the order-system demo on a fresh SQLite file",
            "msgbus send sqlite:///./bus.db orders '{\"id\": 1}' --json",
            "msgbus consume sqlite:///./bus.db orders --count 10",
            "msgbus info amqp://guest:guest@127.0.0.1:5672/",
            "",
            "Without a URL: MSGBUS_URL, then msgbus.toml ([bus.default] url=...), then sqlite:///./msgbus.db.",
            "memory:// lives inside one process: use sqlite:// (or a broker) to pass messages between commands.",
        ),
    )
    parser.add_argument("--version", action="version", version=f"msgbus {msgbus.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what msgbus does (retries, reconnects)")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = _command(
        commands,
        "demo",
        "run the order-system demo: retries, dead letters, fan-out, and a lost = 0 check",
        _run_demo,
        "msgbus demo",
        "msgbus demo --orders 1000 --workers 16",
        "msgbus demo --url memory:// --quiet",
        "",
        "Without --url the demo uses a fresh SQLite database in a temporary directory (removed afterwards).",
        "Exit status 1 when anything was lost.",
    )
    demo.add_argument("--url", help="bus to run on (default: a fresh temporary sqlite:// database)")
    demo.add_argument("--orders", type=_positive_int, default=200, metavar="N", help="orders to send (default 200)")
    demo.add_argument("--workers", type=_positive_int, default=8, metavar="N", help="order workers (default 8)")
    demo.add_argument("--quiet", action="store_true", help="no live progress, only the summary")

    send = _command(
        commands,
        "send",
        "send a message to a queue (or publish to a topic with --topic)",
        _run_send,
        "msgbus send sqlite:///./bus.db orders 'hello'",
        "msgbus send orders '{\"id\": 7}' --json --key customer-7 --header source=cli",
        "msgbus send sqlite:///./bus.db order-placed '{\"id\": 7}' --json --topic",
        "cat order.json | msgbus send sqlite:///./bus.db orders - --json",
        "",
        "BODY is sent as text (text/plain), as JSON with --json, or read from stdin with '-' (text if it is",
        "UTF-8, else bytes). The message ids are printed, one per line.",
    )
    _url_argument(send)
    send.add_argument("queue", metavar="QUEUE", help="queue name (the topic name with --topic)")
    send.add_argument("body", metavar="BODY", help="message body; '-' reads stdin")
    send.add_argument("--topic", action="store_true", help="publish to topic QUEUE instead of sending to a queue")
    send.add_argument("--key", help="ordering / partition key")
    send.add_argument(
        "--header", action="append", type=_header, default=[], metavar="K=V", help="a header (repeatable)"
    )
    send.add_argument("--json", action="store_true", help="BODY is JSON: send the parsed value")
    send.add_argument("--count", type=_positive_int, default=1, metavar="N", help="send N copies (default 1)")
    send.add_argument("--delay", type=float, metavar="SECONDS", help="deliver after a delay (if the backend can)")

    consume = _command(
        commands,
        "consume",
        "print messages from a queue as they arrive (acking them) until Ctrl-C",
        _run_consume,
        "msgbus consume sqlite:///./bus.db orders",
        "msgbus consume sqlite:///./bus.db orders --count 10 --json-lines",
        "msgbus consume sqlite:///./bus.db orders --no-ack           # peek: messages stay on the queue",
        "msgbus consume sqlite:///./bus.db orders --dead-letters     # what was dead-lettered, with reasons",
        "msgbus consume sqlite:///./bus.db order-placed --subscription audit",
        "",
        "Ctrl-C or SIGTERM stops it gracefully: no new messages are taken and unsettled ones are released.",
    )
    _url_argument(consume)
    consume.add_argument("queue", metavar="QUEUE", help="queue name (the topic name with --subscription)")
    consume.add_argument("--subscription", metavar="S", help="consume subscription S of topic QUEUE")
    _receive_options(consume)

    tail = _command(
        commands,
        "tail",
        "follow a topic through one subscription, printing each message",
        _run_tail,
        "msgbus tail sqlite:///./bus.db order-placed --subscription audit",
        "msgbus tail order-placed --subscription audit --json-lines",
        "",
        "The subscription is created if it does not exist; it receives what is published after that.",
    )
    _url_argument(tail)
    tail.add_argument("queue", metavar="TOPIC", help="topic name")
    tail.add_argument("--subscription", metavar="S", required=True, help="the (durable) subscription to read")
    _receive_options(tail)

    contract = _command(
        commands,
        "contract",
        "run the shipped contract suite against a backend",
        _run_contract,
        "msgbus contract memory://",
        "msgbus contract sqlite:///./contract.db --quick",
        "msgbus contract amqp://guest:guest@127.0.0.1:5672/ --only fan-out --only 'per-key ordering'",
        "",
        "NAME is a promise of the suite (its table lists them). Exit status 1 when a check failed.",
    )
    # Required: the suite creates and drains its own queues, so it should never run on a bus by accident.
    contract.add_argument("url", metavar="URL", help="the bus to test")
    contract.add_argument("--quick", action="store_true", help="the fast subset of the suite")
    contract.add_argument("--only", action="append", default=[], metavar="NAME", help="run only test NAME")
    contract.add_argument("--jobs", type=int, default=1, metavar="N", help="run N checks at once")
    contract.add_argument("--fail-fast", action="store_true", help="start no check after one failed")

    bench = _command(
        commands,
        "bench",
        "measure msgbus on a backend: publish and consume throughput, latency, memory",
        _run_bench,
        "msgbus bench memory://",
        "msgbus bench amqp://guest:guest@127.0.0.1:5672/ --runs 3 --json bench.json",
        "msgbus bench redis://127.0.0.1:6379/0 --workload consume --messages 20000 --concurrency 32",
        "",
        "Options (after URL): --runs N, --messages N, --single-messages N, --concurrency C, --batch N,",
        "--size BYTES (repeatable), --latency-messages N, --latency-rate PER_S, --workload NAME (repeatable:",
        "publish, consume, latency, pipeline), --json FILE. It creates and drains its own bench-* queues.",
        "Exit status 1 when a run lost, duplicated or mixed up a message.",
    )
    bench.add_argument("url", metavar="URL", help="the bus to measure")

    relay = _command(
        commands,
        "relay",
        "forward messages staged in a database's outbox table to a bus, until Ctrl-C or SIGTERM",
        _run_relay,
        "msgbus relay --from postgresql://app:pw@db:5432/orders --to kafka://broker:9092",
        "msgbus relay --from sqlite:///./app.db --to amqp://guest:guest@127.0.0.1:5672/ --table outbox",
        "",
        "At least once, in commit order per key, with the ids the messages were staged with (docs/outbox.md).",
        "Several relays may run against one database: one forwards, the others wait to take over.",
    )
    relay.add_argument(
        "--from", dest="source", required=True, metavar="DB", help="postgresql:// or sqlite:/// database"
    )
    relay.add_argument("--to", dest="target", required=True, metavar="URL", help="the bus to forward to")
    relay.add_argument("--table", default="msgbus_outbox", help="the outbox table (default msgbus_outbox)")
    relay.add_argument("--batch", type=_positive_int, default=100, metavar="N", help="rows per round (default 100)")

    redrive = _command(
        commands,
        "redrive",
        "move a queue's dead letters back to it (at least once: each is sent back before it is removed)",
        _run_redrive,
        "msgbus redrive sqlite:///./bus.db orders",
        "msgbus redrive sqlite:///./bus.db orders --limit 10",
        "msgbus redrive sqlite:///./bus.db orders --dry-run      # count them, move none",
        "msgbus redrive sqlite:///./bus.db order-placed --subscription billing",
        "",
        "Each keeps its id, key, body and headers; its attempt count starts again; why it died is kept in the",
        "x-msgbus-dead-letter-history header. A progress bar shows on a terminal with msgbus[cli] installed.",
    )
    _queue_arguments(redrive)
    redrive.add_argument("--limit", type=_positive_int, metavar="N", help="move at most N")
    redrive.add_argument("--dry-run", action="store_true", help="count the dead letters, move none")

    dlq = _command(
        commands,
        "dlq",
        "inspect dead letters",
        _run_dlq,
        "msgbus dlq list sqlite:///./bus.db orders",
        "msgbus dlq list sqlite:///./bus.db order-placed --subscription billing --limit 20",
        "",
        "Lists each dead letter's id, attempts and reason (control characters shown escaped); nothing is removed.",
    )
    dlq.add_argument("action", choices=["list"], help="what to do (list)")
    _queue_arguments(dlq)
    dlq.add_argument("--limit", type=_positive_int, default=100, metavar="N", help="list at most N (default 100)")

    purge = _command(
        commands,
        "purge",
        "remove every message waiting in a queue (or its dead letters), after a confirmation",
        _run_purge,
        "msgbus purge sqlite:///./bus.db orders",
        "msgbus purge sqlite:///./bus.db orders --dead-letters --yes",
        "",
        "Asks before removing anything unless --yes; without a terminal to ask on it refuses. Messages held by",
        "running consumers are not removed (they come back if not acked).",
    )
    _queue_arguments(purge)
    purge.add_argument("--dead-letters", action="store_true", help="purge its dead letters instead")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    delete = _command(
        commands,
        "delete",
        "delete a work queue with its messages and dead letters, after a confirmation",
        _run_delete,
        "msgbus delete sqlite:///./bus.db msgbus-reply-0123456789abcdef",
        "msgbus delete amqp://guest:guest@localhost/ old-orders --yes",
        "",
        "For queues nothing uses any more, such as the reply queue of a process that died before bus.close()",
        "(msgbus-reply-<16 hex>). Asks unless --yes; without a terminal to ask on it refuses. A queue that does",
        "not exist is not an error.",
    )
    _url_argument(delete)
    delete.add_argument("queue", metavar="QUEUE", help="queue name")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    stats = _command(
        commands,
        "stats",
        "show queue figures the backend reports: depth, in flight, dead letters, consumers, oldest message age",
        _run_stats,
        "msgbus stats sqlite:///./bus.db orders payments",
        "msgbus stats sqlite:///./bus.db order-placed/billing --json     # TOPIC/SUBSCRIPTION",
        "",
        "A figure the backend does not report is shown as '-' (left out with --json).",
    )
    stats.add_argument("url", metavar="URL", help="bus URL")
    stats.add_argument("queues", nargs="+", metavar="QUEUE", help="queue names, or TOPIC/SUBSCRIPTION")
    stats.add_argument("--json", action="store_true", help="one JSON object: {queue: {figure: value}}")

    info = _command(
        commands,
        "info",
        "show a backend's declared capabilities",
        _run_info,
        "msgbus info memory://",
        "msgbus info sqlite:///./bus.db --json",
    )
    _url_argument(info)
    info.add_argument("--json", action="store_true", help="print the capabilities as a JSON object")

    _command(commands, "schemes", "list the URL schemes with an installed adapter", _run_schemes, "msgbus schemes")
    return parser


def _command(
    commands: Any, name: str, summary: str, run: Callable[[argparse.Namespace, list[str]], int], *examples: str
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(command=name, run=run)
    return sub


def _examples(*lines: str) -> str:
    return "examples:\n" + textwrap.indent("\n".join(lines), "  ")


def _url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", nargs="?", help="bus URL (or --url; default: as msgbus.connect())")
    parser.add_argument("--url", dest="url_option", metavar="URL", help="bus URL, as an option")


def _queue_arguments(parser: argparse.ArgumentParser) -> None:
    """URL, QUEUE and --subscription: the operator commands' target (a queue, or a topic's subscription)."""
    _url_argument(parser)
    parser.add_argument("queue", metavar="QUEUE", help="queue name (the topic name with --subscription)")
    parser.add_argument("--subscription", metavar="S", help="subscription S of topic QUEUE")


def _receive_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")
    parser.add_argument("--idle", type=float, metavar="SECONDS", help="stop after SECONDS without a message")
    parser.add_argument("--no-ack", action="store_true", help="leave messages on the queue (released on exit)")
    parser.add_argument("--json-lines", action="store_true", help="one JSON object per message")
    parser.add_argument("--dead-letters", action="store_true", help="read what was dead-lettered from it instead")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"headers look like name=value, got {text!r}")
    return name, value


def _url(args: argparse.Namespace) -> str | None:
    """The URL from the positional argument or ``--url``; ``None`` lets ``msgbus.connect()`` resolve it."""
    positional: str | None = args.url
    option: str | None = args.url_option
    if positional is not None and option is not None:
        raise UsageError("give the URL once, either as an argument or with --url")
    return positional if positional is not None else option


# --- commands ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace, _extra: list[str]) -> int:
    out = sys.stdout
    progress = None if args.quiet else out
    live = progress is not None and out.isatty()

    def run(url: str) -> _demo.DemoResult:
        if progress is not None:
            print(f"msgbus demo: {args.orders} orders, {args.workers} workers on {printable(_redacted(url))}", file=out)
        return asyncio.run(_demo.run(url, orders=args.orders, workers=args.workers, out=progress, live=live))

    if args.url is not None:
        result = run(args.url)
    else:
        with _demo.fresh_sqlite_url() as url:
            result = run(url)
    print(("\n" if progress is not None else "") + result.summary(), file=out)
    return EXIT_OK if result.lost == 0 else EXIT_FAILED


def _run_send(args: argparse.Namespace, _extra: list[str]) -> int:
    body = _body(args.body, args.json)
    return asyncio.run(_send(_url(args), args, body))


async def _send(url: str | None, args: argparse.Namespace, body: object) -> int:
    headers = dict(args.header) or None
    async with msgbus.connect(url) as bus:
        sender = bus.publisher(args.queue) if args.topic else bus.producer(args.queue)
        ids: list[str] = []
        remaining = args.count
        while remaining:
            n = min(remaining, _SEND_CHUNK)
            items = [body] * n
            if isinstance(sender, msgbus.Publisher):
                ids += await sender.publish_many(items, key=args.key, headers=headers, delay=args.delay)
            else:
                ids += await sender.send_many(items, key=args.key, headers=headers, delay=args.delay)
            remaining -= n
        for message_id in ids:
            print(message_id)
        where = f"topic {args.queue!r}" if args.topic else f"queue {args.queue!r}"
        print(f"msgbus: sent {len(ids)} message(s) to {where} on {printable(bus.url)}", file=sys.stderr)
    return EXIT_OK


def _body(text: str, as_json: bool) -> object:
    """BODY as the value to send: text, parsed JSON, or stdin (text when it is UTF-8, else bytes)."""
    raw: str | bytes = sys.stdin.buffer.read() if text == "-" else text
    if as_json:
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"BODY is not valid JSON ({exc})") from None
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw
    return raw


def _run_consume(args: argparse.Namespace, _extra: list[str]) -> int:
    return asyncio.run(_consume(_url(args), args))


def _run_tail(args: argparse.Namespace, _extra: list[str]) -> int:
    return asyncio.run(_consume(_url(args), args))


async def _consume(url: str | None, args: argparse.Namespace) -> int:
    """Print messages until --count, --idle, Ctrl-C or SIGTERM; unsettled ones are released on the way out."""
    out = sys.stdout
    stop = asyncio.Event()
    received = 0
    unsettled: list[msgbus.Message[Any]] = []  # handed to us, not yet acked (all of them with --no-ack)
    # With --no-ack every message stays held until exit, so allow holding that many.
    prefetch = (args.count or 1000) if args.no_ack else None
    async with msgbus.connect(url) as bus:
        subscription: str | None = args.subscription
        consumer: msgbus.Consumer[Any]
        if args.dead_letters:
            consumer = bus.dead_letters(args.queue, subscription=subscription)
            what = f"dead letters of {_endpoint(args.queue, subscription)}"
        elif subscription is not None:
            consumer = bus.subscriber(args.queue, subscription=subscription, prefetch=prefetch)
            what = _endpoint(args.queue, subscription)
        else:
            consumer = bus.consumer(args.queue, prefetch=prefetch)
            what = _endpoint(args.queue, None)
        async with consumer:
            print(f"msgbus: consuming {what} on {printable(bus.url)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            loop = asyncio.get_running_loop()
            idle_since = loop.time()
            try:
                with _stop_on_signals(stop):
                    while not stop.is_set() and (args.count is None or received < args.count):
                        want = 100 if args.count is None else min(100, args.count - received)
                        batch = await consumer.receive(max_messages=want, timeout=_POLL)
                        if not batch:
                            if args.idle is not None and loop.time() - idle_since >= args.idle:
                                break
                            continue
                        idle_since = loop.time()
                        unsettled += batch
                        for msg in batch:
                            received += 1
                            _print_message(out, received, msg, args.json_lines)
                            if not args.no_ack:
                                await msg.ack()
                        unsettled = [m for m in unsettled if not m.settled]
            finally:
                for msg in unsettled:
                    await msg.nack()  # release: the next consumer gets it at once (attempt + 1)
        kept = f"; {len(unsettled)} left on the queue" if args.no_ack else ""
        print(f"msgbus: received {received} message(s) from {what}{kept}", file=sys.stderr)
    return EXIT_OK


def _endpoint(name: str, subscription: str | None) -> str:
    return f"subscription {subscription!r} of topic {name!r}" if subscription else f"queue {name!r}"


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into ``stop.set()`` for the duration (where the platform allows it)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _print_message(out: TextIO, n: int, msg: msgbus.Message[Any], json_lines: bool) -> None:
    """One message on ``out``; whatever the message holds, no control character or terminal escape sequence
    reaches the terminal (they are shown escaped, as ``\\x1b``), and each message keeps to its own lines."""
    if json_lines:
        record: dict[str, Any] = {
            "id": msg.id,
            "attempt": msg.attempt,
            "key": msg.key,
            "headers": dict(msg.headers),
            "correlation_id": msg.correlation_id,
            "content_type": msg.content_type,
            "timestamp": msg.timestamp,
        }
        if isinstance(msg.body, bytes):
            record["body_base64"] = base64.b64encode(msg.body).decode()
        else:
            record["body"] = msg.body
        out.write(json.dumps(record, ensure_ascii=False).translate(_JSON_ESCAPES) + "\n")
    else:
        headers = " ".join(f"{k}={v}" for k, v in msg.headers.items())
        meta = f"#{n} id={msg.id} attempt={msg.attempt} key={msg.key or '-'}" + (f" {headers}" if headers else "")
        out.write(f"{printable(meta)}\n  {printable(_text(msg.body))}\n")
    out.flush()


# Characters a terminal acts on rather than shows: C0 and C1 controls (ESC starts escape sequences, CSI is
# U+009B), DEL, line and paragraph separators, and the bidirectional overrides that reorder what is shown.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: repr(chr(c))[1:-1] if c < 0x7F else f"\\u{c:04x}" for c in _UNSAFE}
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x7F}  # json.dumps escapes C0 itself


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on shown as an escape (``\\x1b``, ``\\n``, ``\\u202e``)."""
    return text if text.isascii() and text.isprintable() else text.translate(_ESCAPES)


def _text(body: object) -> str:
    if isinstance(body, bytes):
        try:
            return body.decode()
        except UnicodeDecodeError:
            return f"<{len(body)} bytes> {body[:32].hex()}{'...' if len(body) > 32 else ''}"
    if isinstance(body, str):
        return body
    return json.dumps(body, ensure_ascii=False)


def _run_contract(args: argparse.Namespace, extra: list[str]) -> int:
    try:  # imported lazily (and by name): the suite pulls in pytest, which plain commands don't need
        contract_main: Callable[[list[str]], object] = importlib.import_module("msgbus.testing._cli").main
    except ImportError as exc:
        raise UsageError(f"the contract suite is not available ({exc})") from None
    argv = [args.url, *(["--quick"] if args.quick else []), *(["--jobs", str(args.jobs)] if args.jobs != 1 else [])]
    argv += ["--fail-fast"] if args.fail_fast else []
    for name in args.only:
        argv += ["--only", name]
    status = contract_main([*argv, *extra])
    return status if isinstance(status, int) else EXIT_OK


def _run_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from . import _bench  # lazily: plain commands don't need it

    return _bench.main([args.url, *extra])


def _run_relay(args: argparse.Namespace, _extra: list[str]) -> int:
    from .outbox import Relay  # lazily: plain commands don't need it

    relay = Relay(args.source, args.target, table=args.table, batch=args.batch)

    async def run() -> None:
        stop = asyncio.Event()
        with _stop_on_signals(stop):
            print(
                f"msgbus: relaying {args.table} of {_redacted(args.source)} to {_redacted(args.target)}",
                file=sys.stderr,
            )
            await relay.run(stop)

    asyncio.run(run())
    print(f"msgbus: forwarded {relay.forwarded} message(s), parked {relay.parked}", file=sys.stderr)
    return EXIT_OK


def _run_redrive(args: argparse.Namespace, _extra: list[str]) -> int:
    return asyncio.run(_redrive(_url(args), args))


async def _redrive(url: str | None, args: argparse.Namespace) -> int:
    async with msgbus.connect(url) as bus:
        what = _endpoint(args.queue, args.subscription)
        with _progress.Progress("redrive" if not args.dry_run else "dry run", sys.stderr) as bar:
            done = await bus.redrive(
                args.queue,
                subscription=args.subscription,
                limit=args.limit,
                dry_run=args.dry_run,
                progress=lambda moved, seen: bar.update(seen if args.dry_run else moved),
            )
        if args.dry_run:
            print(f"msgbus: {len(done.left)} dead letter(s) of {what} would move back (dry run: none moved)")
        else:
            left = f"; {len(done.left)} left" if done.left else ""
            print(f"msgbus: moved {len(done.moved)} dead letter(s) back to {what} on {printable(bus.url)}{left}")
    return EXIT_OK


def _run_dlq(args: argparse.Namespace, _extra: list[str]) -> int:
    return asyncio.run(_dlq_list(_url(args), args))


async def _dlq_list(url: str | None, args: argparse.Namespace) -> int:
    """Each dead letter's id, attempts and reason; all are released (nacked) at the end, so nothing is removed."""
    held: list[msgbus.Message[Any]] = []
    async with msgbus.connect(url) as bus:
        dead = bus.dead_letters(args.queue, subscription=args.subscription, prefetch=args.limit)
        async with dead:
            try:
                while len(held) < args.limit:
                    batch = await dead.receive(min(100, args.limit - len(held)), timeout=1.0)
                    if not batch:
                        break
                    held += batch
                rows = [
                    (m.id, str(m.dead_letter_attempts or "-"), m.dead_letter_reason or "-", _text(m.body)) for m in held
                ]
            finally:
                for msg in held:
                    await msg.nack()
        widths = [max([len(h), *(len(printable(r[i])) for r in rows)]) for i, h in enumerate(_DLQ_HEADER[:2])]
        print(f"{_DLQ_HEADER[0]:<{widths[0]}}  {_DLQ_HEADER[1]:<{widths[1]}}  {_DLQ_HEADER[2]}")
        for msg_id, attempts, reason, body in rows:
            line = f"{printable(msg_id):<{widths[0]}}  {attempts:<{widths[1]}}  {printable(reason)}"
            print(f"{line}\n{'':<{widths[0]}}  {'':<{widths[1]}}  body: {printable(body)[:120]}")
        print(f"msgbus: {len(rows)} dead letter(s) of {_endpoint(args.queue, args.subscription)}", file=sys.stderr)
    return EXIT_OK


_DLQ_HEADER = ("id", "attempts", "reason")


def _confirmed(args: argparse.Namespace, refusal: str, question: str) -> bool:
    """True with ``--yes`` or a "y" typed on the terminal; ``UsageError`` (``refusal``) without a terminal."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{refusal}: confirm on a terminal, or pass --yes")
    if input(f"{question} [y/N] ").strip().lower() in ("y", "yes"):
        return True
    print("msgbus: nothing removed", file=sys.stderr)
    return False


def _run_purge(args: argparse.Namespace, _extra: list[str]) -> int:
    url = _url(args)
    what = ("dead letters of " if args.dead_letters else "messages of ") + _endpoint(args.queue, args.subscription)
    question = f"Remove every waiting {what} on {printable(_redacted(url or ''))}?"
    if not _confirmed(args, f"purge removes every waiting message ({what})", question):
        return EXIT_FAILED
    return asyncio.run(_purge(url, args, what))


def _run_delete(args: argparse.Namespace, _extra: list[str]) -> int:
    url = _url(args)
    name = _check_name("queue", args.queue)
    what = f"queue {printable(name)} with its messages and dead letters"
    if not _confirmed(args, f"delete removes the {what}", f"Delete the {what} on {printable(_redacted(url or ''))}?"):
        return EXIT_FAILED
    return asyncio.run(_delete(url, name, what))


async def _delete(url: str | None, name: str, what: str) -> int:
    from .adapter import Endpoint

    async with msgbus.connect(url) as bus:
        await bus.adapter.delete(Endpoint("queue", name))
        print(f"msgbus: deleted the {what} on {printable(bus.url)}")
    return EXIT_OK


async def _purge(url: str | None, args: argparse.Namespace, what: str) -> int:
    removed = 0
    async with msgbus.connect(url) as bus:
        if args.dead_letters:
            consumer = bus.dead_letters(args.queue, subscription=args.subscription, prefetch=100)
        elif args.subscription is not None:
            consumer = bus.subscriber(args.queue, subscription=args.subscription, prefetch=100)
        else:
            consumer = bus.consumer(args.queue, prefetch=100)
        async with consumer:
            with _progress.Progress("purge", sys.stderr) as bar:
                while batch := await consumer.receive(100, timeout=1.0):
                    for msg in batch:
                        await msg.ack()
                    removed += len(batch)
                    bar.update(removed)
        print(f"msgbus: removed {removed} waiting {what} on {printable(bus.url)}")
    return EXIT_OK


def _run_stats(args: argparse.Namespace, _extra: list[str]) -> int:
    return asyncio.run(_stats(args))


async def _stats(args: argparse.Namespace) -> int:
    from .adapter import STATS, Endpoint

    found: dict[str, dict[str, float]] = {}
    async with msgbus.connect(args.url) as bus:
        for name in args.queues:
            topic, _, subscription = name.partition("/")
            endpoint = Endpoint("topic", topic, subscription) if subscription else Endpoint("queue", name)
            figures = await bus.adapter.stats(endpoint)
            if figures is None:
                raise UsageError(f"{type(bus.adapter).__name__} reports no queue figures ({printable(bus.url)})")
            found[name] = {k: figures[k] for k in STATS if k in figures}
    if args.json:
        print(json.dumps(found, indent=2).translate(_JSON_ESCAPES))
        return EXIT_OK
    width = max(5, *(len(printable(n)) for n in found))
    print(f"{'queue':<{width}}  " + "  ".join(f"{k:>12}" for k in STATS))
    for name, figures in found.items():
        cells = (_figure(figures.get(k)) for k in STATS)
        print(f"{printable(name):<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    return EXIT_OK


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if isinstance(value, float) else str(value)


def _run_info(args: argparse.Namespace, _extra: list[str]) -> int:
    bus = msgbus.connect(_url(args))  # nothing is opened: capabilities are declared, not discovered
    caps = bus.capabilities.as_dict()
    if args.json:
        shown = {"url": bus.url, "adapter": type(bus.adapter).__name__, "capabilities": caps}
        print(json.dumps(shown, indent=2).translate(_JSON_ESCAPES))
        return EXIT_OK
    rows = [("url", printable(bus.url)), ("adapter", f"{type(bus.adapter).__module__}.{type(bus.adapter).__name__}")]
    rows += [(name, _capability(name, value)) for name, value in caps.items()]
    _table(("capability", "value"), rows)
    return EXIT_OK


_UNITS = {"max_message_size": " bytes", "max_delay": " s", "lock_duration": " s"}


def _capability(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "no limit" if name.startswith("max_") else "-"
    if isinstance(value, float):
        return f"{value:g}{_UNITS.get(name, '')}"
    return f"{value}{_UNITS.get(name, '')}"


def _run_schemes(_args: argparse.Namespace, _extra: list[str]) -> int:
    installed = msgbus.schemes()
    targets = _registry._registered()
    rows = [(scheme, targets.get(scheme, "?")) for scheme in installed]
    missing = sorted(s for s in _registry.PACKAGES if s not in installed)
    rows += [(scheme, f"not installed: pip install {_registry.PACKAGES[scheme]}") for scheme in missing]
    _table(("scheme", "adapter"), rows)
    return EXIT_OK


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    width = max(len(header[0]), *(len(name) for name, _ in rows))
    print(f"{header[0]:<{width}}  {header[1]}")
    print(f"{'-' * width}  {'-' * len(header[1])}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


# --- helpers -------------------------------------------------------------------------------------------


def _redacted(url: str) -> str:
    """``url`` with secrets replaced, for display before a bus exists (falls back to the scheme alone)."""
    try:
        return parse_url(url).redacted
    except MsgbusError:
        return url.split("://", 1)[0] + "://..."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class _PrintableFormatter(logging.Formatter):
    """Log lines name message ids and failure reasons, which come from the wire: escape what they hold."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


@contextlib.contextmanager
def _logging(verbose: bool, *, quiet_warnings: bool) -> Iterator[None]:
    """Route msgbus's log to stderr as bare lines for the duration of one command.

    ``-v`` shows INFO (each retry); the demo hides the WARNING lines its dead letters cause on purpose.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(message)s"))
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.ERROR if quiet_warnings else logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
