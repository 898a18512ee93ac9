"""``Adapter.stats`` (``msgbus stats``) against every real broker: send N, dead-letter D, hold K delivered and
unsettled, then the figures must be exactly what that backend can know. A backend whose figures trail the truth
(SQS's approximate attributes, Kafka's acks counted once committed) is read again until they settle, for at most
``SETTLE`` seconds; every other backend must be right on the first read."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping

import pytest

import msgbus
from integration.brokers import Endpoint as Broker
from integration.contract_urls import at_defaults
from msgbus.adapter import Adapter, Delivery, Endpoint, Record
from msgbus.errors import TopologyError

N, DEAD, HELD = 6, 1, 2
WAITING = N - DEAD - HELD
SETTLE = 30.0  # seconds a trailing backend gets to report the settled figures

# What each backend reports of that state; a key it does not know is absent (None: it reports nothing).
EXPECTED: dict[str, Mapping[str, float] | None] = {
    "rabbitmq": {"depth": WAITING, "dead_letters": DEAD, "consumers": 1},  # ready only: AMQP has no unacked count
    "redis": {"depth": WAITING, "in_flight": HELD, "dead_letters": DEAD, "consumers": 1},
    "sqs": {"depth": WAITING, "in_flight": HELD, "dead_letters": DEAD},
    "kafka": {"depth": N - DEAD, "dead_letters": DEAD, "consumers": 1},  # lag: held records are unsettled too
    "nats": {"depth": WAITING, "in_flight": HELD, "dead_letters": DEAD},
    "postgresql": {"depth": WAITING, "in_flight": HELD, "dead_letters": DEAD},
}
TRAILING = {"sqs", "kafka"}
ALSO = {"postgresql": {"oldest_age"}}  # reported, checked for range only


@pytest.mark.parametrize("kind", ["queue", "subscription"])
@pytest.mark.parametrize("backend", list(EXPECTED))
async def test_stats_are_the_brokers_figures(broker_url: Callable[[str], Broker], backend: str, kind: str) -> None:
    name = f"stats-{uuid.uuid4().hex[:8]}"
    endpoint = Endpoint("queue", name) if kind == "queue" else Endpoint("topic", name, "billing")
    target = Endpoint("queue", name) if kind == "queue" else Endpoint("topic", name)
    async with msgbus.connect(at_defaults(broker_url(backend))) as bus:
        adapter = bus.adapter
        await adapter.declare(endpoint)
        await adapter.send(target, [Record(f"m{i}".encode(), f"id-{i}", timestamp=time.time()) for i in range(N)])
        first = await adapter.receiver(endpoint, prefetch=DEAD)
        for delivery in await take(first, DEAD):
            await delivery.dead_letter("stats test")
        await first.close()
        holder = await adapter.receiver(endpoint, prefetch=HELD)
        held = await take(holder, HELD)
        try:
            figures, waited = await settled(adapter, endpoint, EXPECTED[backend], backend in TRAILING)
        finally:
            for delivery in held:
                await delivery.ack()
            await holder.close()
    print(f"{backend} {kind}: {dict(figures)} (settled after {waited:.1f} s)")
    expected = EXPECTED[backend]
    assert expected is not None
    assert {k: v for k, v in figures.items() if k not in ALSO.get(backend, ())} == expected
    assert all(0 <= figures[k] < 3600 for k in ALSO.get(backend, ())), figures


async def take(receiver: msgbus.adapter.Receiver, n: int) -> list[Delivery]:
    """Exactly ``n`` deliveries from ``receiver`` (within 30 s)."""
    got: list[Delivery] = []
    async with asyncio.timeout(30):
        while len(got) < n:
            got += await receiver.receive(n - len(got), 1.0)
    assert len(got) == n
    return got


async def settled(
    adapter: Adapter, endpoint: Endpoint, expected: Mapping[str, float] | None, trailing: bool
) -> tuple[Mapping[str, float], float]:
    """The figures, read again while they differ from ``expected`` if the backend trails (for up to ``SETTLE`` s)."""
    start = time.monotonic()
    while True:
        figures = await adapter.stats(endpoint)
        assert figures is not None
        shown = {k: v for k, v in figures.items() if expected is None or k in expected}
        if not trailing or shown == expected or time.monotonic() - start > SETTLE:
            return figures, time.monotonic() - start
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("backend", list(EXPECTED))
async def test_stats_of_a_missing_queue_fail_typed(broker_url: Callable[[str], Broker], backend: str) -> None:
    """Asking for a queue nobody declared raises ``TopologyError`` at once, and creates nothing."""
    missing = Endpoint("queue", f"stats-missing-{uuid.uuid4().hex[:8]}")
    async with msgbus.connect(at_defaults(broker_url(backend))) as bus:
        async with asyncio.timeout(15):
            with pytest.raises(TopologyError) as info:
                await bus.adapter.stats(missing)
            with pytest.raises(TopologyError):
                await bus.adapter.stats(missing)  # still missing: the first ask created nothing
    print(f"{backend}: {type(info.value).__name__}: {info.value}")
