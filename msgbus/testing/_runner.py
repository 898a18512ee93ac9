"""Run contract checks against a bus URL: each with a fresh bus and a total deadline; collect a report."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgbus
from msgbus._url import parse_url
from msgbus.errors import MsgbusError

from ._catalog import CHECKS
from ._context import ContractContext, ContractFailure, ContractSkip, RestartHook
from ._registry import Check, slugify

__all__ = ["CheckResult", "Report", "bus_options", "run_check", "run_contract", "select"]

Progress = Callable[[str], None]
OPEN_DEADLINE = 30.0  # seconds to connect before a check starts
CLEANUP_DEADLINE = 20.0  # seconds to close what a check opened


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check: ``pass``, ``fail`` (detail says what broke) or ``skip`` (detail is the reason)."""

    promise: str
    status: Literal["pass", "fail", "skip"]
    detail: str
    elapsed: float


@dataclass
class Report:
    """Results of a contract run, in check order."""

    url: str  # redacted
    quick: bool
    results: list[CheckResult] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)  # every option the bus ran with (``Bus.options``)

    @property
    def ok(self) -> bool:
        """No check failed (skips are not failures here; CI decides what a skip means)."""
        return all(r.status != "fail" for r in self.results)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    def table(self) -> str:
        """``promise | result | detail`` as a plain-text table, one row per check."""
        rows = [("promise", "result", "detail")]
        rows += [(r.promise, f"{r.status} {r.elapsed:.1f}s", r.detail.replace("\n", " | ")) for r in self.results]
        w0, w1 = (max(len(row[i]) for row in rows) for i in (0, 1))
        lines = [f"{a:<{w0}} | {b:<{w1}} | {c}" for a, b, c in rows]
        lines.insert(1, f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 6}")
        summary = f"{self.count('pass')} passed, {self.count('fail')} failed, {self.count('skip')} skipped"
        return "\n".join([*lines, "", f"{self.url}{' (quick)' if self.quick else ''}: {summary}", self.options_line()])

    def options_line(self) -> str:
        """``options: a=1 (given), b=2 (default), ...``: what the run proved the promises with."""
        given = _given(self.url)
        shown = [f"{k}={v}" + ("" if k in given else " (default)") for k, v in self.options.items()]
        return "options: " + (", ".join(shown) or "none")


def select(only: str | Iterable[str] | None) -> list[Check]:
    """The checks named in ``only`` (promise names or their slugs), in contract order; all when ``None``."""
    if only is None:
        return list(CHECKS)
    wanted = {slugify(n) for n in ([only] if isinstance(only, str) else only)}
    unknown = wanted - {c.slug for c in CHECKS}
    if unknown:
        names = ", ".join(repr(c.name) for c in CHECKS)
        raise ValueError(f"unknown check(s) {', '.join(sorted(unknown))}; the checks are: {names}")
    return [c for c in CHECKS if c.slug in wanted]


def _given(url: str) -> set[str]:
    try:
        return set(parse_url(url).options)
    except MsgbusError:
        return set()


def bus_options(url: str) -> dict[str, str]:
    """The options a bus on ``url`` runs with, defaults included (``Bus.options``); empty if it cannot be made."""
    try:
        return msgbus.connect(url).options  # connect() does no I/O
    except MsgbusError:
        return {}


def _redacted(url: str) -> str:
    try:
        return parse_url(url).redacted
    except MsgbusError:
        return "<malformed URL>"


def _where(exc: BaseException) -> str:
    """The innermost frame of an unexpected exception, to point at the failing line."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""


RESULTS_ENV = "MSGBUS_CONTRACT_RESULTS"
# Mutation runs (python -m mutants) kill a mutant that loses messages sooner: every deadline times this.
DEADLINE_SCALE_ENV = "MSGBUS_CONTRACT_DEADLINE_SCALE"


def _deadline_scale() -> float:
    try:
        scale = float(os.environ.get(DEADLINE_SCALE_ENV) or 1.0)
    except ValueError:
        return 1.0
    return scale if 0 < scale <= 1 else 1.0


# URL options that make a results file (a capability matrix column) of their own: (file suffix, option).
_VARIANTS = (("ordering", "ordering=per_key"), ("dedup", "duplicate_detection=true"))


async def run_check(
    check: Check, url: str, *, quick: bool = False, restart_broker: RestartHook | None = None
) -> CheckResult:
    """Run one check with a fresh, opened bus on ``url`` under the check's total deadline.

    With ``$MSGBUS_CONTRACT_RESULTS`` naming a directory, the result and the backend's declared
    capabilities are appended to ``<dir>/<scheme>.jsonl`` (the capability matrix is built from these), or to
    ``<dir>/<scheme>+ordering.jsonl`` when the URL asks for ``ordering=per_key`` (a column of its own: SQS FIFO),
    ``<dir>/<scheme>+dedup.jsonl`` for ``duplicate_detection=true`` (Service Bus).
    """
    ctx = ContractContext(url=url, quick=quick, restart_broker=restart_broker, slug=check.slug)
    result = await _run_check(check, ctx)
    directory = os.environ.get(RESULTS_ENV)
    if directory:
        caps = ctx.bus.capabilities.as_dict() if getattr(ctx, "bus", None) is not None else None
        line = {
            "url": _redacted(url),
            "quick": quick,
            "check": check.name,
            "status": result.status,
            "detail": result.detail,
            "elapsed": round(result.elapsed, 2),
            "capabilities": caps,
            "at": time.time(),
        }
        variant = next((f"+{name}" for name, option in _VARIANTS if re.search(rf"[?&]{option}(&|$)", url)), "")
        path = Path(directory) / f"{url.split('://', 1)[0]}{variant}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
    return result


async def _run_check(check: Check, ctx: ContractContext) -> CheckResult:
    started = time.monotonic()

    def result(status: Literal["pass", "fail", "skip"], detail: str) -> CheckResult:
        return CheckResult(check.name, status, detail, time.monotonic() - started)

    try:
        ctx.bus = ctx.connect()
        async with asyncio.timeout(OPEN_DEADLINE):
            await ctx.bus.open()
        reason = check.skip_reason(ctx.caps)
        if reason:
            return result("skip", reason)
        deadline = check.total_deadline(ctx.caps) * _deadline_scale()
        timer = asyncio.timeout(deadline)
        try:
            async with timer:
                await check.fn(ctx)
        except TimeoutError:
            if not timer.expired():
                raise
            done = f" (so far: {'; '.join(ctx.notes)})" if ctx.notes else ""
            died = ctx.failed_tasks()
            done += f"; background task(s) failed: {'; '.join(died)}" if died else ""
            return result("fail", f"deadline of {deadline:.0f}s passed while waiting for {ctx.waiting_for()}{done}")
        return result("pass", "; ".join(ctx.notes))
    except ContractSkip as skip:
        return result("skip", str(skip))
    except ContractFailure as failure:
        return result("fail", str(failure))
    except Exception as exc:
        return result("fail", f"{type(exc).__name__}: {exc}{_where(exc)}")
    finally:
        try:
            async with asyncio.timeout(CLEANUP_DEADLINE):
                await ctx.cleanup()
        except TimeoutError:
            pass


async def run_contract(
    url: str,
    *,
    quick: bool = False,
    restart_broker: RestartHook | None = None,
    only: str | Iterable[str] | None = None,
    progress: Progress | None = None,
    jobs: int = 1,
    fail_fast: bool = False,
    on_result: Callable[[CheckResult], None] | None = None,
) -> Report:
    """Run the contract (or the ``only`` checks) against ``url``, each check with a fresh bus.

    ``quick`` scales volumes down; ``restart_broker`` enables the reconnect check; ``progress`` receives a
    line as each check starts and ends. ``jobs`` runs that many checks at once (each on its own names);
    a check that restarts the broker still runs alone, after the others. ``fail_fast`` starts no check
    after one failed (those are left out of the report). ``on_result`` gets each result as its check ends.
    Never raises for a broken promise: read ``Report.ok`` / ``table()``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    checks = select(only)
    report = Report(_redacted(url), quick, options=bus_options(url))
    results: dict[str, CheckResult] = {}
    slots = asyncio.Semaphore(jobs)

    async def one(n: int, check: Check) -> None:
        async with slots:
            if fail_fast and any(r.status == "fail" for r in results.values()):
                return
            tag = f"[{n:>2}/{len(checks)}] {check.name}"
            if progress:
                progress(f"{tag} ...")
            res = await run_check(check, url, quick=quick, restart_broker=restart_broker)
            results[check.name] = res
            if on_result:
                on_result(res)
            if progress:
                progress(f"{tag}: {res.status} ({res.elapsed:.1f}s) {res.detail}")

    numbered = list(enumerate(checks, 1))
    await asyncio.gather(*(one(n, c) for n, c in numbered if not (jobs > 1 and c.alone)))
    for n, check in numbered:
        if jobs > 1 and check.alone:
            await one(n, check)
    report.results = [results[c.name] for c in checks if c.name in results]
    return report
