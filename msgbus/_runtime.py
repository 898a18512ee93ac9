"""The consume loop behind ``Consumer.run``: concurrency, retries, dead-letter, lock extension, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._message import Message
from ._retry import RetryPolicy
from .errors import MsgbusError

if TYPE_CHECKING:
    from ._bus import Consumer

log = logging.getLogger("msgbus")

Handler = Callable[[Message[Any]], Awaitable[None]]
Middleware = Callable[[Handler], Handler]


def compose(handler: Handler, middleware: Sequence[Middleware]) -> Handler:
    """Wrap ``handler`` once: the first middleware is the outermost."""
    for mw in reversed(middleware):
        handler = mw(handler)
    return handler


async def run(
    consumer: Consumer[Any],
    handler: Handler,
    *,
    concurrency: int,
    retry: RetryPolicy,
    shutdown_timeout: float,
    stop: asyncio.Event,
) -> None:
    """Run ``concurrency`` workers until ``stop`` is set or the calling task is cancelled."""
    caps = consumer.capabilities
    in_flight: set[Message[Any]] = set()

    async def settle_failure(msg: Message[Any], exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
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

    async def worker() -> None:
        # The per-message path: take from the consumer's buffer without a coroutine when it has some,
        # and track in-flight messages only when their locks need extending.
        buffer = consumer._buffer
        while not stop.is_set():
            msg = buffer.popleft() if buffer else await consumer._next(stop)
            if msg is None:
                return
            if extending:
                in_flight.add(msg)
            try:
                await handler(msg)
            except asyncio.CancelledError:
                if not msg.settled:
                    await _quietly(msg.nack())
                raise
            except Exception as exc:
                if not msg.settled:
                    try:
                        await settle_failure(msg, exc)
                    except MsgbusError as err:
                        log.warning("msgbus: could not settle failed message %s: %s", msg.id, err)
            else:
                consumer._ack_soon(msg)  # batched with other workers' acks; no-op if the handler settled it
            finally:
                in_flight.discard(msg)

    async def extend_locks() -> None:
        assert caps.lock_duration is not None
        period = max(caps.lock_duration / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            for msg in [*in_flight, *consumer._buffered()]:
                if not msg.settled:
                    await _quietly(msg._delivery.extend(caps.lock_duration))

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
        await consumer._release_buffered()
        _done, pending = await asyncio.wait(workers, timeout=shutdown_timeout) if workers else (set(), set())
        for w in pending:
            w.cancel()
        if pending:
            log.warning(
                "msgbus: %d handler(s) still running after %.1fs; cancelled and nacked", len(pending), shutdown_timeout
            )
            await asyncio.wait(pending)
        if extender is not None:
            extender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await extender
        stop_wait.cancel()
        await consumer._release_buffered()
        await consumer._drain_acks()
        await consumer._release_receiver()


async def _quietly(aw: Awaitable[None]) -> None:
    try:
        await aw
    except MsgbusError as err:
        log.debug("msgbus: ignored during cleanup: %s", err)
