"""``msgbus contract URL [--quick] [--only NAME]``: run the contract suite and print a table."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from .._progress import Progress
from ._catalog import CHECKS
from ._runner import CheckResult, Report, _redacted, bus_options, run_contract, select

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msgbus contract",
        description="Prove a backend keeps msgbus's promises: run the contract suite against URL.",
        epilog="checks: " + "; ".join(c.name for c in CHECKS),
    )
    parser.add_argument(
        "url", nargs="?", help="the bus URL to test (default: $MSGBUS_URL), e.g. amqp://guest:guest@127.0.0.1:5672/"
    )
    parser.add_argument("--quick", action="store_true", help="scale volumes down (the default is full volume)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this check (repeatable)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N checks at once (default 1); with a broker's default lock of 30-60 s most checks spend their "
        "time waiting out locks, so a run at defaults takes minutes where --jobs 20 takes the longest check",
    )
    parser.add_argument("--fail-fast", action="store_true", help="start no check after one failed")
    parser.add_argument("--verbose", action="store_true", help="show msgbus's own warnings while checks run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; prints progress and the result table. Returns 0 when nothing failed, 1 otherwise, 2 on usage."""
    args = _parser().parse_args(argv)
    url = args.url or os.environ.get("MSGBUS_URL")
    if not url:
        print("msgbus contract: give a bus URL (or set MSGBUS_URL)", file=sys.stderr)
        return 2
    if not args.verbose:  # the checks provoke failures on purpose; the runtime's warnings about them are noise here
        logging.getLogger("msgbus").setLevel(logging.ERROR)
    try:
        select(args.only)
    except ValueError as exc:
        print(f"msgbus contract: {exc}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("msgbus contract: --jobs must be >= 1", file=sys.stderr)
        return 2
    print(Report(_redacted(url), args.quick, options=bus_options(url)).options_line(), flush=True)
    done: list[CheckResult] = []
    # On a terminal with msgbus[cli]: a bar of checks done, each check's lines printed above it.
    with Progress("contract", sys.stdout, total=len(select(args.only)), unit="check") as bar:

        def ended(result: CheckResult) -> None:
            done.append(result)
            bar.update(len(done), f"{sum(1 for r in done if r.status == 'fail')} failed")

        report = asyncio.run(
            run_contract(
                url,
                quick=args.quick,
                only=args.only,
                progress=bar.write,
                jobs=args.jobs,
                fail_fast=args.fail_fast,
                on_result=ended,
            )
        )
    print()
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
