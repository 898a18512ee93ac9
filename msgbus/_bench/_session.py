"""Running a plan: a ``Session`` runs every workload of a ``Plan`` over the contenders on one broker, interleaved,
and keeps each measured quantity as a ``Figure`` (every run, with median, min and max).
"""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CapabilityMissing, ConfigError
from ._contender import Contender, MsgbusContender, load_contender
from ._processes import consume_run, pipeline_run
from ._report import _redacted, _size
from ._workloads import latency_run, ordering_run, percentiles, publish_run

# The ordering workload's two buses: the URL with each value of the ``ordering`` option.
ORDERINGS = ("none", "per_key")


@dataclass
class Figure:
    """One measured quantity for one contender: every run's value and their median, min and max."""

    workload: str  # publish / consume / latency / rss / pipeline / ordering
    case: str  # e.g. "single 16 B", "run(C=16) 1 KiB", "p99 1 KiB"
    contender: str
    unit: str
    runs: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        if self.runs:
            d.update(median=statistics.median(self.runs), min=min(self.runs), max=max(self.runs))
        return d


@dataclass
class Plan:
    """What to measure and how much of it."""

    sizes: tuple[int, ...] = (16, 1024)
    modes: tuple[str, ...] = ("single", "batch", "concurrent")
    messages: int = 10_000  # per batch/concurrent publish run and per consume run
    single_messages: int = 2_000  # per single-send run (each waits a round trip)
    batch: int = 100
    concurrency: int = 16
    prefetch: int | None = None  # consume credit; None: msgbus's default for run(concurrency=C), max(2C, 16)
    latency_messages: int = 1_000
    latency_rate: float = 500.0
    ordering_messages: int = 2_000  # per ordering run (SQS FIFO and Service Bus sessions are slow: keep it modest)
    keys: int = 64  # distinct keys of the ordering workload
    runs: int = 3
    workloads: tuple[str, ...] = ("publish", "consume", "latency")


class Session:
    """Runs a plan over contenders on one broker, interleaved: every run of a case visits each contender in turn."""

    def __init__(self, url: str, contenders: dict[str, str], plan: Plan, log: Callable[[str], None]) -> None:
        self.url = url
        self.factories = contenders  # name -> "module:Class"
        self.plan = plan
        self.log = log
        self.figures: dict[tuple[str, str, str], Figure] = {}
        self.skipped: list[str] = []

    def _figure(self, workload: str, case: str, contender: str, unit: str) -> Figure:
        key = (workload, case, contender)
        if key not in self.figures:
            self.figures[key] = Figure(workload, case, contender, unit)
        return self.figures[key]

    async def _each(self, opened: dict[str, Contender], what: str, step: Callable[[str, Contender], Any]) -> None:
        for r in range(self.plan.runs):
            names = list(opened)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
            for name in names:
                self.log(f"{what} run {r + 1}/{self.plan.runs}: {name}")
                await step(name, opened[name])

    async def run(self) -> dict[str, Any]:
        p = self.plan
        opened: dict[str, Contender] = {}
        queues: dict[str, str] = {}
        load_start = os.getloadavg()
        try:
            for name, factory in self.factories.items():
                contender = load_contender(factory, self.url)
                await contender.open()
                opened[name] = contender
                queues[name] = f"bench-{name}-{secrets.token_hex(3)}"
            info = await self._info(opened)
            if "publish" in p.workloads:
                for size in p.sizes:
                    for mode in p.modes:
                        await self._publish_case(opened, queues, size, mode)
            if "consume" in p.workloads:
                await self._consume_case(opened, queues)
            if "latency" in p.workloads:
                await self._latency_case(opened, queues)
            if "ordering" in p.workloads and "msgbus" in self.factories:
                await self._ordering_case(self.factories["msgbus"])
        finally:
            janitor = opened.get("raw")  # the raw client can also remove what the libraries left behind
            for name, contender in opened.items():
                try:
                    await contender.cleanup(queues[name])
                    if janitor is not None and janitor is not contender:
                        await janitor.cleanup(queues[name])
                finally:
                    if contender is not janitor:
                        await contender.close()
            if janitor is not None:
                await janitor.close()
        info["machine"]["loadavg_start"] = list(load_start)
        info["machine"]["loadavg_end"] = list(os.getloadavg())
        info["plan"] = asdict(p)
        info["skipped"] = self.skipped
        info["figures"] = [f.summary() for f in self.figures.values()]
        return info

    async def _info(self, opened: dict[str, Contender]) -> dict[str, Any]:
        libraries: dict[str, str] = {}
        server = None
        for c in opened.values():
            libraries.update(c.versions())
            server = server or await c.server_version()
        return {
            "url": _redacted(self.url),
            "server_version": server,
            "contenders": {name: c.label for name, c in opened.items()},
            "libraries": libraries,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    async def _publish_case(self, opened: dict[str, Contender], queues: dict[str, str], size: int, mode: str) -> None:
        p = self.plan
        n = p.single_messages if mode == "single" else p.messages
        able = {k: c for k, c in opened.items() if mode in c.modes}
        for k in opened.keys() - able.keys():
            self.skipped.append(f"publish {mode} {_size(size)}: {k} has no {mode} send")
        case = f"{mode} {_size(size)}"

        async def step(name: str, c: Contender) -> None:
            rate = await publish_run(c, queues[name], n, size, mode, p.batch, p.concurrency)
            self._figure("publish", case, name, "msgs/s").runs.append(rate)

        await self._each(able, f"publish {case}", step)

    async def _consume_case(self, opened: dict[str, Contender], queues: dict[str, str]) -> None:
        p = self.plan
        size = max(p.sizes)
        credit = "" if p.prefetch is None else f" prefetch {p.prefetch}"
        case = f"C={p.concurrency}{credit} {_size(size)}"

        async def step(name: str, c: Contender) -> None:
            q, n = queues[name], p.messages
            got = await consume_run(c, self.factories[name], q, n, size, p.batch, p.concurrency, p.prefetch)
            self._figure("consume", case, name, "msgs/s").runs.append(got["msgs_per_s"])
            self._figure("rss", f"peak of the consuming process{credit}", name, "MiB").runs.append(got["rss_peak_mib"])

        await self._each(opened, f"consume {case}", step)

    async def _latency_case(self, opened: dict[str, Contender], queues: dict[str, str]) -> None:
        p = self.plan
        size = max(p.sizes)
        able = {k: c for k, c in opened.items() if c.latency}
        for k in opened.keys() - able.keys():
            self.skipped.append(f"latency: {k} (no asyncio send path to time it fairly)")

        async def step(name: str, c: Contender) -> None:
            got = percentiles(await latency_run(c, queues[name], p.latency_messages, size, p.latency_rate))
            for q, ms in got.items():
                self._figure("latency", f"{q} {_size(size)} @ {p.latency_rate:g}/s", name, "ms").runs.append(ms)

        await self._each(able, "latency", step)

    async def _ordering_case(self, factory: str) -> None:
        """msgbus consuming keyed messages with ``ordering=none`` and ``ordering=per_key`` on this broker, in turn:
        the cost of per-key order is the ratio. A backend that refuses ``per_key`` is skipped, saying why."""
        p = self.plan
        size = max(p.sizes)
        case = f"C={p.concurrency} {p.keys} keys {_size(size)}"
        opened: dict[str, Contender] = {}
        queues = {name: f"bench-order-{name.replace('_', '')}-{secrets.token_hex(3)}" for name in ORDERINGS}
        try:
            for name in ORDERINGS:
                contender = load_contender(factory, _with_option(self.url, f"ordering={name}"))
                if not isinstance(contender, MsgbusContender):
                    raise TypeError(f"the ordering workload needs a MsgbusContender, got {factory}")
                contender.keys = p.keys
                try:
                    await contender.open()
                except (CapabilityMissing, ConfigError) as exc:
                    await contender.close()
                    self.skipped.append(f"ordering: ordering={name} refused by this backend: {exc}")
                    return
                opened[name] = contender

            async def step(name: str, c: Contender) -> None:
                rate, disorder = await ordering_run(
                    c, queues[name], p.ordering_messages, size, p.keys, p.batch, p.concurrency
                )
                self._figure("ordering", case, name, "msgs/s").runs.append(rate)
                self._figure("ordering", f"out of key order, {case}", name, "msgs").runs.append(disorder)

            await self._each(opened, f"ordering {case}", step)
        finally:
            for name, contender in opened.items():
                try:
                    await contender.cleanup(queues[name])
                finally:
                    await contender.close()


def _with_option(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


async def pipeline_figures(factory: str, url: str, plan: Plan, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The ``pipeline`` workload for one contender (embedded backends): one figure per body size."""
    figures = []
    for size in plan.sizes:
        fig = Figure("pipeline", f"send+consume C={plan.concurrency} {_size(size)}", "msgbus", "msgs/s")
        for r in range(plan.runs):
            log(f"pipeline {_size(size)} run {r + 1}/{plan.runs}")
            fig.runs.append(await pipeline_run(factory, url, plan.messages, size, plan.batch, plan.concurrency))
        figures.append(fig.summary())
    return figures


async def bench(url: str, contenders: dict[str, str], plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``plan`` on ``url`` for every contender; the ``pipeline`` workload runs for msgbus only."""
    scoped = Plan(**{**asdict(plan), "workloads": tuple(w for w in plan.workloads if w != "pipeline")})
    if url.startswith("memory:"):  # a memory:// bus lives in one process: no child-process consume
        scoped.workloads = tuple(w for w in scoped.workloads if w != "consume")
    result = await Session(url, contenders, scoped, log).run()
    if "pipeline" in plan.workloads and "msgbus" in contenders:
        result["figures"] += await pipeline_figures(contenders["msgbus"], url, plan, log)
    return result
