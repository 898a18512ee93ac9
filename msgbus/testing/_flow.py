"""Receiving patterns shared by the checks: drain to a count, quiet windows closed by a sentinel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from msgbus import HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, Bus, Consumer, Message, Producer, Publisher

from ._context import ContractContext, Tally, ensure, examples, fail

__all__ = [
    "SENTINEL_HEADER",
    "DeadLetterWatch",
    "chunked",
    "drain",
    "expect_only_sentinel",
    "expect_only_sentinels",
    "expect_raises",
    "is_sentinel",
    "nothing_comes_back",
    "quiet_then_sentinel",
    "reached",
    "sentinel_sender",
    "stop_run",
]

SENTINEL_HEADER = "contract-sentinel"
SendOne = Callable[[], Awaitable[str]]


def sentinel_sender(sender: Producer | Publisher) -> SendOne:
    """A function that sends one sentinel message (header ``contract-sentinel: 1``) and returns its id."""

    async def send() -> str:
        if isinstance(sender, Publisher):
            return await sender.publish({"sentinel": True}, headers={SENTINEL_HEADER: "1"})
        return await sender.send({"sentinel": True}, headers={SENTINEL_HEADER: "1"})

    return send


async def expect_raises(aw: Awaitable[object], error: type[BaseException], what: str) -> str:
    """Await ``aw`` and fail unless it raises ``error``; returns a note."""
    try:
        await aw
    except error as exc:
        return f"{what} -> {type(exc).__name__}"
    except Exception as exc:  # a different type is a broken promise, reported with its type
        fail(f"{what}: expected {error.__name__}, got {type(exc).__name__}: {exc}")
    fail(f"{what}: expected {error.__name__}, but it returned normally")


class DeadLetterWatch:
    """Reads ``dead_letters(queue)`` in the background while a check waits for messages to come back, so one
    dead-lettered instead (a stop that counted the deliveries it gave back, say) is named with its reason
    rather than waited for until the check's deadline. What it reads it acks."""

    def __init__(self, ctx: ContractContext, queue: str) -> None:
        self.tally = Tally()
        self._reasons: dict[str, str] = {}
        self._reading = True
        self._task = ctx.background(self._read(ctx.bus.dead_letters(queue)), "dead letters")

    async def _read(self, dlq: Consumer[Any]) -> None:
        while self._reading:  # not cancelled mid-receive: some clients leak the connection of a cancelled call
            for msg in await dlq.receive(max_messages=50, timeout=0.5):
                self.tally.add(msg.id)
                reason = msg.headers.get(HEADER_DEAD_LETTER_REASON, "")
                self._reasons.setdefault(msg.id, f"{reason!r} at attempt {msg.headers.get(HEADER_ATTEMPTS, '?')}")
                await msg.ack()

    async def stop(self) -> None:
        """Stop reading (after the receive in progress)."""
        self._reading = False
        await self._task

    def ensure_none(self, what: str) -> None:
        """Fail, naming them and a reason, if any message was dead-lettered."""
        ids = sorted(self.tally.counts)
        if ids:
            fail(f"{len(ids)} {what} dead-lettered instead: {examples(ids)}; reason {self._reasons[ids[0]]}")


def reached(tally: Tally, n: int) -> Callable[[], bool]:
    """A condition for ``drain``: ``tally`` has ``n`` distinct ids."""
    return lambda: tally.distinct >= n


def is_sentinel(msg: Message[Any]) -> bool:
    return msg.headers.get(SENTINEL_HEADER) == "1"


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def drain(
    ctx: ContractContext,
    consumer: Consumer[Any],
    tally: Tally,
    until: Callable[[], bool],
    *,
    settle: bool = True,
    on_message: Callable[[Message[Any]], None] | None = None,
    max_messages: int = 100,
    batch_sizes: list[int] | None = None,
    what: str = "messages",
) -> list[Message[Any]]:
    """``receive()`` until ``until()`` holds, counting each message; ack them when ``settle``.

    Bounded by the check's deadline only; returns the messages (unsettled when ``settle`` is false).
    """
    got: list[Message[Any]] = []
    while not until():
        ctx.waiting = lambda: f"receiving {what} ({tally.distinct} distinct so far)"
        batch = await consumer.receive(max_messages=max_messages, timeout=1.0)
        if batch_sizes is not None and batch:
            batch_sizes.append(len(batch))
        for msg in batch:
            tally.add(msg.id)
            if on_message is not None:
                on_message(msg)
            got.append(msg)
            if settle:
                await msg.ack()
    return got


async def expect_only_sentinel(
    ctx: ContractContext, consumer: Consumer[Any], send_sentinel: SendOne, window: float, what: str
) -> str:
    """Nothing may arrive at ``consumer`` for ``window`` seconds; then a sentinel is sent and must be all it gets.

    The sentinel makes the negative check able to fail: a consumer that receives nothing at all would
    otherwise pass a quiet window. Everything received is acked. Returns a note for the result detail.
    """
    return await expect_only_sentinels(ctx, [(send_sentinel, [consumer])], window, what)


async def expect_only_sentinels(
    ctx: ContractContext, groups: Sequence[tuple[SendOne, Sequence[Consumer[Any]]]], window: float, what: str
) -> str:
    """``expect_only_sentinel`` for several consumers at once, sharing one window: each group's consumers get
    only the one sentinel its sender sends (a topic's sentinel reaches every subscription)."""
    ctx.waiting = f"a {window:.1f}s quiet window ({what})"
    end = time.monotonic() + window

    async def listen(consumer: Consumer[Any]) -> list[Message[Any]]:
        got: list[Message[Any]] = []
        while (left := end - time.monotonic()) > 0:
            got += await consumer.receive(max_messages=100, timeout=left)
        return got

    everyone = [c for _, consumers in groups for c in consumers]
    strays = [m for got in await asyncio.gather(*(listen(c) for c in everyone)) for m in got]
    for m in strays:
        await m.ack()
    ensure(
        not strays,
        f"{what}: expected nothing for {window:.1f}s; got {len(strays)} (ids e.g. {examples(m.id for m in strays)})",
    )
    sentinels = [await send() for send, _ in groups]
    ctx.waiting = f"the sentinel after the quiet window ({what})"

    async def until(consumer: Consumer[Any], sentinel_id: str) -> list[Message[Any]]:
        late: list[Message[Any]] = []
        while not any(m.id == sentinel_id for m in late):
            late += await consumer.receive(max_messages=100, timeout=1.0)
        for m in late:
            await m.ack()
        return [m for m in late if m.id != sentinel_id]

    waits = [until(c, sid) for (_, consumers), sid in zip(groups, sentinels, strict=True) for c in consumers]
    extra = [m for late in await asyncio.gather(*waits) for m in late]
    ensure(
        not extra,
        f"{what}: expected only the sentinel after the quiet window; got {len(extra)} more "
        f"(ids e.g. {examples(m.id for m in extra)})",
    )
    return f"{what}: nothing in a {window:.1f}s window, then the sentinel alone"


async def nothing_comes_back(
    ctx: ContractContext, make: Callable[[Bus], Consumer[Any]], send_sentinel: SendOne, window: float
) -> str:
    """After a check's consumers settled in bulk and closed: a fresh consumer (``make`` on a fresh bus) gets
    nothing for ``window``, then the sentinel alone. With ``window`` past the lock duration, a message whose ack
    was lost comes back here (lock expiry, or a close that put back what was never acked), inside the check."""
    fresh = make(await ctx.open_bus())
    return await expect_only_sentinel(ctx, fresh, send_sentinel, window, "fresh consumer")


async def quiet_then_sentinel(
    ctx: ContractContext, tally: Tally, send_sentinel: SendOne, window: float, what: str
) -> str:
    """For handlers under ``run()``: ``tally`` must not grow for ``window`` seconds, then grow by the sentinel only."""
    ctx.waiting = f"a {window:.1f}s quiet window ({what})"
    before = tally.total
    await asyncio.sleep(window)
    during = tally.order[before:]
    sentinel_id = await send_sentinel()
    ctx.waiting = f"the sentinel after the quiet window ({what})"
    await tally.wait_until(lambda: sentinel_id in tally)
    extra = [i for i in tally.order[before:] if i != sentinel_id]
    ensure(
        not extra and tally.counts[sentinel_id] == 1,
        f"{what}: expected no deliveries for {window:.1f}s and then only the sentinel; got {len(during)} during "
        f"the window, {len(extra)} besides the sentinel in all (ids e.g. {examples(extra)})",
    )
    return f"{what}: nothing in a {window:.1f}s window, then the sentinel alone"


async def stop_run(consumer: Consumer[Any], task: asyncio.Task[Any]) -> None:
    """``consumer.stop()`` and wait for its ``run()`` to return (re-raising what it raised)."""
    consumer.stop()
    await task
