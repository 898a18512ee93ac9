"""Request/reply: the one reply queue of a bus and the listener that hands each reply to the request waiting for it.

A request carries ``x-msgbus-reply-to`` (this bus's reply queue); the responder's ``msg.reply()`` sends its reply
there with the request's id as correlation id, before the request is acked. One listener per bus reads the reply
queue and resolves the waiting request by correlation id, so concurrent requests share it and never wait for each
other. A reply nobody waits for (late, duplicated by a redelivered request, or stray) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ._message import Message
from .adapter import Adapter, Endpoint
from .errors import CapabilityMissing, ClosedError, MsgbusError

log = logging.getLogger("msgbus")

#: One receive call on the reply queue: ``(max_messages, timeout) -> messages``.
Receive = Callable[[int, float], Awaitable[list[Message[Any]]]]
BATCH = 100  # replies taken per receive call
RETRY = 0.5  # seconds before receiving again after the reply queue failed (the adapter reconnects)
DELETE_TIMEOUT = 5.0  # seconds Bus.close waits for the reply queue's deletion before it gives up (and logs)


def reply_queue_name() -> str:
    """A fresh reply queue name, unique to one bus: ``msgbus-reply-`` and 16 random hex digits."""
    return f"msgbus-reply-{os.urandom(8).hex()}"


class Replies:
    """The requests of one bus waiting for replies, by request id, and the task that receives their replies."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.dropped = 0  # replies no request waited for
        self._waiting: dict[str, asyncio.Future[Message[Any]]] = {}
        self._listener: asyncio.Task[None] | None = None

    def start(self, receive: Receive) -> None:
        """Start the listener on the reply queue (once)."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(receive), name="msgbus-replies")

    def expect(self, request_id: str) -> asyncio.Future[Message[Any]]:
        """The future the reply to ``request_id`` resolves; register it before sending the request."""
        future = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, request_id: str) -> None:
        """The request gave up (answered, timed out or cancelled): a reply to it from now on is dropped."""
        self._waiting.pop(request_id, None)

    def deliver(self, msg: Message[Any]) -> bool:
        """Hand ``msg`` to the request its correlation id names; False (and counted) when none waits for it."""
        future = self._waiting.pop(msg.correlation_id, None) if msg.correlation_id else None
        if future is None or future.done():
            self.dropped += 1
            log.info(
                "msgbus: dropped reply %s on %s: no request waits for correlation id %r (late, duplicate or stray)",
                msg.id,
                self.queue,
                msg.correlation_id,
            )
            return False
        future.set_result(msg)
        return True

    async def _listen(self, receive: Receive) -> None:
        while True:
            try:
                batch = await receive(BATCH, 5.0)
            except ClosedError:
                return
            except MsgbusError as err:  # the adapter reconnects; the waiting requests keep their own timeouts
                log.warning("msgbus: receiving replies on %s failed, retrying: %s", self.queue, err)
                await asyncio.sleep(RETRY)
                continue
            for msg in batch:
                self.deliver(msg)
                try:
                    await msg.ack()  # after: the caller does not wait for it. Lost, it comes back as a duplicate
                except MsgbusError as err:
                    log.debug("msgbus: could not ack reply %s: %s", msg.id, err)

    async def close(self) -> None:
        """Stop the listener; requests still waiting raise ``ClosedError``."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for request_id, future in self._waiting.items():
            if not future.done():
                future.set_exception(ClosedError(f"the bus closed while request {request_id} waited for its reply"))
        self._waiting.clear()


async def delete_queue(adapter: Adapter, queue: str) -> None:
    """Delete a closing bus's reply queue, best effort: a failure or ``DELETE_TIMEOUT`` is logged, never raised."""
    try:
        async with asyncio.timeout(DELETE_TIMEOUT):
            await adapter.delete(Endpoint("queue", queue))
    except CapabilityMissing as err:
        log.info("msgbus: reply queue %s stays on the backend: %s", queue, err)
    except (MsgbusError, TimeoutError) as err:
        log.warning("msgbus: could not delete reply queue %s, it stays on the backend: %s", queue, err or "timed out")
