"""The consume loop behind ``Consumer.run`` and ``run_batch``: concurrency, retries, dead-letter, lock extension,
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from ._batch import Batch, failures
from ._codec import describe
from ._inbox import Inbox
from ._message import Message
from ._redelivery import Redeliveries, dead_letter_over_limit
from ._retry import RetryPolicy
from ._waits import wait_set
from .adapter import MAX_DEAD_LETTER_REASON
from .errors import MsgbusError

log = logging.getLogger("msgbus")

Handler = Callable[[Message[Any]], Awaitable[None]]
Middleware = Callable[[Handler], Handler]
H = TypeVar("H")

# The ack bound: once ACK_BATCH acks wait, the runtime gives the ack flush a turn of the loop before the next
# handler (it takes them at once unless a batch is in flight); once the oldest has waited ACK_DELAY seconds, it
# waits until they are taken. So even if no handler ever awaits, an ack goes out within ACK_DELAY (plus one
# handler and one batch in flight), and a consumer that dies re-delivers at most that much (docs/guide.md).
ACK_BATCH = 64
ACK_DELAY = 0.05


def compose(handler: H, middleware: Sequence[Callable[[H], H]]) -> H:
    """Wrap ``handler`` once: the first middleware is the outermost."""
    for mw in reversed(middleware):
        handler = mw(handler)
    return handler


async def run(
    inbox: Inbox[Any],
    handler: Handler | Batch,
    *,
    concurrency: int,
    retry: RetryPolicy,
    shutdown_timeout: float,
    stop: asyncio.Event,
) -> None:
    """Run ``concurrency`` workers on a consumer's ``inbox`` until ``stop`` is set or the calling task is
    cancelled. With a ``Batch``, each worker gathers a list of messages and hands it to the batch handler."""
    caps = inbox.capabilities
    in_flight: set[Message[Any]] = set()
    limit = retry.max_attempts
    turns = Redeliveries(inbox, limit)
    # A dead-letter destination has no delivery limit: a dead letter is not re-dead-lettered.
    counted = caps.counts_deliveries and not inbox.endpoint.dead_letter

    async def settle_failure(msg: Message[Any], exc: BaseException) -> None:
        reason = describe(exc, MAX_DEAD_LETTER_REASON)
        if msg.attempt >= retry.max_attempts:
            log.warning("msgbus: message %s dead-lettered after %d attempts: %s", msg.id, msg.attempt, reason)
            await msg.reject(reason)
            return
        delay = retry.backoff(msg.attempt)
        log.info("msgbus: message %s attempt %d failed (%s); retry in %.2fs", msg.id, msg.attempt, reason, delay)
        if not caps.delayed_nack and delay > 0:
            await asyncio.sleep(delay)  # hold it (lock extension keeps it ours) rather than spin
            await msg.nack()
        else:
            await msg.nack(delay)

    extending = bool(caps.lock_extension and caps.lock_duration)

    async def failed(msg: Message[Any], exc: BaseException) -> None:
        try:
            await settle_failure(msg, exc)
        except MsgbusError as err:
            log.warning("msgbus: could not settle failed message %s: %s", msg.id, err)

    async def worker() -> None:
        # The per-message path: take from the inbox's buffer without a coroutine when it has some,
        # and track in-flight messages only when their locks need extending.
        buffer = inbox.buffer
        batch = handler if isinstance(handler, Batch) else None
        call = cast(Handler, handler)  # when ``batch`` is None: checked once here, not per message
        while not stop.is_set():
            msg = buffer.popleft() if buffer else await inbox.take(stop)
            if msg is None:
                return
            if extending:
                in_flight.add(msg)  # from now on: it may wait for its turn longer than its lock
            alone = False
            if counted and msg._delivery.attempt > 1:  # a redelivery (see _redelivery.py)
                if msg._delivery.attempt > limit:
                    in_flight.discard(msg)
                    await dead_letter_over_limit(msg, limit, inbox)
                    continue
                if turns.suspect(msg):
                    first, msg = msg, await turns.enter(msg)
                    in_flight.discard(first)  # back in the buffer, dead-lettered, or chosen
                    if msg is None:
                        continue
                    if extending:
                        in_flight.add(msg)
                    alone = True
            if batch is not None:
                await handle_batch(batch, await gather_batch(batch, msg, alone), alone)
                continue
            if not alone:
                if turns.held:
                    await turns.wait()
                turns.running += 1
            try:
                await call(msg)
            except Exception as exc:
                if alone:
                    turns.leave(msg)  # it can no longer kill anyone: others may run during its backoff
                if not msg.settled:
                    await failed(msg, exc)
            except asyncio.CancelledError as exc:
                # Raised by the handler itself (nobody cancelled this worker): a failure like any other, or
                # run() would end as if stopped. Real cancellation (shutdown_timeout) nacks and ends the worker.
                if not _cancelling():
                    if alone:
                        turns.leave(msg)
                    if not msg.settled:
                        await failed(msg, exc)
                    continue
                if not msg.settled:
                    await _quietly(msg.nack())
                raise
            except BaseException:  # SystemExit, KeyboardInterrupt...: they end run(); the message comes back
                if not msg.settled:
                    await _quietly(msg.nack())
                raise
            else:
                inbox.ack_soon(msg)  # batched with other workers' acks; no-op if the handler settled it
                if alone:
                    await inbox.acks_durable()  # in before the next message starts
                elif inbox.acks_overdue(ACK_BATCH, ACK_DELAY):
                    await inbox.send_acks(ACK_BATCH, ACK_DELAY)
            finally:
                if extending:
                    in_flight.discard(msg)
                if alone:
                    turns.leave(msg)
                else:
                    turns.done()

    async def gather_batch(batch: Batch, first: Message[Any], alone: bool) -> list[Message[Any]]:
        """``first`` and the messages after it, up to ``max_batch`` or until ``max_wait`` seconds have passed, then
        its turn (``turns.running``). A suspect runs alone: in a batch of its own, never gathered with others."""
        msgs, buffer = [first], inbox.buffer
        if alone:
            return msgs
        until = asyncio.get_running_loop().time() + batch.max_wait
        try:
            while len(msgs) < batch.max_batch and not stop.is_set():
                if inbox.unsettled >= (inbox.prefetch or 0) and not buffer:
                    break  # no room: nothing more comes before something is settled, and this batch is what waits
                msg = buffer.popleft() if buffer else await inbox.take(stop, until)
                if msg is None:
                    break
                if extending:
                    in_flight.add(msg)  # waiting in a batch, its lock is extended like a handled message's
                if counted and msg._delivery.attempt > limit:
                    in_flight.discard(msg)
                    await dead_letter_over_limit(msg, limit, inbox)
                elif counted and msg._delivery.attempt > 1 and turns.suspect(msg):
                    in_flight.discard(msg)
                    buffer.appendleft(msg)  # the first of a later batch, alone
                    break
                else:
                    msgs.append(msg)
            if turns.held:
                await turns.wait()
        except BaseException:  # cancelled while gathering: what it holds goes back, nothing waits for its lock
            for msg in msgs:
                in_flight.discard(msg)
            await asyncio.gather(*(_quietly(msg.nack()) for msg in msgs))
            raise
        turns.running += 1
        return msgs

    async def handle_batch(batch: Batch, msgs: list[Message[Any]], alone: bool) -> None:
        """The batch handler on ``msgs``: return acks the unsettled ones but those it names as failed; raise fails
        them all; each failed message retries or is dead-lettered on its own attempt count."""
        try:
            failing = failures(await batch.handler(msgs), msgs)
        except Exception as exc:
            if alone:
                turns.leave(msgs[0])
            await asyncio.gather(*(failed(msg, exc) for msg in msgs if not msg.settled))
        except asyncio.CancelledError as exc:
            if not _cancelling():  # raised by the handler: a failure (see worker)
                if alone:
                    turns.leave(msgs[0])
                await asyncio.gather(*(failed(msg, exc) for msg in msgs if not msg.settled))
                return
            await asyncio.gather(*(_quietly(msg.nack()) for msg in msgs))
            raise
        except BaseException:
            await asyncio.gather(*(_quietly(msg.nack()) for msg in msgs))
            raise
        else:
            await asyncio.gather(*(failed(msg, exc) for msg, exc in failing.items() if not msg.settled))
            for msg in msgs:
                inbox.ack_soon(msg)  # no-op for those settled above or by the handler
            if alone:
                await inbox.acks_durable()
            elif inbox.acks_overdue(ACK_BATCH, ACK_DELAY):
                await inbox.send_acks(ACK_BATCH, ACK_DELAY)
        finally:
            for msg in msgs:
                in_flight.discard(msg)
            if alone:
                turns.leave(msgs[0])
            else:
                turns.done()

    async def extend_locks() -> None:
        # Ends by itself once the handlers are done, not only when cancelled: a client library that turns the
        # cancellation of an extend call into an error (redis-py did: the error is logged, the loop went on)
        # kept run() waiting for this task for a minute after stop().
        assert caps.lock_duration is not None
        period = max(caps.lock_duration / 3, 0.05)
        while not await wait_set(handlers_done, period):
            for msg in [*in_flight, *inbox.buffer]:
                if not msg.settled:
                    await _quietly(msg._delivery.extend(caps.lock_duration))

    handlers_done = asyncio.Event()  # in-flight handlers keep their locks extended until then
    workers = [asyncio.create_task(worker(), name=f"msgbus-worker-{i}") for i in range(concurrency)]
    extender = asyncio.create_task(extend_locks()) if extending else None
    stop_wait = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*workers, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        for w in workers:
            if w.done() and not w.cancelled() and w.exception() is not None:
                raise w.exception()  # type: ignore[misc]
    finally:
        stop.set()
        await inbox.release()
        _done, pending = await asyncio.wait(workers, timeout=shutdown_timeout) if workers else (set(), set())
        for w in pending:
            w.cancel()
        if pending:
            log.warning(
                "msgbus: %d handler(s) still running after %.1fs; cancelled and nacked", len(pending), shutdown_timeout
            )
            await asyncio.wait(pending)
        handlers_done.set()
        if extender is not None:
            extender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await extender
        stop_wait.cancel()
        for w in workers:  # the first failure was raised above; the others are reported by it, not by asyncio
            if w.done() and not w.cancelled():
                w.exception()
        await inbox.release()
        await inbox.drain()
        await inbox.release_read_ahead()


def _cancelling() -> bool:
    """Whether the current task was asked to stop with ``cancel()`` (not just handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _quietly(aw: Awaitable[None]) -> None:
    try:
        await aw
    except MsgbusError as err:
        log.debug("msgbus: ignored during cleanup: %s", err)
