"""Check for send deduplication (promise 16): a send retried with the same message id is delivered once."""

from __future__ import annotations

import uuid

from msgbus import Outgoing

from ._context import ContractContext, Tally, ensure
from ._flow import chunked, drain, expect_only_sentinel, sentinel_sender

__all__ = ["check_send_dedup"]


async def check_send_dedup(ctx: ContractContext) -> None:
    """Within ``dedup_window``, a send repeating a message id (a retry after a timeout) is delivered once: to a queue
    (repeated by ``send_many`` and by ``send``) and to each subscription of a topic; a new id still goes through."""
    n = ctx.scale(100, 20)
    run = uuid.uuid4().hex[:12]
    ids = [f"dedup-{run}-{i}" for i in range(n)]
    items = [Outgoing({"i": i}, key=f"k{i % 4}" if i % 2 else None, message_id=ids[i]) for i in range(n)]
    queue, topic, subscription = ctx.name(), ctx.name("t"), ctx.name("s")
    producer = ctx.bus.producer(queue)
    subscriber = ctx.bus.subscriber(topic, subscription=subscription)
    await subscriber.open()  # the subscription exists before the publishes
    publisher = ctx.bus.publisher(topic)
    for _ in range(2):  # the send, then its retry as a whole
        for chunk in chunked(items, 50):
            ensure(await producer.send_many(chunk) == [o.message_id for o in chunk], "send_many changed the ids")
            await publisher.publish_many(chunk)
    for o in items[: max(1, n // 10)]:  # and again one by one, as a retried single send would
        await producer.send(o.body, key=o.key, message_id=o.message_id)
        await publisher.publish(o.body, key=o.key, message_id=o.message_id)
    fresh = await producer.send({"fresh": True}, message_id=f"dedup-{run}-fresh")
    notes = []
    for what, consumer, sender, sent in (
        ("queue", ctx.bus.consumer(queue), sentinel_sender(producer), [*ids, fresh]),
        ("subscription", subscriber, sentinel_sender(publisher), ids),
    ):
        tally = Tally()
        await drain(ctx, consumer, tally, lambda: tally.distinct >= len(sent), what=what)  # noqa: B023 - awaited here
        # A repeat that was stored arrives with the rest or just after: the quiet window gives it time.
        notes.append(await expect_only_sentinel(ctx, consumer, sender, ctx.quiet, f"{what}, after all acked"))
        notes.insert(-1, tally.ensure_exact(sent, f"{what}: each id sent 2-3 times"))
    window = ctx.caps.dedup_window
    ctx.note(f"{'; '.join(notes)} (dedup_window {window:g}s)" if window else "; ".join(notes))
