"""The redrive check: dead letters go back to their queue once each, as they were, with why they died."""

from __future__ import annotations

import json
import os
from typing import Any

from msgbus import HEADER_DEAD_LETTER_HISTORY, Message, Outgoing
from msgbus.adapter import RESERVED_HEADER_PREFIX

from ._context import ContractContext, Tally, ensure, examples
from ._flow import drain, expect_only_sentinel, reached, sentinel_sender

__all__ = ["check_redrive_once"]


async def check_redrive_once(ctx: ContractContext) -> None:
    """bus.redrive(queue) returns every dead letter to its queue exactly once, with its id, key, body and headers
    (a traceparent too), attempt 1 again and why it died in the history header; the dead letters are gone."""
    m = ctx.scale(100, 20)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    items = [
        Outgoing(
            {"i": i},
            key=f"k{i}",  # one each: held unsettled, a shared key would hold back the rest
            headers={"seq": str(i), "traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"},
        )
        for i in range(m)
    ]
    sent = dict(zip(await producer.send_many(items), items, strict=True))
    consumer = ctx.bus.consumer(queue, prefetch=m)
    tally = Tally()
    for msg in await drain(ctx, consumer, tally, reached(tally, m), settle=False):
        await msg.reject(f"contract redrive {msg.headers.get('seq')}")
    await consumer.close()  # else a pushing broker (RabbitMQ) hands the redriven ones to its read-ahead
    moved = Tally()
    calls = 0
    ctx.waiting = lambda: f"redrive to move all {m} dead letters ({moved.distinct} after {calls} calls)"
    while moved.distinct < m:  # a backend may show dead letters late (a group joining): call again
        calls += 1
        for msg_id in (await ctx.bus.redrive(queue, idle=1.0)).moved:
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
        if reasons != [f"contract redrive {want.headers['seq']}"] or queue not in str(history):
            problems.append(f"{msg.id}: history {history!r}")

    back = Tally()
    fresh = (await ctx.open_bus()).consumer(queue, prefetch=m)
    await drain(ctx, fresh, back, reached(back, m), on_message=inspect, what="the redriven messages")
    line = back.ensure_exact(set(sent), line + "; read back from the queue")
    ensure(not problems, f"{line}; {len(problems)} redriven wrong, e.g. {'; '.join(problems[:3])}")
    ctx.waiting = f"a last redrive of {queue}'s dead letters, which must be empty"
    again = await ctx.bus.redrive(queue, idle=ctx.lock_window)
    ensure(not again.moved, f"{line}; a second redrive moved {len(again.moved)} again: {examples(again.moved)}")
    ctx.note(line + "; id, key, body, headers and traceparent intact, attempt 1, the reason in the history")
    ctx.note(await expect_only_sentinel(ctx, fresh, sentinel_sender(producer), ctx.lock_window, "then"))
