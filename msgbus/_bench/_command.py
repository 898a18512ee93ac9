"""``msgbus bench URL``: throughput, latency and memory of msgbus on one backend, and the engine of ``benchmarks/``.

The command line of ``msgbus bench`` (and the entry of its child processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from ._contender import LostMessages
from ._processes import CHILD, run_child
from ._report import render_text
from ._session import Plan, bench


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="msgbus bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", metavar="URL", help="the bus to measure (it creates and drains bench-* queues)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median, min, max; default 3)")
    parser.add_argument("--messages", type=int, default=10_000, help="messages per batch/concurrent/consume run")
    parser.add_argument("--single-messages", type=int, default=2_000, help="messages per single-send run")
    parser.add_argument("--concurrency", type=int, default=16, help="run(concurrency=C) and concurrent senders")
    parser.add_argument("--batch", type=int, default=100, help="messages per send_many")
    parser.add_argument("--prefetch", type=int, help="consume credit (default: max(2 * concurrency, 16))")
    parser.add_argument("--size", type=int, action="append", help="body size in bytes (repeatable; 16 and 1024)")
    parser.add_argument("--latency-messages", type=int, default=1_000)
    parser.add_argument("--latency-rate", type=float, default=500.0, help="messages/s during the latency run")
    parser.add_argument(
        "--workload", action="append", choices=("publish", "consume", "latency", "pipeline"), help="repeatable"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    return Plan(
        sizes=tuple(args.size or (16, 1024)),
        messages=args.messages,
        single_messages=args.single_messages,
        batch=args.batch,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        latency_messages=args.latency_messages,
        latency_rate=args.latency_rate,
        runs=args.runs,
        workloads=tuple(args.workload or ("publish", "consume", "latency")),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``msgbus bench URL [options]``: measure msgbus on one backend; 0 ok, 1 when a run lost messages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD]:
        return run_child(argv[1])
    args = _args(argv)
    if args.url.startswith("memory:") and not args.workload:
        args.workload = ["publish", "latency", "pipeline"]
    elif args.url.startswith("sqlite:") and not args.workload:
        args.workload = ["publish", "consume", "latency", "pipeline"]
    try:
        result = asyncio.run(bench(args.url, {"msgbus": "msgbus._bench:MsgbusContender"}, plan_from(args), _stderr))
    except LostMessages as exc:
        print(f"msgbus bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(render_text(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
