"""``msgbus demo``: a small order system that shows retries, dead letters and fan-out, then proves nothing was lost.

Read it as example code. A producer sends orders to the work queue ``orders``. A pool of workers handles
them: some orders fail once (a payment timeout) and succeed on retry, some always fail (a declined card)
and are dead-lettered with the reason after ``RETRY.max_attempts`` deliveries. Every handled order
publishes an ``order-placed`` event, and three services (``inventory``, ``billing``, ``email``) each get
every event through their own subscription. At the end every count is checked: what was sent was either
processed or dead-lettered, and every event reached every subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgbus

from . import _progress

SUBSCRIPTIONS = ("inventory", "billing", "email")
RETRY = msgbus.RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2)
BATCH = 50  # orders per send_many call
WORK_SECONDS = 0.02  # simulated time to handle one order


@dataclass(frozen=True)
class Order:
    """The body of a message on ``orders``; validated on receipt (``bus.consumer(..., model=Order)``)."""

    run: str  # which demo run sent it, so a reused database never mixes two runs' numbers
    id: int
    customer: str
    total_cents: int


@dataclass(frozen=True)
class OrderPlaced:
    """The event published to ``order-placed`` once an order is processed."""

    run: str
    order_id: int
    customer: str


class PaymentTimeout(Exception):
    """A transient failure: the next attempt succeeds."""


class PaymentDeclined(Exception):
    """A permanent failure: every attempt fails, so the order ends up dead-lettered."""


def is_flaky(order_id: int) -> bool:
    """Orders whose first attempt fails (every tenth, starting at 3)."""
    return order_id % 10 == 3


def is_poison(order_id: int) -> bool:
    """Orders that always fail (every fortieth, starting at 17; never also flaky)."""
    return order_id % 40 == 17


@dataclass
class Tally:
    """What each part of the demo has seen so far. Everything runs on one event loop, so no locks."""

    sent: set[int] = field(default_factory=set)
    processed: set[int] = field(default_factory=set)
    recovered: int = 0  # processed on a later attempt
    retried: int = 0  # failed attempts the runtime will retry
    gave_up: set[int] = field(default_factory=set)  # failed on the last attempt: the runtime dead-letters them
    duplicates: int = 0  # orders processed twice plus events received twice (at-least-once allows it)
    stale: int = 0  # messages left over from an earlier run, acked and ignored
    published: set[int] = field(default_factory=set)
    received: dict[str, set[int]] = field(default_factory=lambda: {name: set() for name in SUBSCRIPTIONS})

    def failed(self, order_id: int, attempt: int) -> None:
        """Count a failed attempt: retried while attempts remain, then dead-lettered by the runtime."""
        if attempt < RETRY.max_attempts:
            self.retried += 1
        else:
            self.gave_up.add(order_id)

    def finished(self, orders: int) -> bool:
        """Every order settled one way or the other, and every event reached every subscription."""
        settled = len(self.sent) == orders and self.sent <= self.processed | self.gave_up
        return settled and all(self.published <= got for got in self.received.values())

    def snapshot(self) -> tuple[int, ...]:
        """Changes whenever anything moves; used to notice a stalled run."""
        counts = (len(self.sent), len(self.processed), self.retried, len(self.gave_up), self.duplicates)
        return counts + tuple(len(got) for got in self.received.values())

    def progress(self, orders: int) -> str:
        events = " ".join(f"{name} {len(got)}" for name, got in self.received.items())
        return (
            f"sent {len(self.sent)}/{orders} | processed {len(self.processed)} | retried {self.retried} | "
            f"dead-lettered {len(self.gave_up)} | events: {events}"
        )


@dataclass(frozen=True)
class DemoResult:
    """The verified outcome of one run; ``lost`` must be 0."""

    url: str
    workers: int
    sent: int
    processed: int
    recovered: int
    retried: int
    dead_lettered: int
    dead_letters: list[tuple[int, str]]  # (order id, why) read back from bus.dead_letters("orders")
    lost_orders: int  # sent, but neither processed nor dead-lettered
    published: int
    received: dict[str, int]
    lost_events: dict[str, int]  # published, but never received by that subscription
    duplicates: int
    stale: int
    seconds: float

    @property
    def lost(self) -> int:
        return self.lost_orders + sum(self.lost_events.values())

    def summary(self, reasons_shown: int = 2) -> str:
        """The end-of-run report as a plain-text table."""
        rows = [
            ("sent", self.sent),
            ("processed", f"{self.processed} ({self.recovered} after a retry)"),
            ("retried (failed attempts redelivered)", self.retried),
            ("dead-lettered (read back from the DLQ)", self.dead_lettered),
            ("lost = sent - processed - dead-lettered", self.lost_orders),
        ]
        lines = [f"msgbus demo on {self.url}: {self.sent} orders, {self.workers} workers, {self.seconds:.1f}s", ""]
        lines += [f"  {label:<42} {value}" for label, value in rows]
        lines += ["", f"  {'order-placed subscription':<26} {'published':>9} {'received':>9} {'lost':>5}"]
        for name, got in self.received.items():
            lines.append(f"  {name:<26} {self.published:>9} {got:>9} {self.lost_events[name]:>5}")
        if self.dead_letters:
            shown = self.dead_letters[:reasons_shown]
            lines += ["", f"  dead letters ({len(shown)} of {len(self.dead_letters)} shown):"]
            lines += [f"    order {order_id}: {reason}" for order_id, reason in shown]
        extra = []
        if self.duplicates:
            extra.append(f"{self.duplicates} duplicate deliveries (allowed by at-least-once; counted, not lost)")
        if self.stale:
            extra.append(f"{self.stale} messages from an earlier run were acked and ignored")
        lines += ["", *(f"  note: {text}" for text in extra)] if extra else []
        verdict = "OK: nothing lost" if self.lost == 0 else f"FAILED: {self.lost} lost"
        return "\n".join([*lines, "", f"  lost = {self.lost}  ->  {verdict}"])


async def run(
    url: str,
    *,
    orders: int = 200,
    workers: int = 8,
    out: TextIO | None = None,
    live: bool = False,
    stall_timeout: float = 15.0,
) -> DemoResult:
    """Run the order system on ``url`` until every order and event is settled; progress goes to ``out``.

    ``live`` redraws one progress line (for a terminal); otherwise a line is printed every second.
    A run where nothing moves for ``stall_timeout`` seconds stops early and reports what is missing.
    """
    run_id = uuid.uuid4().hex[:12]
    tally = Tally()
    started = time.monotonic()

    async with msgbus.connect(url) as bus:
        events = bus.publisher("order-placed")
        # A subscription gets every event published after it exists, so open them before any order runs.
        subscribers = [bus.subscriber("order-placed", subscription=name, model=OrderPlaced) for name in SUBSCRIPTIONS]
        for sub in subscribers:
            await sub.open()

        async def handle_order(msg: msgbus.Message[Order]) -> None:
            order = msg.body
            if order.run != run_id:
                tally.stale += 1
                return  # returning acks it
            # Raising makes the runtime nack the order and retry it with backoff, up to RETRY.max_attempts.
            if is_poison(order.id):
                tally.failed(order.id, msg.attempt)
                raise PaymentDeclined(f"card declined for order {order.id}")
            if is_flaky(order.id) and msg.attempt == 1:
                tally.failed(order.id, msg.attempt)
                raise PaymentTimeout(f"payment service timed out for order {order.id}")
            await asyncio.sleep(WORK_SECONDS)  # the real work: charge the card, reserve the goods...
            await events.publish(OrderPlaced(run_id, order.id, order.customer), key=order.customer)
            tally.published.add(order.id)
            if order.id in tally.processed:
                tally.duplicates += 1
            tally.processed.add(order.id)
            if msg.attempt > 1:
                tally.recovered += 1

        def event_handler(subscription: str) -> msgbus.Handler:
            async def handle_event(msg: msgbus.Message[OrderPlaced]) -> None:
                event = msg.body
                if event.run != run_id:
                    tally.stale += 1
                    return
                seen = tally.received[subscription]
                if event.order_id in seen:
                    tally.duplicates += 1
                seen.add(event.order_id)

            return handle_event

        consumer = bus.consumer("orders", model=Order)
        running = [asyncio.create_task(consumer.run(handle_order, concurrency=workers, retry=RETRY))]
        running += [
            asyncio.create_task(sub.run(event_handler(sub_name)))
            for sub, sub_name in zip(subscribers, SUBSCRIPTIONS, strict=True)
        ]
        reporter = asyncio.create_task(_report(tally, orders, out, live))
        try:
            producer = bus.producer("orders")
            for first in range(1, orders + 1, BATCH):
                batch = [
                    Order(run_id, i, f"customer-{i % 17}", 1000 + i)
                    for i in range(first, min(first + BATCH, orders + 1))
                ]
                # The key keeps one customer's orders in order (on backends with per-key ordering).
                await producer.send_many([msgbus.Outgoing(o, key=o.customer) for o in batch])
                tally.sent.update(o.id for o in batch)
            await _settle(tally, orders, stall_timeout)
        finally:
            reporter.cancel()
            consumer.stop()  # graceful: in-flight handlers finish, prefetched messages are released
            for sub in subscribers:
                sub.stop()
            await asyncio.gather(*running, return_exceptions=True)
            await asyncio.gather(reporter, return_exceptions=True)
            if out is not None:
                out.write(f"\r{tally.progress(orders)}\x1b[K\n" if live else tally.progress(orders) + "\n")
        for task in running:
            task.result()  # a consumer loop that crashed is an error of the demo, not a lost message

        dead_letters = await _read_dead_letters(bus, run_id)

    dead_ids = {order_id for order_id, _reason in dead_letters}
    return DemoResult(
        url=bus.url,
        workers=workers,
        sent=len(tally.sent),
        processed=len(tally.processed),
        recovered=tally.recovered,
        retried=tally.retried,
        dead_lettered=len(dead_letters),
        dead_letters=sorted(dead_letters),
        lost_orders=len(tally.sent - tally.processed - dead_ids),
        published=len(tally.published),
        received={name: len(got) for name, got in tally.received.items()},
        lost_events={name: len(tally.published - got) for name, got in tally.received.items()},
        duplicates=tally.duplicates,
        stale=tally.stale,
        seconds=time.monotonic() - started,
    )


async def _settle(tally: Tally, orders: int, stall_timeout: float) -> None:
    """Wait until everything is settled, or until nothing has moved for ``stall_timeout`` seconds."""
    last, moved_at = tally.snapshot(), time.monotonic()
    while not tally.finished(orders):
        await asyncio.sleep(0.02)
        now = time.monotonic()
        if tally.snapshot() != last:
            last, moved_at = tally.snapshot(), now
        elif now - moved_at > stall_timeout:
            return  # the summary will show what is missing


async def _report(tally: Tally, orders: int, out: TextIO | None, live: bool) -> None:
    """Live progress: on a terminal a bar of settled orders (tqdm, ``msgbus[cli]``) or else one redrawn line; a
    line a second otherwise."""
    if out is None:
        return
    with _progress.Progress("orders", out, total=orders, unit="order") if live else contextlib.nullcontext() as bar:
        try:
            while True:
                await asyncio.sleep(0.1 if live else 1.0)
                if bar is not None and bar.shown:
                    bar.update(len(tally.processed | tally.gave_up), tally.progress(orders))
                    continue
                out.write(f"\r{tally.progress(orders)}\x1b[K" if live else tally.progress(orders) + "\n")
                out.flush()
        finally:
            if bar is not None:  # where the run ended, not where the last tick saw it
                bar.update(len(tally.processed | tally.gave_up), tally.progress(orders))


async def _read_dead_letters(bus: msgbus.Bus, run_id: str) -> list[tuple[int, str]]:
    """Drain this run's orders from the dead-letter queue of ``orders``, with the reason each one failed."""
    found: list[tuple[int, str]] = []
    others: list[msgbus.Message[Any]] = []
    async with bus.dead_letters("orders") as dlq:
        while batch := await dlq.receive(max_messages=100, timeout=0.2):
            for msg in batch:
                body: Any = msg.body
                if isinstance(body, dict) and body.get("run") == run_id:
                    why = f"after {msg.dead_letter_attempts} attempts: {msg.dead_letter_reason or '(no reason)'}"
                    found.append((int(body["id"]), why))
                    await msg.ack()
                else:
                    others.append(msg)
        for msg in others:
            await msg.nack()  # not ours: put it back for whoever looks after it
    return found


@contextlib.contextmanager
def fresh_sqlite_url() -> Iterator[str]:
    """A ``sqlite://`` URL for a new database in a temporary directory, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="msgbus-demo-"))
    try:
        yield f"sqlite:///{folder / 'msgbus-demo.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
