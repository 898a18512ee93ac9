"""Check for promise 11: producers and consumers carry on across a broker restart; nothing acked-as-sent is lost."""

from __future__ import annotations

from typing import Any

from msgbus import Message
from msgbus.errors import MsgbusError

from ._context import ContractContext, ContractSkip, Tally, ensure
from ._flow import drain, stop_run

__all__ = ["check_reconnect"]


async def check_reconnect(ctx: ContractContext) -> None:
    """Send N/2, restart the broker, send N/2: a consumer running throughout receives every message sent."""
    if ctx.restart_broker is None:
        raise ContractSkip("no restart hook")
    n = ctx.scale(400, 100)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    tally = Tally()

    async def handle(msg: Message[Any]) -> None:
        tally.add(msg.id)

    consumer = (await ctx.open_bus()).consumer(queue)
    await consumer.open()
    task = ctx.background(consumer.run(handle, concurrency=4))
    sent: set[str] = set()
    failed: list[str] = []

    async def send_half(tag: str) -> None:
        for i in range(n // 2):
            try:
                sent.add(await producer.send({"phase": tag, "i": i}))
            except MsgbusError as exc:  # a send that raises was not acked-as-sent; counted, and a failure
                failed.append(f"{type(exc).__name__}: {exc}")

    await send_half("before")
    # Then sends nobody takes, the broker killed as the last returns: each must be stored, not only acknowledged
    # (the consumer above takes most of its messages before the kill; a commit not yet flushed would go unseen).
    unread_queue = ctx.name("unread")
    unread = [await ctx.bus.producer(unread_queue).send({"unread": i}) for i in range(ctx.scale(50, 20))]
    ctx.waiting = "the restart hook"
    await ctx.restart_broker()
    await send_half("after")
    ctx.waiting = f"all {len(sent)} acked-as-sent messages after the restart"
    await tally.wait_until(lambda: sent <= set(tally.counts))
    await stop_run(consumer, task)
    line = tally.ensure_exact(sent, "sent around a broker restart", allow_dups=True)
    ensure(not failed, f"{line}; {len(failed)} sends raised after the restart, e.g. {failed[0] if failed else ''}")
    back = Tally()
    reader = (await ctx.open_bus()).consumer(unread_queue)
    await drain(ctx, reader, back, lambda: set(unread) <= set(back.counts), what="the sends right before the kill")
    last = back.ensure_exact(set(unread), "sent right before the restart, read after it", allow_dups=True)
    ctx.note(f"{line}; {last} (duplicates allowed across a restart, reported here)")
