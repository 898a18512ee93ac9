"""``msgbus bench URL``: throughput, latency and memory of msgbus on one backend, and the engine of ``benchmarks/``.

The engine runs workloads against a ``Contender`` (msgbus here; raw clients and peer libraries in the
repository's ``benchmarks/`` package) and counts every message: each body carries a run tag and an index,
and a run that loses, duplicates or mixes up a message raises ``LostMessages`` instead of reporting a figure.

Workloads: ``publish`` (single awaited sends, ``send_many`` batches, concurrent single sends; the timed part
ends when the last send returned, then the messages are drained and counted untimed); ``consume`` (N messages
preloaded, then consumed with ack by a fresh child process, which reports its elapsed time and peak RSS);
``latency`` (one message at a time at a fixed rate, send call to handler entry); ``pipeline`` (send and
consume at once: one process on ``memory://``, a producer and a consumer process otherwise).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import secrets
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgbus

__all__ = ["Contender", "Figure", "LostMessages", "MsgbusContender", "OnBody", "Plan", "Tally", "bench", "main"]

_HEAD = struct.Struct("<IId")  # run tag, index, send time (time.perf_counter) -> 16 bytes
IDLE_TIMEOUT = 15.0  # seconds without a new message before a drain is declared lossy
_CHILD = "--child"


class LostMessages(Exception):
    """A run did not get back exactly what it sent: the figure would be garbage, so there is none."""


def make_body(tag: int, index: int, size: int, sent: float = 0.0) -> bytes:
    """A body of ``size`` bytes (at least 16) that names its run and its index."""
    head = _HEAD.pack(tag, index, sent)
    return head + b"x" * (size - len(head)) if size > len(head) else head


def read_body(body: bytes) -> tuple[int, int, float]:
    """(run tag, index, send time) of a body made by ``make_body``."""
    return _HEAD.unpack_from(body)


class Tally:
    """Counts the bodies of one run: distinct indexes, duplicates, and strays (bodies of another run)."""

    def __init__(self, tag: int, expected: int, on_complete: Callable[[], None] | None = None) -> None:
        self.tag = tag
        self.expected = expected
        self.seen = bytearray(expected)
        self.distinct = 0
        self.duplicates = 0
        self.strays = 0
        self.completed_at = 0.0  # time.perf_counter() when the last one arrived
        self.on_complete = on_complete

    def add(self, body: bytes) -> None:
        """Count one delivered body."""
        try:
            tag, index, _ = _HEAD.unpack_from(body)
        except struct.error:
            self.strays += 1
            return
        if tag != self.tag or index >= self.expected:
            self.strays += 1
            return
        if self.seen[index]:
            self.duplicates += 1
            return
        self.seen[index] = 1
        self.distinct += 1
        if self.distinct == self.expected:
            self.completed_at = time.perf_counter()
            if self.on_complete is not None:
                self.on_complete()

    @property
    def complete(self) -> bool:
        return self.distinct == self.expected

    def check(self, what: str) -> None:
        """Raise ``LostMessages`` unless every message arrived exactly once."""
        if self.distinct != self.expected or self.duplicates or self.strays:
            raise LostMessages(
                f"{what}: sent {self.expected}, received {self.distinct} distinct "
                f"(lost {self.expected - self.distinct}, duplicates {self.duplicates}, strays {self.strays})"
            )


OnBody = Callable[[bytes], None]


class Contender(abc.ABC):
    """One way of talking to a broker. Subclasses implement connect/send/consume the fastest idiomatic way."""

    name = "?"  # short column name: msgbus, raw, kombu, faststream
    label = "?"  # what it is: "aio-pika 10.2 (confirms)"
    modes: tuple[str, ...] = ("single", "batch", "concurrent")  # the publish modes it has
    latency = True  # can run the latency workload
    credit: int | None = None  # the consume workload's prefetch; None: msgbus's default for run(concurrency=C)

    def __init__(self, url: str) -> None:
        self.url = url

    def prefetch(self, concurrency: int) -> int:
        """The credit every contender grants when consuming: ``credit``, else msgbus's default ``max(2C, 16)``."""
        return self.credit or max(2 * concurrency, 16)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (untimed)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    def versions(self) -> dict[str, str]:
        """Library name -> version, for the report."""
        return {}

    async def server_version(self) -> str | None:
        """The broker's version, if this contender can ask."""
        return None

    @abc.abstractmethod
    async def send(self, queue: str, body: bytes) -> None:
        """Send one message; return once the broker confirmed it."""

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        """Send a batch (pipelined / native batch); return once every one was confirmed."""
        raise NotImplementedError

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        """Send ``bodies``: ``single`` awaits each send, ``batch`` sends batches, ``concurrent`` runs tasks."""
        if mode == "single":
            for body in bodies:
                await self.send(queue, body)
        elif mode == "batch":
            for i in range(0, len(bodies), batch):
                await self.send_batch(queue, bodies[i : i + batch])
        else:

            async def sender(mine: Sequence[bytes]) -> None:
                for body in mine:
                    await self.send(queue, body)

            await asyncio.gather(*(sender(bodies[k::concurrency]) for k in range(concurrency)))

    @abc.abstractmethod
    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        """Consume with ack, calling ``on_body`` once per delivery, until ``stop`` is set; then settle and return.

        ``on_body`` may be called from one thread other than the loop's (a blocking client); ``stop`` is set
        on the loop.
        """

    async def cleanup(self, queue: str) -> None:  # noqa: B027 - optional hook
        """Remove what ``queue`` left on the broker (best effort)."""


class MsgbusContender(Contender):
    """msgbus through its public API: ``send``/``send_many`` and ``consumer.run(handler, concurrency=C)``."""

    name = "msgbus"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"msgbus {msgbus.__version__}"
        self._bus: msgbus.Bus | None = None

    async def open(self) -> None:
        self._bus = msgbus.connect(self.url)
        await self._bus.open()

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()

    def _b(self) -> msgbus.Bus:
        assert self._bus is not None, "open() first"
        return self._bus

    def versions(self) -> dict[str, str]:
        """msgbus, the adapter package serving this URL's scheme, and the client libraries it depends on."""
        found = {"msgbus": msgbus.__version__}
        scheme = self.url.split(":", 1)[0]
        for ep in importlib.metadata.entry_points(group="msgbus.adapters", name=scheme):
            if ep.dist is None or ep.dist.name == "msgbus":
                continue
            found[ep.dist.name] = ep.dist.version
            for requirement in ep.dist.requires or ():
                parsed = re.match(r"([\w.-]+)(?:\[([^]]*)\])?", requirement)
                if parsed is None:
                    continue
                name, extras = parsed.groups()
                # an extra usually installs the package of its name too (redis[hiredis] -> hiredis)
                for lib in (name, *(extras or "").split(",")):
                    try:
                        found[lib.strip()] = importlib.metadata.version(lib.strip())
                    except (importlib.metadata.PackageNotFoundError, ValueError):
                        pass  # not installed (an optional extra), or no name
        return found

    async def send(self, queue: str, body: bytes) -> None:
        await self._b().producer(queue).send(body)

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        await self._b().producer(queue).send_many(bodies)

    async def publish(self, queue: str, bodies: Sequence[bytes], mode: str, batch: int, concurrency: int) -> None:
        producer = self._b().producer(queue)  # one producer, as a service would hold it
        if mode == "single":
            for body in bodies:
                await producer.send(body)
        elif mode == "batch":
            for i in range(0, len(bodies), batch):
                await producer.send_many(bodies[i : i + batch])
        else:
            await super().publish(queue, bodies, mode, batch, concurrency)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        # Not ``async with``: a consumer opened before run() keeps the prefetch it was opened with (16), while
        # run(concurrency=C) on an unopened one gets its documented default, max(2 * C, 16).
        consumer = self._b().consumer(queue, prefetch=self.credit)

        async def handle(msg: msgbus.Message[Any]) -> None:
            on_body(msg.payload)

        try:
            task = asyncio.create_task(consumer.run(handle, concurrency=concurrency))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            consumer.stop()
            stopping.cancel()
            await task
        finally:
            await consumer.close()


# --- workloads -------------------------------------------------------------------------------------


def new_tag() -> int:
    return secrets.randbits(32)


async def drain(contender: Contender, queue: str, tally: Tally, concurrency: int, what: str) -> float:
    """Consume until ``tally`` is complete; seconds to the last one. ``LostMessages`` after ``IDLE_TIMEOUT`` idle."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def complete() -> None:  # thread-safe: a blocking contender counts on its own thread
        loop.call_soon_threadsafe(stop.set)

    tally.on_complete = complete
    start = time.perf_counter()
    if tally.complete:
        return 0.0
    task = asyncio.create_task(contender.consume(queue, tally.add, concurrency, stop))
    waiter = asyncio.create_task(stop.wait())
    last = -1
    while not waiter.done() and not task.done() and tally.distinct != last:
        last = tally.distinct
        await asyncio.wait([waiter, task], timeout=IDLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await waiter
    await task
    tally.check(what if tally.complete else f"{what} (nothing new for {IDLE_TIMEOUT:.0f}s)")
    return tally.completed_at - start


async def publish_run(
    contender: Contender, queue: str, n: int, size: int, mode: str, batch: int, concurrency: int
) -> float:
    """msgs/s of sending ``n`` bodies in ``mode``; then drains and counts them (untimed)."""
    tag = new_tag()
    bodies = [make_body(tag, i, size) for i in range(n)]
    start = time.perf_counter()
    await contender.publish(queue, bodies, mode, batch, concurrency)
    elapsed = time.perf_counter() - start
    await drain(contender, queue, Tally(tag, n), 16, f"{contender.name} publish {mode} {size} B")
    return n / elapsed


async def latency_run(
    contender: Contender, queue: str, n: int, size: int, rate: float, warmup: int = 100
) -> list[float]:
    """Seconds from each send call to its handler, one message every ``1/rate`` s (after ``warmup`` unmeasured)."""
    tag = new_tag()
    total = warmup + n
    stop = asyncio.Event()
    tally = Tally(tag, total, stop.set)
    measured: list[float] = []

    def on_body(body: bytes) -> None:
        now = time.perf_counter()
        _, index, sent = read_body(body)
        if index >= warmup:
            measured.append(now - sent)
        tally.add(body)

    consumer = asyncio.create_task(contender.consume(queue, on_body, 1, stop))
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    next_at = loop.time()
    try:
        for i in range(total):
            next_at += period
            await contender.send(queue, make_body(tag, i, size, time.perf_counter()))
            pause = next_at - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
        await asyncio.wait([consumer, asyncio.ensure_future(stop.wait())], timeout=IDLE_TIMEOUT)
    finally:
        stop.set()
        await consumer
    tally.check(f"{contender.name} latency")
    return measured


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p99/p99.9 in milliseconds."""
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.50), "p99": at(0.99), "p99.9": at(0.999)}


# --- the consuming child process ---------------------------------------------------------------------


def load_contender(factory: str, url: str) -> Contender:
    """``module:Class`` -> an instance for ``url``."""
    module, _, attr = factory.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    contender: Contender = cls(url)
    return contender


async def _child_consume(spec: dict[str, Any]) -> dict[str, Any]:
    contender = load_contender(spec["factory"], spec["url"])
    contender.credit = spec.get("credit")
    await contender.open()
    rss_start = _peak_rss_mib()
    tally = Tally(spec["tag"], spec["n"])
    wall, perf = time.time(), time.perf_counter()
    elapsed = await drain(contender, spec["queue"], tally, spec["concurrency"], f"{contender.name} consume")
    await contender.close()
    return {
        "end": wall + (tally.completed_at - perf),
        "seconds": elapsed,
        "received": tally.distinct,
        "rss_start_mib": rss_start,
        "rss_peak_mib": _peak_rss_mib(),
    }


async def _child_produce(spec: dict[str, Any]) -> dict[str, Any]:
    contender = load_contender(spec["factory"], spec["url"])
    await contender.open()
    bodies = [make_body(spec["tag"], i, spec["size"]) for i in range(spec["n"])]
    start = time.time()
    await contender.publish(spec["queue"], bodies, "batch", spec["batch"], 1)
    end = time.time()
    await contender.close()
    return {"start": start, "end": end}


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across fork+exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _import_root(name: str) -> str:
    """The ``sys.path`` entry this process imported the top-level package of module ``name`` from."""
    module = importlib.import_module(name.split(".")[0])
    path = Path(module.__file__ or "").resolve()
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def _spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    # The child imports msgbus and the contender from where this process found them (a repository's
    # ``benchmarks`` package is not installed), never from whatever the working directory holds.
    roots = [_import_root("msgbus"), _import_root(spec["factory"].partition(":")[0])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *filter(None, [env.get("PYTHONPATH")])]))
    return subprocess.Popen(
        [sys.executable, "-m", "msgbus._bench", _CHILD, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env
    )


def _result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise LostMessages(f"{what}: child process failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def consume_run(
    contender: Contender,
    factory: str,
    queue: str,
    n: int,
    size: int,
    batch: int,
    concurrency: int,
    credit: int | None = None,
) -> dict[str, float]:
    """Preload ``n`` messages (untimed), then a fresh process consumes them with ack; msgs/s and its peak RSS."""
    tag = new_tag()
    bodies = [make_body(tag, i, size) for i in range(n)]
    fastest = "batch" if "batch" in contender.modes else contender.modes[-1]
    await contender.publish(queue, bodies, fastest, batch, 16)
    spec = {"role": "consume", "factory": factory, "url": contender.url, "queue": queue, "n": n, "tag": tag}
    spec["concurrency"], spec["credit"] = concurrency, credit
    proc = await asyncio.to_thread(_spawn, spec)
    got = await asyncio.to_thread(_result, proc, f"{contender.name} consume")
    return {
        "msgs_per_s": n / got["seconds"],
        "rss_peak_mib": got["rss_peak_mib"],
        "rss_start_mib": got["rss_start_mib"],
    }


async def pipeline_run(factory: str, url: str, n: int, size: int, batch: int, concurrency: int) -> float:
    """msgs/s from the first send to the last handled message, sending and consuming at once.

    ``memory://`` lives in one process, so both sides run there; any other URL gets a producer process
    and a consumer process (the consumer starts first and is connected before the clock starts).
    """
    tag = new_tag()
    queue = f"bench-pipe-{tag:08x}"
    if url.startswith("memory:"):
        contender = load_contender(factory, url)
        await contender.open()
        try:
            tally = Tally(tag, n)
            bodies = [make_body(tag, i, size) for i in range(n)]
            start = time.perf_counter()
            consumed = asyncio.create_task(drain(contender, queue, tally, concurrency, f"{contender.name} pipeline"))
            await contender.publish(queue, bodies, "batch", batch, 1)
            await consumed  # (its shutdown, up to one receive poll, is not part of the figure)
            return n / (tally.completed_at - start)
        finally:
            await contender.close()
    base = {"factory": factory, "url": url, "queue": queue, "n": n, "tag": tag, "size": size, "batch": batch}
    consumer = await asyncio.to_thread(_spawn, {**base, "role": "consume", "concurrency": concurrency})
    await asyncio.sleep(2.0)  # imports, connect and declare happen outside the clock
    producer = await asyncio.to_thread(_spawn, {**base, "role": "produce"})
    sent = await asyncio.to_thread(_result, producer, "pipeline producer")
    got = await asyncio.to_thread(_result, consumer, "pipeline consumer")
    return float(n / (got["end"] - sent["start"]))


# --- figures and the run plan ------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity for one contender: every run's value and their median, min and max."""

    workload: str  # publish / consume / latency / rss / pipeline
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


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def _redacted(url: str) -> str:
    try:
        from .._url import parse_url

        return parse_url(url).redacted
    except Exception:  # fail closed: a URL that does not parse may hold a password anywhere
        return url.split("://", 1)[0] + "://..."


def render_text(result: dict[str, Any]) -> str:
    """A plain table of one session: median [min-max] per contender."""
    names = list(result["contenders"])
    lines = [f"{result['url']}  ({result.get('server_version') or 'embedded'})"]
    header = f"{'workload':10} {'case':34}" + "".join(f"{n:>26}" for n in names)
    lines.append(header)
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for f in result["figures"]:
        rows.setdefault((f["workload"], f["case"], f["unit"]), {})[f["contender"]] = f
    for (workload, case, unit), by in rows.items():
        cells = []
        for n in names:
            f = by.get(n)
            cells.append(f"{_fmt(f['median'])} [{_fmt(f['min'])}-{_fmt(f['max'])}]" if f and f.get("runs") else "-")
        lines.append(f"{workload:10} {case + ' (' + unit + ')':34}" + "".join(f"{c:>26}" for c in cells))
    lines.append(f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


# --- command line ------------------------------------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> int:
    """``msgbus bench URL [options]``: measure msgbus on one backend; 0 ok, 1 when a run lost messages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_CHILD]:
        spec = json.loads(argv[1])
        run = _child_consume if spec["role"] == "consume" else _child_produce
        print(json.dumps(asyncio.run(run(spec))), flush=True)
        return 0
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
