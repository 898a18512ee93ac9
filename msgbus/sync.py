"""Blocking facade: the same shapes as the async API for code that isn't async.

Each ``SyncBus`` runs the async core on one background event-loop thread (a portal); every method
is one call through it, so there is no second copy of the I/O path. Handlers given to ``run`` are
plain functions executed in worker threads, and may settle their message themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

from . import _bus
from ._batch import BatchMiddleware, BatchResult
from ._capabilities import Capabilities
from ._message import Message
from ._retry import RetryPolicy
from .errors import ClosedError

__all__ = ["SyncBus", "SyncConsumer", "SyncMessage", "SyncProducer", "SyncPublisher", "connect"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

log = logging.getLogger("msgbus")


class _Portal:
    """One event loop on a daemon thread; ``call`` runs a coroutine there and blocks for its result.

    The loop survives a ``SystemExit`` or ``KeyboardInterrupt`` raised inside it (by a handler, say): asyncio
    lets those escape the loop, which would leave every blocked caller waiting forever. The portal logs it,
    runs the loop on, and the exception reaches the caller whose call raised it. Once the loop has stopped,
    every call still waiting, and every later one, fails with ``ClosedError``: nothing ever hangs on it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._waiting: set[Future[Any]] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name="msgbus-portal", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            while True:
                try:
                    self.loop.run_forever()
                    return  # stop() was called
                except BaseException as exc:  # escaped a task; the task holds it for its caller too
                    log.warning("msgbus.sync: %s raised on the event loop; passed to its caller", type(exc).__name__)
        finally:
            with self._lock:
                self._stopped = True
                waiting, self._waiting = list(self._waiting), set()
            for future in waiting:
                if not future.done():
                    future.set_exception(ClosedError("the msgbus.sync event loop stopped before this call finished"))

    def call(self, coro: Coroutine[Any, Any, R]) -> R:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("msgbus.sync called from its own event loop thread; use the async API there")
        with self._lock:
            if self._stopped:
                coro.close()
                raise ClosedError("the msgbus.sync bus is closed (its event loop has stopped)")
            future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._waiting.add(future)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # graceful: run() treats cancellation as a stop request
            try:
                future.result()
            except BaseException:
                pass
            raise
        finally:
            with self._lock:
                self._waiting.discard(future)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def connect(url: str | None = None, *, profile: str | None = None, **options: Any) -> SyncBus:
    """Blocking twin of ``msgbus.connect``; use as a context manager or call ``close()``."""
    from . import connect as aconnect

    return SyncBus(aconnect(url, profile=profile, **options))


class SyncBus:
    """Blocking twin of ``msgbus.Bus``."""

    def __init__(self, bus: _bus.Bus) -> None:
        self._bus = bus
        self._portal = _Portal()

    @property
    def capabilities(self) -> Capabilities:
        return self._bus.capabilities

    @property
    def url(self) -> str:
        return self._bus.url

    def __repr__(self) -> str:
        return f"<SyncBus {self._bus.url}>"

    def open(self) -> None:
        self._portal.call(self._bus.open())

    def close(self) -> None:
        try:
            self._portal.call(self._bus.close())
        finally:
            self._portal.stop()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def request(
        self,
        queue: str,
        body: object,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        model: type[Any] | None = None,
    ) -> SyncMessage[Any]:
        """Blocking twin of ``Bus.request``: the reply, or ``RequestTimeout``. Thread-safe: concurrent calls from
        several threads share the bus's one reply listener."""
        reply = self._bus.request(queue, body, timeout=timeout, headers=headers, key=key, model=model)
        return SyncMessage(self._portal.call(reply), self._portal)

    @property
    def dropped_replies(self) -> int:
        return self._bus.dropped_replies

    def producer(self, queue: str) -> SyncProducer:
        return SyncProducer(self._bus.producer(queue), self._portal)

    def publisher(self, topic: str) -> SyncPublisher:
        return SyncPublisher(self._bus.publisher(topic), self._portal)

    def consumer(
        self,
        queue: str,
        *,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> SyncConsumer[Any]:
        consumer = self._bus.consumer(queue, model=model, prefetch=prefetch, retry=retry, content_type=content_type)
        return SyncConsumer(consumer, self._portal)

    def subscriber(
        self,
        topic: str,
        *,
        subscription: str,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> SyncConsumer[Any]:
        sub = self._bus.subscriber(
            topic, subscription=subscription, model=model, prefetch=prefetch, retry=retry, content_type=content_type
        )
        return SyncConsumer(sub, self._portal)

    def dead_letters(
        self,
        name: str,
        *,
        subscription: str | None = None,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        content_type: str | None = None,
    ) -> SyncConsumer[Any]:
        dlq = self._bus.dead_letters(
            name, subscription=subscription, model=model, prefetch=prefetch, content_type=content_type
        )
        return SyncConsumer(dlq, self._portal)


def _blocking(method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[Any, P], R]:
    """The blocking twin of an async ``Producer``/``Publisher`` method: the same signature (derived, not spelled
    again: ``inspect.signature`` and type checkers see the original's), one call through the portal."""
    name = method.__name__

    def call(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._portal.call(getattr(self._p, name)(*args, **kwargs))  # type: ignore[no-any-return]

    functools.update_wrapper(call, method)
    return call


class SyncProducer:
    """Blocking twin of ``msgbus.Producer``."""

    def __init__(self, producer: _bus.Producer, portal: _Portal) -> None:
        self._p = producer
        self._portal = portal

    send = _blocking(_bus.Producer.send)
    send_many = _blocking(_bus.Producer.send_many)


class SyncPublisher:
    """Blocking twin of ``msgbus.Publisher``."""

    def __init__(self, publisher: _bus.Publisher, portal: _Portal) -> None:
        self._p = publisher
        self._portal = portal

    publish = _blocking(_bus.Publisher.publish)
    publish_many = _blocking(_bus.Publisher.publish_many)


class SyncMessage(Generic[T]):
    """Blocking view of a received ``Message``: same attributes, blocking ``ack``/``nack``/``reject``."""

    def __init__(self, message: Message[T], portal: _Portal) -> None:
        self.message = message
        self._portal = portal

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    @property
    def body(self) -> T:
        return self.message.body

    def ack(self) -> None:
        self._portal.call(self.message.ack())

    def nack(self, delay: float | None = None) -> None:
        self._portal.call(self.message.nack(delay))

    def reject(self, reason: str) -> None:
        self._portal.call(self.message.reject(reason))

    def reply(self, body: object, *, headers: Mapping[str, str] | None = None) -> None:
        self._portal.call(self.message.reply(body, headers=headers))

    def __repr__(self) -> str:
        return repr(self.message)


class SyncConsumer(Generic[T]):
    """Blocking twin of ``msgbus.Consumer``: iterate, ``receive`` or ``run(handler)``."""

    def __init__(self, consumer: _bus.Consumer[T], portal: _Portal) -> None:
        self._c = consumer
        self._portal = portal

    def open(self) -> None:
        self._portal.call(self._c.open())

    def close(self) -> None:
        self._portal.call(self._c.close())

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self, max_messages: int = 1, timeout: float = 1.0) -> list[SyncMessage[T]]:
        msgs = self._portal.call(self._c.receive(max_messages, timeout))
        return [SyncMessage(m, self._portal) for m in msgs]

    def __iter__(self) -> Iterator[SyncMessage[T]]:
        while True:
            yield from self.receive(1, 1.0)

    def stop(self) -> None:
        self._portal.loop.call_soon_threadsafe(self._c.stop)

    def run(
        self,
        handler: Callable[[SyncMessage[T]], None],
        *,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        shutdown_timeout: float = 30.0,
        middleware: Sequence[Any] = (),
    ) -> None:
        """Block running ``handler`` in ``concurrency`` threads until ``stop()`` or Ctrl-C."""
        portal = self._portal

        async def call(msg: Message[T]) -> None:
            await asyncio.to_thread(handler, SyncMessage(msg, portal))

        self._portal.call(
            self._c.run(
                call, concurrency=concurrency, retry=retry, middleware=middleware, shutdown_timeout=shutdown_timeout
            )
        )

    def run_batch(
        self,
        handler: Callable[[list[SyncMessage[T]]], BatchResult | None],
        *,
        max_batch: int = 100,
        max_wait: float = 0.5,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        middleware: Sequence[BatchMiddleware] = (),
        shutdown_timeout: float = 30.0,
    ) -> None:
        """Block running ``handler`` on lists of messages in ``concurrency`` threads until ``stop()`` or Ctrl-C.

        ``Consumer.run_batch``'s rules: return acks the batch, raise fails it all, a ``BatchResult`` naming some of
        its ``SyncMessage`` objects fails those only. ``middleware`` wraps the async batch handler, as in ``run``.
        """
        portal = self._portal

        async def call(msgs: list[Message[T]]) -> BatchResult | None:
            views = [SyncMessage(m, portal) for m in msgs]
            return _unwrapped(await asyncio.to_thread(handler, views))

        self._portal.call(
            self._c.run_batch(
                call,
                max_batch=max_batch,
                max_wait=max_wait,
                concurrency=concurrency,
                retry=retry,
                middleware=middleware,
                shutdown_timeout=shutdown_timeout,
            )
        )


def _unwrapped(result: Any) -> BatchResult | None:
    """A sync batch handler's result for the core: the messages a ``BatchResult`` names as ``SyncMessage`` views
    replaced by theirs; anything else unchanged (the core refuses what is malformed)."""
    if not isinstance(result, BatchResult):
        return result  # type: ignore[no-any-return]  # None, or garbage the core refuses with a TypeError
    failed = {m.message if isinstance(m, SyncMessage) else m: exc for m, exc in result.failed.items()}
    return BatchResult(failed)
