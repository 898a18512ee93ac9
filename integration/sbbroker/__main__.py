"""``python -m integration.sbbroker --port 5682 [--state FILE] [--lock-duration S]``: run the test broker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from types import FrameType

from .server import Broker, serve
from .store import Store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m integration.sbbroker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5682)
    parser.add_argument("--state", type=Path, help="JSON snapshot; changes go to a journal beside it (FILE.journal)")
    parser.add_argument("--lock-duration", type=float, default=30.0, help="seconds (every entity)")
    parser.add_argument(
        "--duplicate-detection",
        action="append",
        default=[],
        metavar="PATTERN=SECONDS",
        help="entities named like PATTERN (fnmatch) require duplicate detection with this history window "
        "(repeatable; the first matching pattern wins)",
    )
    parser.add_argument(
        "--partitioned",
        action="append",
        default=[],
        metavar="PATTERN",
        help="entities named like PATTERN are "
        "partitioned (duplicate detection per partition key; nothing else changes)",
    )
    parser.add_argument("--key-name", help="SharedAccessKeyName to accept (with --key-file)")
    parser.add_argument("--key-file", type=Path, help="file holding the SharedAccessKey that signs tokens")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("SBBROKER_DEBUG") else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    windows: dict[str, float] = {}
    for rule in args.duplicate_detection:
        pattern, _, seconds = rule.rpartition("=")
        if not pattern or not seconds.replace(".", "", 1).isdigit() or float(seconds) <= 0:
            parser.error(f"--duplicate-detection takes PATTERN=SECONDS (seconds > 0), got {rule!r}")
        windows.setdefault(pattern, float(seconds))
    store = Store(args.lock_duration, duplicate_detection=windows, partitioned=tuple(args.partitioned))
    if args.state is not None:
        store.open(args.state)  # the snapshot, the journal replayed over it; changes journaled from now on
    key = args.key_file.read_text().strip() if args.key_file else None
    broker = Broker(store, args.key_name, key, args.state)

    def stop(signum: int, frame: FrameType | None) -> None:
        broker.stopping = True  # the reactor's next timer tick saves the state and stops

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("sbbroker").info(
        "listening on %s:%d (lock duration %.1fs, %d journal entries replayed)",
        args.host,
        args.port,
        args.lock_duration,
        store.replayed,
    )
    serve(args.host, args.port, broker)


if __name__ == "__main__":
    main()
