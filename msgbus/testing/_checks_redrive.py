"""The redrive checks: dead letters go back to their queue, or to their subscription alone, once each, as they
were, with why they died."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from msgbus import HEADER_DEAD_LETTER_HISTORY, Bus, Consumer, Message, Outgoing
from msgbus.adapter import RESERVED_HEADER_PREFIX

from ._context import ContractContext, Tally, ensure, examples
from ._flow import SendOne, drain, expect_only_sentinels, reached, sentinel_sender

__all__ = ["check_redrive_once", "check_redrive_subscription"]


async def check_redrive_once(ctx: ContractContext) -> None:
    """bus.redrive(queue) returns every dead letter to its queue exactly once, with its id, key, body and headers
    (a traceparent too), attempt 1 again and why it died in the history header; the dead letters are gone."""
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    m = ctx.scale(100, 20)
    await _redrive_once(
        ctx, queue, None, producer.send_many, lambda bus: bus.consumer(queue, prefetch=m), sentinel_sender(producer)
    )


async def check_redrive_subscription(ctx: ContractContext) -> None:
    """bus.redrive(topic, subscription=S) returns S's dead letters to S alone, each once and as it was (as
    ``check_redrive_once``): the topic's other subscription, which acked the originals, gets none of them."""
    topic, mine, theirs = ctx.name("t"), ctx.name("mine"), ctx.name("theirs")
    publisher = ctx.bus.publisher(topic)
    m = ctx.scale(100, 20)
    other = ctx.bus.subscriber(topic, subscription=theirs, prefetch=m)
    await other.open()

    async def publish_many(items: Sequence[Outgoing]) -> list[str]:
        ids = await publisher.publish_many(items)
        acked = Tally()
        await drain(ctx, other, acked, reached(acked, m), what=f"the originals at subscription {theirs}")
        acked.ensure_exact(set(ids), f"{m} published, read by the other subscription")
        return ids

    await _redrive_once(
        ctx,
        topic,
        mine,
        publish_many,
        lambda bus: bus.subscriber(topic, subscription=mine, prefetch=m),
        sentinel_sender(publisher),
        [other],
    )


async def _redrive_once(
    ctx: ContractContext,
    name: str,
    subscription: str | None,
    send_many: Callable[[Sequence[Outgoing]], Awaitable[list[str]]],
    consumer_on: Callable[[Bus], Consumer[Any]],
    send_sentinel: SendOne,
    bystanders: Sequence[Consumer[Any]] = (),
) -> None:
    """Reject ``m`` messages at ``consumer_on``'s queue or subscription, redrive them, read them back exactly once
    as they were; then a second redrive moves none, and only the sentinel reaches it and the ``bystanders``."""
    m = ctx.scale(100, 20)
    where = name if subscription is None else f"{name}/{subscription}"
    items = [
        Outgoing(
            {"i": i},
            key=f"k{i}",
            headers={"seq": str(i), "traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"},
        )
        for i in range(m)
    ]
    consumer = consumer_on(ctx.bus)
    await consumer.open()  # a subscription gets what is published after it exists
    sent = dict(zip(await send_many(items), items, strict=True))
    rejected = Tally()
    ctx.waiting = lambda: f"{m} messages at {where} to reject ({rejected.distinct} so far)"
    while rejected.distinct < m:  # each rejected as it comes: one held past its lock would come back as well
        for msg in await consumer.receive(max_messages=m, timeout=1.0):
            rejected.add(msg.id)
            await msg.reject(f"contract redrive {msg.headers.get('seq')}")
    rejected.ensure_exact(set(sent), f"{m} sent to {where}, rejected")
    await consumer.close()  # else a pushing broker (RabbitMQ) hands the redriven ones to its read-ahead
    moved = Tally()
    calls = 0
    ctx.waiting = lambda: f"redrive to move all {m} dead letters of {where} ({moved.distinct} after {calls} calls)"
    while moved.distinct < m:  # a backend may show dead letters late (a group joining): call again
        calls += 1
        for msg_id in (await ctx.bus.redrive(name, subscription=subscription, idle=1.0)).moved:
            moved.add(msg_id)
    line = moved.ensure_exact(set(sent), f"{m} rejected, moved back by {calls} redrive call(s)")
    problems: list[str] = []

    def inspect(msg: Message[Any]) -> None:
        want = sent.get(msg.id)
        if want is None:
            return
        assert want.headers is not None
        headers = dict(msg.headers)
        history = json.loads(headers.get(HEADER_DEAD_LETTER_HISTORY, "[]"))
        mine = {k: v for k, v in headers.items() if not k.startswith(RESERVED_HEADER_PREFIX)}
        if mine != want.headers or msg.body != want.body or msg.key != want.key:
            problems.append(f"{msg.id}: changed: {msg.body!r} key={msg.key!r} {mine}")
        if msg.attempt != 1:
            problems.append(f"{msg.id}: attempt {msg.attempt}, expected 1 after a redrive")
        reasons = [entry.get("reason") for entry in history] if isinstance(history, list) else history
        if reasons != [f"contract redrive {want.headers['seq']}"] or where not in str(history):
            problems.append(f"{msg.id}: history {history!r}")

    back = Tally()
    fresh = consumer_on(await ctx.open_bus())
    await drain(ctx, fresh, back, reached(back, m), on_message=inspect, what="the redriven messages")
    line = back.ensure_exact(set(sent), line + f"; read back from {where}")
    ensure(not problems, f"{line}; {len(problems)} redriven wrong, e.g. {'; '.join(problems[:3])}")
    ctx.waiting = f"a last redrive of {where}'s dead letters, which must be empty"
    again = await ctx.bus.redrive(name, subscription=subscription, idle=ctx.lock_window)
    ensure(not again.moved, f"{line}; a second redrive moved {len(again.moved)} again: {examples(again.moved)}")
    ctx.note(line + "; id, key, body, headers and traceparent intact, attempt 1, the reason in the history")
    others = " and the other subscription" if bystanders else ""
    groups = [(send_sentinel, [fresh, *bystanders])]
    ctx.note(await expect_only_sentinels(ctx, groups, ctx.lock_window, f"then, at {where}{others}"))
