"""Check for batch handlers: ``run_batch`` settles each message of a batch as its handler told it to."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from msgbus import HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, BatchResult, Message, Outgoing, RetryPolicy

from ._context import ContractContext, Tally, ensure, examples
from ._flow import chunked, drain, is_sentinel, quiet_then_sentinel, sentinel_sender, stop_run

__all__ = ["check_run_batch"]

MAX_BATCH = 16
MAX_WAIT = 0.2  # seconds: short, so the last, partial batches are handed over by time


def _role(i: int) -> str:
    """What the handler does with message ``i``: fail it by name, reject it itself, or ack it (by returning);
    a ``raiser`` also makes its whole batch raise on its first delivery, unless the batch holds a message that
    must be acked and was delivered before (so each of those is handled at most twice)."""
    if i % 10 == 3:
        return "named"
    if i % 10 == 7:
        return "rejected"
    return "raiser" if i % 50 == 25 else "ok"


async def check_run_batch(ctx: ContractContext) -> None:
    """Batches never over max_batch; return acks, raise fails the batch, each message retried and dead-lettered
    on its own count; a BatchResult fails only the named ones; what the handler settled stays settled; an
    undecodable message is dead-lettered alone; with per-key ordering, a key is never in two batches at once."""
    notes = [await _as_told(ctx)]
    if ctx.caps.ordering == "per_key":
        notes.append(await _ordered(ctx))
    for note in notes:
        ctx.note(note)


async def _as_told(ctx: ContractContext) -> str:
    n = ctx.scale(300, 60)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    items = [Outgoing({"i": i, "role": _role(i)}) for i in range(n)]
    undecodable = [Outgoing(b"{not json", content_type="application/json") for _ in range(3)]
    role: dict[str, str] = {}
    for chunk in chunked([*items, *undecodable], 100):
        for msg_id, item in zip(await producer.send_many(chunk), chunk, strict=True):
            role[msg_id] = item.body["role"] if isinstance(item.body, dict) else "undecodable"
    seen: dict[str, list[int]] = defaultdict(list)
    acked, sentinels = Tally(), Tally()
    sizes: list[int] = []
    raised: list[int] = []

    async def handle(msgs: list[Message[Any]]) -> BatchResult:
        sizes.append(len(msgs))
        failed: dict[Message[Any], BaseException] = {}
        for msg in msgs:
            if is_sentinel(msg):
                sentinels.add(msg.id)
                continue
            seen[msg.id].append(msg.attempt)
            kind = msg.body["role"]
            if kind == "rejected":
                await msg.reject(f"told {msg.id}")
            elif kind == "named":
                failed[msg] = RuntimeError(f"named {msg.id}")
        if any(_raises(m) for m in msgs) and not any(_retried_ok(m) for m in msgs):
            raised.append(len(msgs))
            raise RuntimeError("contract batch boom")
        for msg in msgs:
            if not is_sentinel(msg) and msg not in failed and not msg.settled:
                acked.add(msg.id)
        return BatchResult(failed)

    consumer = ctx.bus.consumer(queue)
    run = consumer.run_batch(handle, max_batch=MAX_BATCH, max_wait=MAX_WAIT, concurrency=2, retry=policy)
    task = ctx.background(run)
    to_die = {i for i, r in role.items() if r in ("named", "rejected", "undecodable")}
    dead, problems = Tally(), list[str]()

    def inspect(msg: Message[Any]) -> None:
        kind, reason = role.get(msg.id), msg.headers.get(HEADER_DEAD_LETTER_REASON, "")
        told = f"named {msg.id}" in reason or "contract batch boom" in reason  # its last batch may have raised
        if kind == "named" and (not told or msg.headers.get(HEADER_ATTEMPTS) != "3"):
            attempts = msg.headers.get(HEADER_ATTEMPTS)
            problems.append(f"{msg.id} (failed by name): reason {reason!r}, attempts {attempts}")
        if kind == "rejected" and f"told {msg.id}" not in reason:
            problems.append(f"{msg.id} (rejected by the handler): reason {reason!r}")
        if kind == "undecodable" and "decode" not in reason.lower():
            problems.append(f"{msg.id} (undecodable): reason {reason!r}")

    ctx.waiting = f"{len(to_die)} dead letters of {len(role)} messages"
    await drain(ctx, ctx.bus.dead_letters(queue), dead, lambda: dead.distinct >= len(to_die), on_message=inspect)
    ok = {i for i, r in role.items() if r in ("ok", "raiser")}
    ctx.waiting = f"{len(ok)} acked"
    await acked.wait_until(lambda: acked.distinct >= len(ok))
    dead_line = dead.ensure_exact(to_die, "dead-lettered (named, rejected, undecodable)")
    acked_line = acked.ensure_exact(ok, "acked by returning")
    quiet = await quiet_then_sentinel(ctx, sentinels, sentinel_sender(producer), ctx.lock_window, "after all settled")
    await stop_run(consumer, task)
    ensure(not problems, f"{dead_line}; {'; '.join(problems[:3])}")
    ensure(
        bool(sizes) and max(sizes) <= MAX_BATCH, f"a batch of {max(sizes, default=0)} messages; max_batch={MAX_BATCH}"
    )
    ensure(bool(raised), "no batch held a raiser on its first delivery: the whole-batch failure was not exercised")
    expected = {"named": ([1, 2, 3],), "rejected": ([1],), "ok": ([1], [1, 2]), "raiser": ([1], [1, 2])}
    wrong = [f"{i} ({role[i]}): attempts {a}" for i, a in seen.items() if a not in expected[role[i]]]
    reached = [i for i, r in role.items() if r == "undecodable" and i in seen]
    ensure(not reached, f"undecodable messages reached the batch handler: {examples(reached)}")
    ensure(not wrong, f"{len(wrong)} messages handled other than as told, e.g. {'; '.join(wrong[:3])}")
    return (
        f"{acked_line}; {dead_line}; {len(sizes)} batches of at most {max(sizes)} (max_batch={MAX_BATCH}); "
        f"{len(raised)} raised whole, their messages retried on their own counts; failed by name: handled 3 times "
        f"then dead-lettered; rejected by the handler: once; {quiet}"
    )


def _raises(msg: Message[Any]) -> bool:
    return not is_sentinel(msg) and msg.attempt == 1 and msg.body["role"] == "raiser"


def _retried_ok(msg: Message[Any]) -> bool:
    return not is_sentinel(msg) and msg.attempt > 1 and msg.body["role"] in ("ok", "raiser")


async def _ordered(ctx: ContractContext) -> str:
    keys, per_key = ctx.scale(8, 4), ctx.scale(25, 10)
    queue = ctx.name("keyed")
    producer = ctx.bus.producer(queue)
    items = [Outgoing({"k": f"key-{k}", "i": i}, key=f"key-{k}") for i in range(per_key) for k in range(keys)]
    sent: list[str] = []
    for chunk in chunked(items, 100):
        sent += await producer.send_many(chunk)
    next_i = {f"key-{k}": 0 for k in range(keys)}
    busy: set[str] = set()
    violations: list[str] = []
    done = Tally()

    async def handle(msgs: list[Message[Any]]) -> None:
        mine = [m.body["k"] for m in msgs]
        for key in set(mine) & busy:
            violations.append(f"{key} in two batches at once")
        busy.update(mine)
        try:
            for msg in msgs:
                key, i = msg.body["k"], msg.body["i"]
                if i != next_i[key]:
                    violations.append(f"{key}#{i} handed over while #{next_i[key]} was next")
                next_i[key] = max(next_i[key], i + 1)
            await asyncio.sleep(0.005)
        finally:
            busy.difference_update(mine)
        for msg in msgs:
            done.add(msg.id)

    consumer = ctx.bus.consumer(queue)
    # Half the keys per batch: batches fill (a key's next message waits for its batch to be settled), and two
    # run at once.
    task = ctx.background(consumer.run_batch(handle, max_batch=keys // 2, max_wait=MAX_WAIT, concurrency=4))
    ctx.waiting = f"{len(sent)} keyed messages"
    await done.wait_until(lambda: done.distinct >= len(sent) or len(violations) > 20)
    await stop_run(consumer, task)
    ensure(not violations, f"{len(violations)} ordering violations, e.g. {'; '.join(violations[:3])}")
    line = done.ensure_exact(set(sent), f"{keys} keys x {per_key}, concurrency 4")
    return f"{line}; 0 ordering violations, no key in two batches at once"
