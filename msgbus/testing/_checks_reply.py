"""The request/reply check: every request gets exactly its own reply; a duplicate or late one goes to no one."""

from __future__ import annotations

import asyncio
from typing import Any

from msgbus import Bus, Message
from msgbus.errors import RequestTimeout

from ._context import ContractContext, Tally, ensure
from ._flow import drain, expect_raises, reached, stop_run

__all__ = ["check_request_gets_its_reply"]

PATIENT = 3600.0  # a request timeout the check's own deadline always ends first
LATE = 1.5  # seconds a request waits for a reply that does not come


async def check_request_gets_its_reply(ctx: ContractContext) -> None:
    """bus.request() gets exactly its own reply: concurrent requests from two buses, all held by the responder at
    once and answered twice each in reverse order, each get the one reply to their own request; the duplicates and
    a reply after its request timed out are dropped and counted; a run() handler's msg.reply() answers too."""
    n = ctx.scale(20, 6)
    queue = ctx.name()
    requesters = {"a": ctx.bus, "b": await ctx.open_bus()}
    responder = (await ctx.open_bus()).consumer(queue, prefetch=2 * n)
    asked: dict[str, Any] = {}  # request id -> the body the responder got

    async def ask(who: str, i: int) -> tuple[dict[str, Any], Message[Any]]:
        body = {"who": who, "i": i}
        # A key each: a per-key ordered backend hands out the next message of a key only once the last is settled.
        return body, await requesters[who].request(queue, body, key=f"{who}{i}", timeout=PATIENT)

    async def ask_all() -> list[tuple[dict[str, Any], Message[Any]]]:
        return await asyncio.gather(*(ask(who, i) for who in requesters for i in range(n)))

    calls = ctx.background(ask_all(), "requests")
    held = Tally()
    # All 2n held unsettled at once: requests that waited for each other's replies would never get here.
    requests = await drain(ctx, responder, held, reached(held, 2 * n), settle=False, what="the requests")
    for msg in reversed(requests):
        asked[msg.id] = msg.body
    # Twice each (a responder that crashed between reply and ack replies again), last request first; at once, as
    # a lock-duration backend would take back requests held for a round trip each.
    await asyncio.gather(*(msg.reply({"answer": msg.body}) for _ in range(2) for msg in reversed(requests)))
    await asyncio.gather(*(msg.ack() for msg in requests))
    ctx.waiting = lambda: f"the replies to {2 * n} concurrent requests"
    while not (await asyncio.wait({calls}, timeout=0.05))[0]:  # a bus dropping its callers' replies fails now
        drops = {who: bus.dropped_replies for who, bus in requesters.items()}
        ensure(max(drops.values()) <= n, f"replies dropped while their {2 * n} requests wait: {drops} of {n} each")
    answered = calls.result()
    wrong = []
    for body, reply in answered:
        if reply.body != {"answer": body} or asked.get(reply.correlation_id or "") != body:
            wrong.append(f"{body} got {reply.body} (correlation id {reply.correlation_id!r:.40})")
    line = held.ensure_exact(set(asked), f"{2 * n} concurrent requests from 2 buses, held at once")
    ensure(not wrong, f"{line}; {len(wrong)} got another request's reply, e.g. {'; '.join(wrong[:3])}")
    line += f"; each got its own reply; {2 * n} duplicate replies"
    await _dropped(ctx, requesters, {"a": n, "b": n}, line)

    # The timeout bounds the send too: long enough for any backend to store the request, which must come back.
    late = await expect_raises(
        requesters["a"].request(queue, {"late": True}, timeout=LATE), RequestTimeout, "a request nobody answered"
    )
    one = Tally()
    for msg in await drain(ctx, responder, one, reached(one, 1), settle=False, what="the timed-out request"):
        await msg.reply({"late": True})
        await msg.ack()
    await _dropped(ctx, requesters, {"a": n + 1, "b": n}, line)

    async def answer(msg: Message[Any]) -> None:
        await msg.reply({"answer": msg.body})

    running = ctx.background(responder.run(answer, concurrency=2), "responder")
    got = await requesters["b"].request(queue, {"run": 1}, timeout=PATIENT)
    await stop_run(responder, running)
    ensure(got.body == {"answer": {"run": 1}}, f"{line}; a run() handler's reply came back as {got.body!r}")
    ctx.note(f"{line}, dropped and counted; {late}, its late reply dropped and counted; a run() handler replied")


async def _dropped(ctx: ContractContext, buses: dict[str, Bus], want: dict[str, int], line: str) -> None:
    """Wait until each bus dropped ``want`` replies (bounded by the check's deadline), then fail if it dropped more."""

    def counts() -> dict[str, int]:
        return {who: bus.dropped_replies for who, bus in buses.items()}

    ctx.waiting = lambda: f"duplicate and late replies dropped: want {want}, have {counts()}"
    while True:  # a plain count on the bus, nothing to wait on: poll it
        if all(counts()[who] >= n for who, n in want.items()):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(ctx.quiet)  # a reply handed to the wrong bus would show here as a drop too many
    ensure(counts() == want, f"{line}; replies dropped per requester {counts()}, expected {want}")
