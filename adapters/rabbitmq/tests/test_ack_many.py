"""``ack_many`` acks with one ``multiple=True`` frame only where that cannot ack a message it was not given.

Out-of-order batches, interleaved single settlements and a nack below an acked batch: afterwards exactly the
unacked messages come back (counted by id), nothing acked comes back, and the channel stays open.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from msgbus.adapter import Delivery, Endpoint, Receiver, Record
from msgbus_rabbitmq import RabbitMQAdapter


async def _take(receiver: Receiver, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < n:
        batch = await receiver.receive(n - len(got), 5.0)
        assert batch, f"only {len(got)} of {n} arrived"
        got += batch
    return got


def _ids(deliveries: Sequence[Delivery]) -> list[str]:
    return sorted(d.record.id for d in deliveries)


async def _setup(adapter: RabbitMQAdapter, names: Callable[[str], str], n: int) -> tuple[Endpoint, Receiver]:
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    await adapter.send(ep, [Record(b"x", f"m{i:02d}") for i in range(n)])
    return ep, await adapter.receiver(ep, prefetch=n)


async def test_out_of_order_batches_ack_exactly_their_messages(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    ep, receiver = await _setup(adapter, names, 12)
    d = await _take(receiver, 12)
    await receiver.ack_many(d[6:9])  # above two unsettled ranges: acked one by one
    await d[1].ack()  # a single ack in the middle of the lowest range
    await receiver.ack_many([d[0], d[2], d[3]])  # prefix 0..3 complete: one multiple ack
    await d[4].nack()  # below the acked 6..8, still the broker puts only m04 back
    await receiver.close()  # m05, m09, m10, m11 unsettled: back as well
    again = await adapter.receiver(ep, prefetch=12)
    back = await _take(again, 5)
    assert await again.receive(12, 0.5) == []
    assert _ids(back) == ["m04", "m05", "m09", "m10", "m11"]  # 5 back, 7 acked, 0 lost, 0 duplicates
    await again.ack_many(back)
    await again.close()


async def test_batches_that_complete_the_prefix_ack_everything(
    adapter: RabbitMQAdapter, names: Callable[[str], str]
) -> None:
    ep, receiver = await _setup(adapter, names, 20)
    d = await _take(receiver, 20)
    await receiver.ack_many(d[10:])
    await receiver.ack_many(d[5:10])
    await receiver.ack_many(d[:5])  # closes the gap: everything is acked
    await receiver.close()
    again = await adapter.receiver(ep, prefetch=20)
    assert await again.receive(20, 0.5) == []
    await again.close()
