"""The failure suite's engine: a producer and a consumer stream messages through a fault, counted exactly.

One *scenario* is a fault with a timeline (``Fault``): connection resets, latency, a blackhole, broker
restarts, a cluster leader killed. ``run_scenario`` starts a consumer (``run()``, its own bus) and paced
senders (their own bus), lets deliveries begin, runs the fault while both are busy, then waits for every
message whose send returned. Senders retry a send that raised with the same ``message_id`` until it returns.

What is measured (``Outcome``): sent (sends that returned), delivered (distinct ids received), lost (sent but
never delivered: must be 0), duplicates (deliveries beyond the first: reported, never failed), sends that
raised (each retried), the longest pause in deliveries (recovery time), and any hang: a send that did not
return within its bound, deliveries that did not complete within the backend's bound after the fault healed,
a consumer that did not stop. Nothing here knows a broker: backends come as URLs and a ``Target``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgbus
from msgbus.errors import MsgbusError

from ._toxiproxy import Toxiproxy

# MSGBUS_CHAOS_QUICK=1 (make test, CI): the same faults with shorter calm between them.
QUICK = os.environ.get("MSGBUS_CHAOS_QUICK") == "1"
WARM_UP = 1.0 if QUICK else 2.0  # seconds of undisturbed stream before a fault starts
TAIL = 1.0 if QUICK else 3.0  # seconds of stream after the fault healed
CALM = 1.5 if QUICK else 3.0  # seconds between two resets or two restarts
DOWN = 5.0 if QUICK else 10.0  # seconds a killed cluster node stays down
AT_DEFAULTS = "blackhole-defaults"  # the blackhole scenario again, with no timeout shortened by the row
SENDERS = 16  # concurrent sending tasks, so sends are in flight whenever a fault strikes
CONCURRENCY = 8  # the consumer's handlers
RETRY_PAUSE = 0.5  # seconds before a send that raised is tried again
STOP_BOUND = 60.0  # seconds a consumer's stop() and a bus's close() may take


@dataclass
class Target:
    """What a fault acts on: the backend's proxies in Toxiproxy, and its broker's lifecycle where we own it."""

    proxy: Toxiproxy
    proxies: tuple[str, ...]
    restart: Callable[[bool], None] | None = None  # restart(hard): stop (SIGKILL when hard), start, wait ready
    # Clusters: failover(queue) kills the node leading ``queue`` mid-stream and brings it back (returns a note);
    # prepare(queue) runs before the buses open (e.g. declares the queue through another node than theirs).
    failover: Callable[[str], Awaitable[str]] | None = None
    prepare: Callable[[str], Awaitable[None]] | None = None
    queue: str = ""

    async def toxic(self, toxic: str, kind: str, streams: tuple[str, ...], **attributes: float) -> None:
        """Add the same toxic to every proxy of the backend, in each direction of ``streams``."""
        for name in self.proxies:
            for stream in streams:
                await asyncio.to_thread(self.proxy.add, name, f"{toxic}-{stream}", kind, stream, **attributes)  # type: ignore[arg-type]

    async def heal(self) -> None:
        """Remove every toxic: traffic flows unharmed again."""
        for name in self.proxies:
            await asyncio.to_thread(self.proxy.clear, name)


Fault = Callable[[Target], Awaitable[str]]


@dataclass(frozen=True)
class Scenario:
    """A named fault; ``length`` is about how long it lasts (the stream is paced to cover it)."""

    name: str
    fault: Fault
    length: float
    needs: Literal["proxy", "restart", "failover"] = "proxy"
    describe: str = ""
    # The consumer takes half the send rate until the fault is over, so a backlog is stored in the broker
    # when the fault strikes.
    backlog: bool = False


@dataclass
class Outcome:
    """One backend x scenario run. ``status``: pass, fail, or limit (a limit of a test double, with evidence)."""

    backend: str
    scenario: str
    status: Literal["pass", "fail", "limit"]
    sent: int
    delivered: int
    lost: int
    duplicates: int
    raised: int
    recovery: float
    elapsed: float
    detail: str
    fault: str = ""
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.backend} / {self.scenario}: {self.status}: {self.sent} sent, {self.delivered} delivered, "
            f"{self.lost} lost, {self.duplicates} dup, {self.raised} sends raised (retried), longest pause in "
            f"deliveries {self.recovery:.1f}s, {self.elapsed:.0f}s; {self.fault}"
            + (f"; problems: {'; '.join(self.problems)}" if self.problems else "")
        )


class _Deliveries:
    """Arrival times per message id, duplicates included."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.times: list[float] = []
        self.changed = asyncio.Event()

    def add(self, msg_id: str) -> None:
        self.counts[msg_id] = self.counts.get(msg_id, 0) + 1
        self.times.append(time.monotonic())
        self.changed.set()

    def longest_pause(self, since: float) -> float:
        """The longest time without a delivery from ``since`` (when the fault struck) to the last delivery."""
        times = [since, *(t for t in self.times if t >= since)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def run_scenario(
    backend: str,
    url: str,
    scenario: Scenario,
    target: Target,
    *,
    messages: int,
    send_bound: float,
    recover_bound: float,
    limit: str | None = None,
) -> Outcome:
    """Stream ``messages`` through ``scenario`` on ``url``; never raises for a broken promise (see Outcome).

    ``send_bound``: seconds one send may take before it counts as a hang (the adapter's documented send
    timeout plus slack). ``recover_bound``: seconds after the fault healed (and sending ended) by which every
    sent message must have been delivered. ``limit``: the reason a test double cannot honour this scenario;
    the run then reports ``limit`` when it lost messages, and fails when it did not (the limit is stale).
    """
    run_id = uuid.uuid4().hex[:8]
    queue = f"chaos-{scenario.name}-{run_id}"
    deliveries = _Deliveries()
    sent: set[str] = set()
    raised: dict[str, int] = {}
    problems: list[str] = []
    target.queue = queue
    if target.prepare is not None:
        await target.prepare(queue)
    began = time.monotonic()
    pace = (WARM_UP + scenario.length + TAIL) / messages
    # Until the fault is over, a backlog scenario's consumer takes half the send rate (then full speed).
    slow = [2 * CONCURRENCY * pace if scenario.backlog else 0.0]

    async def handle(msg: msgbus.Message[Any]) -> None:
        deliveries.add(msg.id)
        if slow[0]:
            await asyncio.sleep(slow[0])

    consumer_bus = msgbus.connect(url)
    producer_bus = msgbus.connect(url)
    await consumer_bus.open()
    await producer_bus.open()
    consumer = consumer_bus.consumer(queue)
    await consumer.open()
    run_task = asyncio.create_task(consumer.run(handle, concurrency=CONCURRENCY))
    producer = producer_bus.producer(queue)
    next_index = iter(range(messages))
    streaming = time.monotonic()  # the stream's pace starts once everything is open

    async def sender() -> None:
        for i in next_index:
            due = streaming + i * pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            msg_id = f"{run_id}-{i}"
            while True:
                try:
                    await asyncio.wait_for(producer.send({"i": i}, message_id=msg_id), send_bound)
                except TimeoutError:
                    problems.append(f"a send hung past {send_bound:.0f}s (retried)")
                except MsgbusError as exc:  # not acked-as-sent: retried with the same message id
                    key = type(exc).__name__
                    raised[key] = raised.get(key, 0) + 1
                else:
                    sent.add(msg_id)
                    break
                await asyncio.sleep(RETRY_PAUSE)

    senders = [asyncio.create_task(sender()) for _ in range(SENDERS)]
    fault_note = ""
    healed = struck = time.monotonic()
    try:
        await asyncio.sleep(WARM_UP)
        # The fault strikes a live stream: once deliveries have begun (a consumer may take seconds to attach).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(deliveries.changed.wait(), STOP_BOUND)
        if not deliveries.times:
            problems.append(f"no delivery within {STOP_BOUND:.0f}s of the stream's start, before any fault")
        struck = time.monotonic()
        fault_note = await scenario.fault(target)
        healed = time.monotonic()
        slow[0] = 0.0
        await asyncio.wait_for(asyncio.gather(*senders), timeout=recover_bound + messages * pace)
        deadline = max(healed, time.monotonic()) + recover_bound
        while not sent <= deliveries.counts.keys() and time.monotonic() < deadline:
            deliveries.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deliveries.changed.wait(), max(0.0, deadline - time.monotonic()))
        missing = len(sent - deliveries.counts.keys())
        if missing:
            problems.append(
                f"hang: {missing} sent messages not delivered {recover_bound:.0f}s after the fault healed and "
                "sending ended"
            )
        else:
            await asyncio.sleep(1.0)  # a redelivery right behind the last message shows up as a duplicate
    except TimeoutError:
        problems.append(f"hang: senders did not finish within {recover_bound:.0f}s after the stream's end")
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        await target.heal()
        consumer.stop()
        try:
            await asyncio.wait_for(run_task, STOP_BOUND)
        except TimeoutError:
            problems.append(f"hang: the consumer's run() did not stop within {STOP_BOUND:.0f}s")
        except Exception as exc:  # run() itself failing is a finding, reported with the counts
            problems.append(f"run() raised {type(exc).__name__}: {exc}")
        for bus in (consumer_bus, producer_bus):
            try:
                await asyncio.wait_for(bus.close(), STOP_BOUND)
            except TimeoutError:
                problems.append(f"hang: a bus did not close within {STOP_BOUND:.0f}s")
            except Exception as exc:  # a close error is reported, not raised past the counts
                problems.append(f"close raised {type(exc).__name__}: {exc}")

    lost = len(sent - deliveries.counts.keys())
    hung = [p for p in problems if p.startswith("hang")]
    status: Literal["pass", "fail", "limit"] = "pass" if not lost and not problems else "fail"
    if limit is not None:
        if lost or hung:
            status = "limit"
        else:
            problems.append(f"declared a limit of the double ({limit}) but nothing was lost: the limit is stale")
            status = "fail"
    n_raised = sum(raised.values())
    detail = ", ".join(f"{n} {name}" for name, n in sorted(raised.items())) or "no send raised"
    if limit is not None and status == "limit":
        detail = f"limit of the double: {limit}; {detail}"
    return Outcome(
        backend=backend,
        scenario=scenario.name,
        status=status,
        sent=len(sent),
        delivered=len(deliveries.counts),
        lost=lost,
        duplicates=len(deliveries.times) - len(deliveries.counts),
        raised=n_raised,
        recovery=round(deliveries.longest_pause(struck), 2),
        elapsed=round(time.monotonic() - began, 1),
        detail=detail,
        fault=fault_note,
        problems=problems,
    )


# --- the faults -------------------------------------------------------------------------------------------


async def _resets(target: Target) -> str:
    """Reset every connection (TCP RST) three times, alternating the direction the reset comes from."""
    streams = ("downstream", "upstream", "downstream")
    for stream in streams:
        await target.toxic("reset", "reset_peer", (stream,), timeout=0)
        await asyncio.sleep(0.5)  # reconnections made meanwhile are reset too
        await target.heal()
        await asyncio.sleep(CALM)
    return (
        f"3 resets of every connection (reset_peer: from the broker's side, the client's, the broker's), "
        f"{CALM + 0.5:.1f} s apart"
    )


async def _latency(target: Target) -> str:
    await target.toxic("latency", "latency", ("upstream", "downstream"), latency=200, jitter=100)
    await asyncio.sleep(10.0)
    await target.heal()
    return "200 ms +- 100 ms added in each direction for 10 s"


def blackhole(seconds: float) -> Fault:
    """Drop every byte in both directions for ``seconds`` (connections stay open: only a heartbeat tells)."""

    async def fault(target: Target) -> str:
        await target.toxic("blackhole", "timeout", ("upstream", "downstream"), timeout=0)
        await asyncio.sleep(seconds)
        await target.heal()
        return f"blackhole (bytes dropped both ways, connections left open) for {seconds:.0f} s"

    return fault


async def _restarts(target: Target) -> str:
    """Restart the broker twice while sends and receives are in flight: gracefully, then with SIGKILL."""
    if target.restart is None:
        raise RuntimeError("no restart hook")
    began = time.monotonic()
    await asyncio.to_thread(target.restart, False)
    clean = time.monotonic() - began
    await asyncio.sleep(CALM)
    began = time.monotonic()
    await asyncio.to_thread(target.restart, True)
    killed = time.monotonic() - began
    return f"broker restarted gracefully ({clean:.1f}s), then {CALM:.1f} s later SIGKILLed and started ({killed:.1f}s)"


async def _failover(target: Target) -> str:
    if target.failover is None:
        raise RuntimeError("no failover hook")
    return await target.failover(target.queue)


def scenarios(blackhole_seconds: float) -> list[Scenario]:
    """Every scenario, in report order; the blackhole lasts longer than the backend's dead-connection timeout."""
    return [
        Scenario("reset", _resets, 8.0, describe="connection reset mid-stream, both directions, 3 times"),
        Scenario("latency", _latency, 10.0, describe="latency 200 ms +- 100 ms both ways for 10 s"),
        Scenario(
            "blackhole",
            blackhole(blackhole_seconds),
            blackhole_seconds,
            describe="traffic silently dropped for longer than the client's heartbeat / timeout",
        ),
        Scenario(
            AT_DEFAULTS,
            blackhole(blackhole_seconds),
            blackhole_seconds,
            describe="the blackhole again with every timeout at msgbus's default, none shortened",
        ),
        Scenario("restart", _restarts, 15.0, "restart", "broker restarted (SIGTERM) then SIGKILLed mid-stream", True),
        Scenario("failover", _failover, 20.0, "failover", "the node leading the queue SIGKILLed, then back", True),
    ]
