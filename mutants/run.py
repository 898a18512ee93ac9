"""``python -m mutants.run BACKEND CHECK...``: run contract checks against ``$MSGBUS_URL`` (quick, stopping at
the first failure) with the broker's restart hook, which ``msgbus contract`` has no way to take: a send that
does not wait for its confirm is caught across a broker restart. Prints the result table; exit 1 on a failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from msgbus.testing import run_contract

from .harness import EMBEDDED


def _hook(backend: str) -> Callable[[], Awaitable[None]] | None:
    if backend in EMBEDDED:
        return None
    from integration.brokers import resolve
    from integration.contract_urls import restart

    again = restart(resolve(backend))
    return lambda: asyncio.to_thread(again)


def main(argv: list[str]) -> int:
    backend, *checks = argv
    logging.getLogger("msgbus").setLevel(logging.ERROR)  # the checks provoke failures on purpose
    report = asyncio.run(
        run_contract(
            os.environ["MSGBUS_URL"],
            quick=True,
            restart_broker=_hook(backend),
            only=checks,
            progress=lambda line: print(line, flush=True),
            fail_fast=os.environ.get("MUTANT_FAIL_FAST") == "1",
        )
    )
    print()
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
