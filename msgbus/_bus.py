"""The bus and its four roles: Producer and Publisher send, Consumer and Subscriber receive."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, overload

from . import _codec, _redelivery, _redrive, _reply, _runtime, _telemetry
from ._batch import MAX_BATCH, Batch, BatchHandler, BatchMiddleware
from ._capabilities import Capabilities
from ._coalesce import Coalescer
from ._inbox import Inbox
from ._message import Message, Outgoing
from ._retry import RetryPolicy
from ._url import BusURL
from .adapter import (
    HEADER_REPLY_TO,
    RESERVED_HEADER_PREFIX,
    Adapter,
    Delivery,
    Endpoint,
    Receiver,
    Record,
    dead_letter_reason,
)
from .errors import (
    CapabilityMissing,
    ClosedError,
    ConfigError,
    ConnectionLost,
    DecodeError,
    InvalidMessage,
    MessageTooLarge,
    RequestTimeout,
)

log = logging.getLogger("msgbus")

T = TypeVar("T")


class _Ids:
    """Message ids: a random per-process prefix plus a counter (unique, cheap; re-seeded after fork)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_id = _Ids()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} name must be 1-200 characters of letters, digits, '_', '.', '-' (starting with a letter or "
            f"digit), got {name!r}"
        )
    return name


class Bus:
    """A connection to one backend; an async context manager. Task-safe; open once, share widely."""

    def __init__(
        self, adapter: Adapter, url: BusURL, *, create_topology: bool = True, options: Mapping[str, str] | None = None
    ) -> None:
        self._adapter = adapter
        self._url = url
        self._options = dict(options or {})
        self._create = create_topology
        self._state = "new"
        self._open_lock = asyncio.Lock()
        self._declared: set[Endpoint] = set()
        self._consumers: set[Consumer[Any]] = set()
        self._coalescers: dict[Endpoint, Coalescer] = {}
        self._providers: tuple[Any, Any] = (None, None)  # instrument()'s, else the global ones
        self._telemetry = _telemetry.resolve(url)  # None: tracing and metrics off, nothing done per message
        self._replies: _reply.Replies | None = None  # this bus's reply queue, once it made a request
        self._replies_lock = asyncio.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return self._adapter.capabilities

    @property
    def url(self) -> str:
        """The bus URL with secrets redacted."""
        return self._url.redacted

    @property
    def options(self) -> dict[str, str]:
        """Every option this bus runs with, as text: those the URL gave and the defaults the adapter applied.

        Secret-looking values are redacted. ``msgbus contract`` prints them, so a run says what it proved.
        """
        return dict(self._options)

    @property
    def adapter(self) -> Adapter:
        """The backend adapter (escape hatch; not portable)."""
        return self._adapter

    def __repr__(self) -> str:
        return f"<Bus {self._url.redacted} {self._state}>"

    async def open(self) -> None:
        """Connect to the backend; idempotent. Raises ``ConnectionLost`` when it cannot be reached."""
        if self._state == "open":
            return
        async with self._open_lock:
            if self._state == "closed":
                raise ClosedError(f"{self!r} is closed")
            if self._state == "new":
                self._telemetry = _telemetry.resolve(self._url, *self._providers)  # configured since connect()?
                await self._adapter.open()
                self._state = "open"

    def instrument(self, *, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        """Trace and measure this bus with these OpenTelemetry providers instead of the global ones.

        Without this, a bus uses the global providers configured when it was created or opened, if any
        (docs/observability.md). Takes effect for sends and ``run()`` calls that start after it.
        """
        self._providers = (tracer_provider, meter_provider)
        self._telemetry = _telemetry.resolve(self._url, tracer_provider, meter_provider)

    async def close(self) -> None:
        """Close consumers, then disconnect; idempotent. A consumer's running ``run()`` is stopped gracefully
        first (in-flight handlers finish within its ``shutdown_timeout`` and their acks go out), so closing the
        bus from another task does not pull the connection from under finished work. A bus that made requests
        then deletes its reply queue (best effort, logged when it cannot)."""
        if self._state == "closed":
            return
        if self._replies is not None:
            await self._replies.close()
        consumers = list(self._consumers)
        if consumers:
            await asyncio.gather(*(c.close() for c in consumers))
        if self._replies is not None:  # once nothing reads it (a Kafka group with members cannot be deleted)
            await _reply.delete_queue(self._adapter, self._replies.queue)
        self._state = "closed"
        await self._adapter.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ready(self, endpoint: Endpoint) -> None:
        if self._state != "open":
            await self.open()
        if endpoint not in self._declared:
            await self._adapter.declare(endpoint, create=self._create)
            self._declared.add(endpoint)

    async def _store(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        if self._state == "closed":
            raise ClosedError(f"{self!r} is closed")
        await self._ready(endpoint)
        await self._adapter.send(endpoint, records, delay)

    def _coalescer(self, endpoint: Endpoint) -> Coalescer | None:
        """Where concurrent single sends to ``endpoint`` share adapter calls (``_coalesce``); None: not here."""
        coalescer = self._coalescers.get(endpoint)
        if coalescer is None and self._adapter.coalesce_sends:
            coalescer = self._coalescers[endpoint] = Coalescer(lambda records: self._store(endpoint, records))
        return coalescer

    async def ping(self, timeout: float = 5.0) -> float:
        """One real round trip to the backend (``Adapter.ping``: a cheap metadata call), opening the bus first if
        needed; returns the seconds it took. Raises ``ConnectionLost`` when the backend does not answer within
        ``timeout`` seconds (a hung connection included), or the adapter's typed error when it refuses."""
        timeout = _config_seconds("timeout", timeout)
        if self._state == "closed":
            raise ClosedError(f"{self!r} is closed")
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self.open()
                await self._adapter.ping()
        except TimeoutError:
            raise ConnectionLost(f"{self.url} did not answer a ping within {timeout:g}s") from None
        return time.monotonic() - started

    async def redrive(
        self,
        name: str,
        *,
        subscription: str | None = None,
        limit: int | None = None,
        filter: _redrive.Filter | None = None,
        dry_run: bool = False,
        idle: float = 2.0,
        progress: _redrive.Progress | None = None,
    ) -> _redrive.Redriven:
        """Move the dead letters of queue ``name`` (or of ``subscription`` of topic ``name``) back to it.

        Each keeps its id, key, body and headers; its attempt count starts again; why it died is kept in
        ``x-msgbus-dead-letter-history``. At least once: a batch is sent back before its dead letters are removed,
        so a crash in between duplicates, never loses. ``limit`` caps how many move; ``filter(message)`` picks
        them (the others stay); ``dry_run`` moves none. Stops once a receive waits ``idle`` seconds for nothing,
        or once 1000 dead letters were left in place. ``progress(moved, looked_at)`` is called per batch.
        """
        if limit is not None and not _whole(limit, 1, 10**12):
            raise ConfigError(f"limit must be a whole number >= 1 or None, got {limit!r:.40}")
        if filter is not None and not callable(filter):
            raise ConfigError(f"filter must be a function of a message, not {type(filter).__name__}")
        idle = _config_seconds("idle", idle)
        dead = self.dead_letters(name, subscription=subscription, prefetch=_redrive.HOLD + _redrive.BATCH)
        source = Endpoint(dead._endpoint.kind, name, subscription)
        target = source if subscription is None else Endpoint("topic", name)  # marked for it alone
        done = _redrive.Redriven()
        held: list[Message[Any]] = []
        seen: set[str] = set()
        async with dead:
            try:
                while limit is None or len(done.moved) < limit:
                    want = _redrive.BATCH if limit is None else min(_redrive.BATCH, limit - len(done.moved))
                    batch = await dead._receive(want, idle)
                    if not batch:
                        break
                    take = []
                    for msg in batch:
                        # Seen already: it died again since this redrive sent it back; left for the next one.
                        if dry_run or msg.id in seen or (filter is not None and not filter(msg)):
                            held.append(msg)
                        else:
                            take.append(msg)
                        seen.add(msg.id)
                    if take:
                        records = [_redrive.redriven_record(_codec.sanitize(m._delivery), subscription) for m in take]
                        await self._store(target, records)  # durable when it returns: only now may the dead go
                        for msg in take:
                            await msg.ack()
                        done.moved += [m.id for m in take]
                    if progress is not None:
                        progress(len(done.moved), len(seen))
                    if len(held) >= _redrive.HOLD:
                        break
                await dead._inbox.acks_durable()
                done.left = [m.id for m in held]
            finally:
                for msg in held:
                    await msg.nack()  # back at once, not when a lock expires
        return done

    @overload
    async def request(
        self,
        queue: str,
        body: object,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        model: None = None,
    ) -> Message[Any]: ...
    @overload
    async def request(
        self,
        queue: str,
        body: object,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        model: type[T],
    ) -> Message[T]: ...
    async def request(
        self,
        queue: str,
        body: object,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        model: type[Any] | None = None,
    ) -> Message[Any]:
        """Send ``body`` to work queue ``queue`` as a request and return its reply (``msg.reply()`` on the other
        side), its body decoded (into ``model`` when given); ``DecodeError`` when it does not decode. Task-safe:
        concurrent requests share this bus's one reply queue and listener, and do not wait for each other.

        ``RequestTimeout`` when no reply came within ``timeout`` seconds (the send included); the request may
        still be handled, and its late reply is dropped (``dropped_replies``). The reply comes acked. The reply
        queue is created on the first request and is this bus's alone (``msgbus-reply-<16 hex>``); ``close()``
        deletes it.
        """
        timeout = _config_seconds("timeout", timeout)
        if model is not None:
            _codec.check_model(model)
        producer = self.producer(queue)
        replies = await self._reply_listener()
        request_id = new_id()
        item = Outgoing(body, key, headers, request_id)
        waiting = replies.expect(request_id)
        try:
            async with asyncio.timeout(timeout):
                await producer._one(item, None, {HEADER_REPLY_TO: replies.queue})
                reply = await waiting
        except TimeoutError:
            raise RequestTimeout(f"no reply to request {request_id} on queue {queue!r} within {timeout:g}s") from None
        finally:
            replies.forget(request_id)
        reply.body = _codec.decode_delivery(reply._delivery, model)  # the listener took it raw: a bad one is ours
        return reply

    @property
    def dropped_replies(self) -> int:
        """Replies this bus received that no request waited for: late (after their request timed out),
        duplicated (a responder crashed between reply and ack) or stray. Each is acked and logged."""
        return 0 if self._replies is None else self._replies.dropped

    async def _reply_listener(self) -> _reply.Replies:
        """This bus's reply queue and its listener, created on first use (always declared: it is ours alone)."""
        if self._replies is not None:
            return self._replies
        async with self._replies_lock:
            if self._replies is None:
                if self._state == "closed":
                    raise ClosedError(f"{self!r} is closed")
                replies = _reply.Replies(_reply.reply_queue_name())
                endpoint = Endpoint("queue", replies.queue)
                await self.open()
                await self._adapter.declare(endpoint, create=True)
                self._declared.add(endpoint)
                # Raw bytes (decoded by the request that gets them), so a reply that does not decode reaches its
                # caller as DecodeError at once, not the reply queue's dead letters and a timeout.
                listener: Consumer[Any] = Consumer(self, endpoint, bytes, _reply.BATCH, None)
                replies.start(listener._receive)
                self._replies = replies
        return self._replies

    async def _reply(self, request: Message[Any], body: object, headers: Mapping[str, str] | None) -> None:
        """``Message.reply``: ``body`` to the request's reply queue, correlated by the request's id."""
        reply_to = request.headers.get(HEADER_REPLY_TO)
        if reply_to is None:
            raise InvalidMessage(
                f"message {request.id!r:.80} has no reply-to ({HEADER_REPLY_TO}): it was sent, not requested "
                "with bus.request(), so there is no one to reply to"
            )
        if not _NAME.fullmatch(reply_to):
            raise InvalidMessage(f"message {request.id!r:.80}: its reply-to {reply_to!r:.80} is not a queue name")
        await self.producer(reply_to)._one(Outgoing(body, headers=headers, correlation_id=request.id), None)

    def producer(self, queue: str) -> Producer:
        """A sender to work queue ``queue``: each message is processed by one consumer."""
        return Producer(self, Endpoint("queue", _check_name("queue", queue)))

    def publisher(self, topic: str) -> Publisher:
        """A sender to ``topic``: every subscription gets its own copy."""
        return Publisher(self, Endpoint("topic", _check_name("topic", topic)))

    @overload
    def consumer(
        self,
        queue: str,
        *,
        model: None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Consumer[Any]: ...
    @overload
    def consumer(
        self,
        queue: str,
        *,
        model: type[T],
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Consumer[T]: ...
    def consumer(
        self,
        queue: str,
        *,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Consumer[Any]:
        """A competing consumer of work queue ``queue``; ``model`` validates bodies on receipt; ``content_type``
        says what a payload that names no content type is (``"application/json"`` for JSON from other code)."""
        endpoint = Endpoint("queue", _check_name("queue", queue))
        return Consumer(self, endpoint, model, prefetch, retry, content_type)

    @overload
    def subscriber(
        self,
        topic: str,
        *,
        subscription: str,
        model: None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Subscriber[Any]: ...
    @overload
    def subscriber(
        self,
        topic: str,
        *,
        subscription: str,
        model: type[T],
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Subscriber[T]: ...
    def subscriber(
        self,
        topic: str,
        *,
        subscription: str,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        content_type: str | None = None,
    ) -> Subscriber[Any]:
        """A consumer of the durable ``subscription`` of ``topic`` (consumers of one subscription compete);
        ``model`` and ``content_type`` as for ``consumer``."""
        endpoint = Endpoint("topic", _check_name("topic", topic), _check_name("subscription", subscription))
        return Subscriber(self, endpoint, model, prefetch, retry, content_type)

    def dead_letters(
        self,
        name: str,
        *,
        subscription: str | None = None,
        model: type[Any] | None = None,
        prefetch: int | None = None,
        content_type: str | None = None,
    ) -> Consumer[Any]:
        """A consumer of what was dead-lettered from queue ``name`` (or from ``subscription`` of topic ``name``);
        ``model`` and ``content_type`` as for ``consumer``."""
        if subscription is None:
            endpoint = Endpoint("queue", _check_name("queue", name), dead_letter=True)
        else:
            endpoint = Endpoint("topic", _check_name("topic", name), _check_name("subscription", subscription), True)
        return Consumer(self, endpoint, model, prefetch, None, content_type)


class _Sender:
    """Shared send path of Producer and Publisher: codec -> Record -> adapter."""

    def __init__(self, bus: Bus, endpoint: Endpoint) -> None:
        self._bus = bus
        self._endpoint = endpoint

    @property
    def name(self) -> str:
        return self._endpoint.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._endpoint.name!r} on {self._bus.url}>"

    def _record(
        self, item: Outgoing, now: float, key: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Record:
        """The record the adapter stores for ``item``, checked once, here. ``key`` and ``headers`` are a batch's
        shared ones, already checked: the item's own key wins, and its headers are merged over them."""
        payload, ctype = _codec.encode(item.body, _opt_str("content_type", item.content_type))
        own = _check_headers(item.headers)
        record = Record(
            body=payload,
            id=_opt_str("message_id", item.message_id) or new_id(),
            headers={**headers, **own} if headers and own else own or headers or {},
            key=_opt_str("key", item.key) if item.key is not None else key,
            correlation_id=_opt_str("correlation_id", item.correlation_id),
            content_type=ctype,
            timestamp=now,
        )
        limit = self._bus.capabilities.max_message_size
        if limit is not None:
            size = record.size()
            if size > limit:
                raise MessageTooLarge(size, limit)
        return record

    def _delay(self, delay: float | timedelta | None) -> float | None:
        if delay is None:
            return None
        seconds = _seconds("delay", delay.total_seconds() if isinstance(delay, timedelta) else delay)
        if seconds == 0:
            return None
        caps = self._bus.capabilities
        if not caps.delayed_delivery:
            raise CapabilityMissing(f"{self._bus.url} does not support delayed delivery")
        if caps.max_delay is not None and seconds > caps.max_delay:
            raise InvalidMessage(f"delay {seconds:g}s is longer than the backend's maximum {caps.max_delay:g}s")
        return float(seconds)

    async def _one(
        self, item: Outgoing, delay: float | timedelta | None, reserved: Mapping[str, str] | None = None
    ) -> str:
        record = self._record(item, time.time(), None, reserved)  # reserved: msgbus's own headers, unchecked
        seconds = self._delay(delay)
        telemetry = self._bus._telemetry
        if telemetry is not None:
            await telemetry.send(self._endpoint, (record,), lambda rs: self._put(rs[0], seconds), batch=False)
        else:
            await self._put(record, seconds)
        return record.id

    async def _put(self, record: Record, seconds: float | None) -> None:
        coalescer = self._bus._coalescer(self._endpoint) if seconds is None else None
        if coalescer is not None:
            await coalescer.send(record)
        else:
            await self._bus._store(self._endpoint, (record,), seconds)

    async def _many(
        self, items: Iterable[Any], key: str | None, headers: Mapping[str, str] | None, delay: float | timedelta | None
    ) -> list[str]:
        if isinstance(items, str | bytes | bytearray | Mapping) or not isinstance(items, Iterable):
            raise InvalidMessage(f"send_many takes an iterable of bodies or Outgoing items, not {type(items).__name__}")
        now = time.time()
        records = []
        # Plain bodies share the batch's key and headers: check those once, not per item.
        shared_key = _opt_str("key", key)
        shared_headers = _check_headers(headers)
        limit = self._bus.capabilities.max_message_size
        # Record.size() of a plain item, with the shared metadata counted once per batch.
        shared = len(shared_key or "") + sum(len(k.encode()) + len(v.encode()) for k, v in shared_headers.items())
        encode = _codec.encode
        for item in items:
            if not isinstance(item, Outgoing):
                payload, ctype = encode(item, None)
                record = Record(payload, new_id(), shared_headers, shared_key, None, ctype, now)
                if limit is not None:
                    size = len(payload) + len(record.id) + len(ctype or "") + shared
                    if size > limit:
                        raise MessageTooLarge(size, limit)
                records.append(record)
            else:
                records.append(self._record(item, now, shared_key, shared_headers))
        if records:
            seconds = self._delay(delay)
            telemetry = self._bus._telemetry
            if telemetry is not None:
                await telemetry.send(
                    self._endpoint, records, lambda rs: self._bus._store(self._endpoint, rs, seconds), batch=True
                )
            else:
                await self._bus._store(self._endpoint, records, seconds)
        return [r.id for r in records]


class Producer(_Sender):
    """Sends to a work queue. ``send`` returns once the backend stored the message durably."""

    async def send(
        self,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """Send one message; returns its id. Raises (never fails silently) when the backend did not store it."""
        return await self._one(Outgoing(body, key, headers, message_id, correlation_id, content_type), delay)

    async def send_many(
        self,
        items: Iterable[Any],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
    ) -> list[str]:
        """Send bodies or ``Outgoing`` items as one batch (native where the broker has it); returns their ids."""
        return await self._many(items, key, headers, delay)


class Publisher(_Sender):
    """Publishes to a topic. ``publish`` returns once the backend stored the message durably."""

    async def publish(
        self,
        body: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """Publish one message to every subscription of the topic; returns its id."""
        return await self._one(Outgoing(body, key, headers, message_id, correlation_id, content_type), delay)

    async def publish_many(
        self,
        items: Iterable[Any],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
    ) -> list[str]:
        """Publish bodies or ``Outgoing`` items as one batch; returns their ids."""
        return await self._many(items, key, headers, delay)


def _opt_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a str, not {type(value).__name__}")
    if not value.isascii():
        _check_text(name, value)
    return value


def _check_text(what: str, text: str) -> None:
    """Every backend stores text as UTF-8: a lone surrogate (from a bad decode upstream) cannot go anywhere."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"{what} is not valid text: {exc.reason} at position {exc.start}") from None


def _seconds(what: str, value: object) -> float:
    """A finite, non-negative number of seconds as a float, or ``InvalidMessage`` (never a bare
    ``OverflowError``, and never infinity, which would park a message for good)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if 0 <= seconds < math.inf:
            return seconds
    raise InvalidMessage(f"{what} must be a finite number of seconds >= 0 (or a timedelta), got {value!r:.40}")


def _check_headers(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    if not headers:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidMessage(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    out: dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or not k:
            raise InvalidMessage(f"header names must be non-empty str, got {k!r}")
        if not isinstance(v, str):
            raise InvalidMessage(f"header {k!r} must have a str value, not {type(v).__name__}")
        if k.lower().startswith(RESERVED_HEADER_PREFIX):
            raise InvalidMessage(f"header {k!r}: names starting with {RESERVED_HEADER_PREFIX!r} are reserved")
        if not (k.isascii() and v.isascii()):
            _check_text(f"header {k[:40]!r}", k)
            _check_text(f"header {k[:40]!r}", v)
        out[k] = v
    return out


class Consumer(Generic[T]):
    """Receives from a work queue (or a subscription, or dead letters).

    Use ``run(handler)``, ``async for``, or ``receive()``. At most ``prefetch`` messages are held
    unsettled. Not meant to be iterated by several tasks at once; open one consumer per task instead.
    """

    def __init__(
        self,
        bus: Bus,
        endpoint: Endpoint,
        model: type[T] | None,
        prefetch: int | None,
        retry: RetryPolicy | None,
        content_type: str | None = None,
    ) -> None:
        if prefetch is not None and not _whole(prefetch, 1, MAX_PREFETCH):
            raise ConfigError(f"prefetch must be an int from 1 to {MAX_PREFETCH}, got {prefetch!r:.40}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a msgbus.RetryPolicy, not {type(retry).__name__}")
        if model is not None:
            _codec.check_model(model)
        if content_type is not None:
            _codec.check_content_type(content_type)
        self._bus = bus
        self._endpoint = endpoint
        self._model = model
        self._content_type = content_type  # what a payload naming no content type is
        self._retry = retry or RetryPolicy()
        self._inbox = Inbox(bus._adapter, endpoint, prefetch, self._fetch, bus._reply)  # shared with the runtime
        self._opened = False
        self._stop: asyncio.Event | None = None
        self._running: asyncio.Future[None] | None = None  # while run() works: resolved when it has returned

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._endpoint} on {self._bus.url}>"

    @property
    def capabilities(self) -> Capabilities:
        return self._bus.capabilities

    async def open(self) -> None:
        """Declare the queue or subscription; idempotent. Receiving starts with the first receive or ``run``.

        For a subscription, every message published after ``open()`` returns reaches it.
        """
        if self._inbox.closed:
            raise ClosedError(f"{self!r} is closed")
        if not self._opened:
            await self._bus._ready(self._endpoint)
            self._bus._consumers.add(self)
            self._opened = True

    async def _start(self, default_prefetch: int) -> Receiver:
        """The backend receiver, created on first use with the given prefetch unless one was set."""
        await self.open()
        inbox = self._inbox
        inbox.telemetry = self._bus._telemetry  # the bus resolves it again when it opens or is instrumented
        if inbox.receiver is None:
            inbox.prefetch = inbox.prefetch or default_prefetch
            inbox.receiver = await self._bus._adapter.receiver(self._endpoint, inbox.prefetch)
        return inbox.receiver

    async def close(self) -> None:
        """Stop receiving; messages fetched but not handed out are released (nacked). Idempotent."""
        inbox = self._inbox
        if inbox.closed:
            return
        running = self._running
        if running is not None and not running.done() and _RUNNING.get() is not self:
            # run() is working in another task: let it shut down gracefully (handlers finish, acks go out)
            # before the receiver goes away under them. Not from inside one of its handlers: that would wait
            # for itself until shutdown_timeout.
            self.stop()
            await asyncio.shield(running)
        inbox.closed = True
        if self._stop is not None:
            self._stop.set()
        await inbox.release()
        await inbox.drain()
        if inbox.receiver is not None:
            await inbox.receiver.close()
        self._bus._consumers.discard(self)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _fetch(self, max_messages: int, timeout: float) -> list[Message[T]]:
        """One receive call on the backend; undecodable deliveries are dead-lettered, not returned."""
        receiver = await self._start(16)
        inbox = self._inbox
        room, timeout = await inbox.room(max_messages, timeout)  # the prefetch limit: receivers do not count it
        if not room:
            return []
        out: list[Message[T]] = []
        endpoint, model, content_type = self._endpoint, self._model, self._content_type
        decode = _codec.decode_delivery
        for delivery in await receiver.receive(room, timeout):
            if endpoint.subscription is not None and _redrive.for_other_subscription(delivery.record, endpoint):
                await delivery.ack()  # a redriven dead letter of a sibling subscription: not ours
                continue
            try:
                body = decode(delivery, model, content_type)
            except DecodeError as err:
                if self._endpoint.dead_letter:  # already dead: hand it out raw rather than loop
                    body = _codec.sanitize(delivery).body
                else:
                    await self._dead_letter_undecodable(delivery, err)
                    continue
            out.append(Message(delivery, body, inbox))
        inbox.held(out)
        return out

    async def _dead_letter_undecodable(self, delivery: Delivery, err: DecodeError) -> None:
        record = _codec.sanitize(delivery)  # metadata it can store, whatever the message held
        log.warning("msgbus: message %s on %s is undecodable; dead-lettering it: %s", record.id, self._endpoint, err)
        reason = dead_letter_reason(f"DecodeError: {err}")
        telemetry = self._inbox.telemetry
        try:
            if telemetry is None:
                await delivery.dead_letter(reason)
            else:
                settle = delivery.dead_letter(reason)
                await telemetry.unhandled(self._endpoint, record, delivery.attempt, reason, settle)
        except Exception as exc:  # nothing about one message may stop the loop; its lock expires, it comes back
            log.warning("msgbus: could not dead-letter undecodable %s: %s", record.id, _codec.describe(exc))

    async def receive(self, max_messages: int = 1, timeout: float = 1.0) -> list[Message[T]]:
        """Wait up to ``timeout`` seconds for messages; returns up to ``max_messages`` (``[]`` on timeout)."""
        msgs = await self._receive(max_messages, timeout)
        telemetry = self._inbox.telemetry
        if telemetry is not None and msgs:
            telemetry.received(self._endpoint, msgs)  # a span from now until each is settled
        return msgs

    async def _receive(self, max_messages: int, timeout: float) -> list[Message[T]]:
        """``receive()`` unobserved: for the bus's own readers (redrive, the reply listener), which handle none."""
        if not _whole(max_messages, 1, MAX_PREFETCH):
            raise ConfigError(f"max_messages must be an int from 1 to {MAX_PREFETCH}, got {max_messages!r:.40}")
        timeout = _config_seconds("timeout", timeout)
        inbox = self._inbox
        if inbox.closed:
            raise ClosedError(f"{self!r} is closed")
        out: list[Message[T]] = []
        while inbox.buffer and len(out) < max_messages:
            out.append(inbox.buffer.popleft())
        if not out:
            async with inbox.lock:
                out = await self._fetch(max_messages, timeout)
        return await self._within_limit(out)

    def __aiter__(self) -> AsyncIterator[Message[T]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message[T]]:
        stop = asyncio.Event()
        while True:
            msg = await self._inbox.take(stop)
            if msg is None:
                return
            if await self._within_limit([msg]):
                if self._inbox.telemetry is not None:
                    self._inbox.telemetry.received(self._endpoint, [msg])
                yield msg

    async def _within_limit(self, msgs: list[Message[T]]) -> list[Message[T]]:
        """``msgs`` without those delivered more than ``retry.max_attempts`` times, which are dead-lettered."""
        limit = self._retry.max_attempts
        if self._endpoint.dead_letter or not self.capabilities.counts_deliveries:
            return msgs
        if all(m._delivery.attempt <= limit for m in msgs):
            return msgs
        kept = []
        for m in msgs:
            if m._delivery.attempt > limit:
                await _redelivery.dead_letter_over_limit(m, limit, self._inbox)
            else:
                kept.append(m)
        return kept

    @property
    def ready(self) -> bool:
        """Whether ``run()`` is running and its last receive call reached the backend (a readiness probe's
        answer: connected and receiving). False before ``run()`` starts, after it stops, and while receives fail."""
        running = self._running
        return (
            running is not None
            and not running.done()
            and self._inbox.receiver is not None
            and not self._inbox.failing
            and not self._inbox.closed
        )

    def stop(self) -> None:
        """Ask a running ``run()`` to finish gracefully (no new messages; in-flight ones complete)."""
        if self._stop is not None:
            self._stop.set()

    async def run(
        self,
        handler: _runtime.Handler,
        *,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        middleware: Sequence[_runtime.Middleware] = (),
        shutdown_timeout: float = 30.0,
    ) -> None:
        """Handle messages until ``stop()`` or cancellation: return = ack, raise = nack under the retry policy.

        After ``retry.max_attempts`` failed deliveries the message is dead-lettered with the exception
        as its reason; undecodable messages are dead-lettered at once. A message delivered more than
        ``max_attempts`` times (its consumers died or stopped while holding it) is dead-lettered before any
        handler sees it, and such redeliveries run one at a time (``msgbus._redelivery``); ``ConfigError``
        when ``max_attempts`` is not below the broker's own delivery limit. On stop, prefetched messages are
        released and in-flight handlers get ``shutdown_timeout`` seconds before being cancelled (and nacked).
        """
        if not callable(handler) or not all(callable(mw) for mw in middleware):
            raise ConfigError("run() needs an async handler function and middleware callables")
        await self._run(_runtime.compose(handler, middleware), concurrency, 2, retry, shutdown_timeout)

    async def run_batch(
        self,
        handler: BatchHandler,
        *,
        max_batch: int = 100,
        max_wait: float = 0.5,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        middleware: Sequence[BatchMiddleware] = (),
        shutdown_timeout: float = 30.0,
    ) -> None:
        """Like ``run()``, with a handler of lists: up to ``max_batch`` messages, handed over once that many are
        in or ``max_wait`` seconds after the first (sooner when ``prefetch`` leaves no room for more).

        Return acks them all; raise fails them all, each retried or dead-lettered on its own attempt count; a
        returned ``BatchResult`` fails only the messages it names (docs/guide.md, "Batch handlers"). Messages the
        handler settled itself stay settled; undecodable ones and those over the delivery limit never reach it.
        A batch keeps the order messages were received in: on a backend with per-key ordering, one key's next
        message is not delivered before its last batch is settled. The default prefetch holds two batches
        per worker. ``stop()`` and ``shutdown_timeout`` work as in ``run()``: a batch in flight finishes, or
        its unsettled messages are nacked.
        """
        if not _whole(max_batch, 1, MAX_BATCH):
            raise ConfigError(f"max_batch must be an int from 1 to {MAX_BATCH}, got {max_batch!r:.40}")
        max_wait = _config_seconds("max_wait", max_wait)
        if not callable(handler) or not all(callable(mw) for mw in middleware):
            raise ConfigError("run_batch() needs an async handler function and middleware callables")
        batch = Batch(_runtime.compose(handler, middleware), max_batch, max_wait)
        await self._run(batch, concurrency, 2 * max_batch, retry, shutdown_timeout)

    async def _run(
        self,
        handler: _runtime.Handler | Batch,
        concurrency: int,
        per_worker: int,
        retry: RetryPolicy | None,
        shutdown_timeout: float,
    ) -> None:
        """``run()`` and ``run_batch()`` once their handler is built: ``per_worker`` messages of default prefetch."""
        if not _whole(concurrency, 1, MAX_CONCURRENCY):
            raise ConfigError(f"concurrency must be an int from 1 to {MAX_CONCURRENCY}, got {concurrency!r:.40}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a msgbus.RetryPolicy, not {type(retry).__name__}")
        shutdown_timeout = _config_seconds("shutdown_timeout", shutdown_timeout)
        if self._stop is not None and not self._stop.is_set():
            raise RuntimeError(f"{self!r} is already running")
        retry = retry or self._retry
        backstop = self.capabilities.native_delivery_limit
        if backstop is not None and retry.max_attempts >= backstop and not self._endpoint.dead_letter:
            raise ConfigError(
                f"retry.max_attempts={retry.max_attempts} is not below {self._bus.url}'s own delivery limit "
                f"({backstop}): the broker would dead-letter messages first, without msgbus's reason; raise the "
                "adapter's limit or lower max_attempts (docs/guide.md, Delivery limit)"
            )
        self._stop = asyncio.Event()
        self._running = running = asyncio.get_running_loop().create_future()
        token = _RUNNING.set(self)  # the runtime's tasks inherit it: close() from a handler must not wait
        try:
            await self._start(default_prefetch(self._bus._adapter, per_worker * concurrency))
            telemetry = self._bus._telemetry
            # the span is outermost: middleware runs inside the message's (or the batch's) trace
            if telemetry is not None:
                if isinstance(handler, Batch):
                    traced = telemetry.process_batch(handler.handler, self._endpoint, retry.max_attempts)
                    handler = handler._replace(handler=traced)
                else:
                    handler = telemetry.process(handler, self._endpoint, retry.max_attempts)
            await _runtime.run(
                self._inbox,
                handler,
                concurrency=concurrency,
                retry=retry,
                shutdown_timeout=shutdown_timeout,
                stop=self._stop,
            )
        finally:
            _RUNNING.reset(token)
            running.set_result(None)  # this run's own: a run started after stop() may have replaced it


# The consumer whose run() the current task belongs to (its workers and handlers), if any.
_RUNNING: contextvars.ContextVar[Consumer[Any] | None] = contextvars.ContextVar("msgbus_running", default=None)
MAX_PREFETCH = 1_000_000  # messages held unsettled: more is a typo, and overflows some backends' counters
MAX_CONCURRENCY = 10_000  # handler tasks of one run()


def default_prefetch(adapter: Adapter, needed: int) -> int:
    """The prefetch ``run()`` uses when the user set none: the adapter's natural credit, at most
    ``CREDIT_PER_LOCK_SECOND`` per second of a lock that run() must extend, or what ``needed`` (the workers'
    share) asks for if more."""
    credit, caps = adapter.credit, adapter.capabilities
    if caps.lock_extension and caps.lock_duration:
        credit = min(credit, int(caps.lock_duration * CREDIT_PER_LOCK_SECOND))
    return min(max(credit, needed, 1), MAX_PREFETCH)


# run() extends the lock of every message it holds, buffered ones too, once per third of the lock duration: a
# deep buffer behind a short lock is many extensions per period, and under load they fell behind (Redis at
# visibility_timeout=2 with 512 held: 3 messages redelivered in the competing-consumers check). So the default
# credit holds at most this many messages per second of lock (30 s locks: 600, 2 s: 40).
CREDIT_PER_LOCK_SECOND = 20


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _config_seconds(what: str, value: object) -> float:
    """A finite, non-negative duration argument as a float, or ``ConfigError``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e15:
        return float(value)
    raise ConfigError(f"{what} must be a finite number of seconds >= 0, got {value!r:.40}")


class Subscriber(Consumer[T]):
    """Receives the messages of one durable subscription of a topic."""
