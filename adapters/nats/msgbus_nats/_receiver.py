"""Receiving from a durable pull consumer: pulls that keep the messages the core asks for coming, and settling.

One inbox subscription per receiver. A pull request (``CONSUMER.MSG.NEXT``) asks for as many messages as the
receive asks for (the core's free prefetch room: it keeps the limit) less what arrived and was not handed out
yet or is already asked for, and lingers on the server until it is filled or expires; so the server never
holds more for this consumer than the core may. It is topped up once half of that is free, so the next
messages are usually on their way while handlers work. The server answers an expired request with a 408 that
says how much of it was left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import nats.errors as nx
import nats.js.errors as jx
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.manager import JetStreamManager

from msgbus.adapter import Delivery, Receiver, Record, dead_letter_record, wait_set
from msgbus.errors import ClosedError, DecodeError, MsgbusError

from ._codec import check_size, decode, encode, parse_header_block
from ._errors import translated
from ._names import MAX_DELIVERIES, Route

log = logging.getLogger("msgbus.nats")

PULL_EXPIRES = 10.0  # seconds a pull request lingers on the server
_ACK, _NAK, _TERM, _PROGRESS = b"+ACK", b"-NAK", b"+TERM", b"+WPI"


def ack_metadata(reply: str) -> tuple[int, int, float]:
    """(deliveries, stream sequence, server timestamp in seconds) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the newer form with a
    domain and an account hash after ``$JS.ACK`` (12 tokens). ``ValueError`` for anything else.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5]), int(tokens[7]) / 1e9
    if len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[6]), int(tokens[7]), int(tokens[9]) / 1e9
    raise ValueError(f"not a JetStream ack subject: {reply[:100]!r}")


class Link(Protocol):
    """What a receiver needs from its adapter: the connection, publishing with acks, and API requests."""

    @property
    def secrets(self) -> tuple[str | None, ...]: ...

    @property
    def max_payload(self) -> int: ...

    @property
    def client(self) -> Client | None: ...

    def connected(self) -> tuple[Client, JetStreamManager]: ...

    async def publish(self, subject: str, messages: Sequence[tuple[dict[str, str], bytes]], doing: str) -> None: ...

    async def request(self, subject: str, payload: bytes) -> dict[str, Any]: ...

    def forget(self, receiver: NatsReceiver) -> None: ...


class NatsReceiver(Receiver):
    """Pulls one queue, subscription or dead-letter stream's durable consumer. Not for several tasks at once."""

    def __init__(self, adapter: Link, r: Route) -> None:
        self._adapter = adapter
        self._route = r
        self._source = replace(r.endpoint, dead_letter=False)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{r.stream}.{r.consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        self._ready: deque[Msg] = deque()
        self._credit = 0  # asked for by pull requests still open
        self._pulls_end = 0.0  # loop time when the last open pull request expires
        self._wake = asyncio.Event()
        self._closed = False

    def __repr__(self) -> str:
        return f"NatsReceiver({self._route.endpoint}, consumer={self._route.stream} > {self._route.consumer})"

    async def start(self) -> None:
        nc, _ = self._adapter.connected()
        self._inbox = nc.new_inbox()
        with translated(f"subscribe to {self._route.endpoint}", self._adapter.secrets):
            self._sub = await nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # a status for one of our pull requests
            headers = msg.headers or {}
            left = headers.get("Nats-Pending-Messages")
            if left is not None and left.isdigit():
                self._credit = max(0, self._credit - int(left))
            elif headers.get("Status") != "100":  # not a heartbeat: the request is gone, and what it asked for
                self._credit = 0
            self._wake.set()
            return
        self._credit = max(0, self._credit - 1)
        if self._closed:  # arrived after close: give it back at once
            await self._adapter.connected()[0].publish(msg.reply, _NAK)
            return
        self._ready.append(msg)
        self._wake.set()

    def reconnected(self) -> None:
        """Pull requests do not survive a reconnect (nor a server restart): ask again."""
        self._credit = 0
        self._wake.set()

    async def _pull(self, wanted: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._credit and now > self._pulls_end + 2.0:  # their 408s were lost (a disconnect): start afresh
            self._credit = 0
        room = wanted - len(self._ready) - self._credit
        if room <= 0 or (self._credit and 2 * room < wanted):
            return
        nc, _ = self._adapter.connected()
        request = b'{"batch":%d,"expires":%d}' % (room, int(PULL_EXPIRES * 1e9))
        with translated(f"receive from {self._route.endpoint}", self._adapter.secrets):
            await nc.publish(self._next, request, reply=self._inbox)
        self._credit += room
        self._pulls_end = now + PULL_EXPIRES

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliveries; up to ``max_messages`` (the core keeps the prefetch limit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            if self._ready:
                got = await self._take(max_messages)
                if got:
                    return got
                continue
            await self._pull(max_messages)
            left = deadline - loop.time()
            if left <= 0:
                return []
            self._wake.clear()
            await wait_set(self._wake, min(left, PULL_EXPIRES))

    async def _take(self, n: int) -> list[Delivery]:
        out: list[Delivery] = []
        ready = self._ready
        while ready and len(out) < n:
            msg = ready.popleft()
            try:
                deliveries, seq, ts = ack_metadata(msg.reply)
                if msg.subject.startswith(MAX_DELIVERIES):
                    found = await self._backstop(msg, deliveries)
                    if found is not None:
                        out.append(found)
                    continue
                fallback = f"nats-{self._route.stream}-{seq}"
                record = decode(msg.headers, msg.data, fallback, ts)
            except (DecodeError, ValueError) as exc:
                # Not a msgbus message (or damaged): dead-letter it rather than crash or loop on it.
                bad = NatsDelivery(self, Record(body=msg.data, id=f"nats-{self._route.stream}"), 1, msg)
                try:
                    await bad.dead_letter(f"DecodeError: malformed NATS message: {exc}")
                except MsgbusError as err:
                    log.warning("nats: could not dead-letter a malformed message: %s", err)
                continue
            out.append(NatsDelivery(self, record, deliveries, msg))
        return out

    async def _backstop(self, advisory: Msg, deliveries: int) -> Delivery | None:
        """A max_deliver advisory in a dead-letter stream, as the dead letter of the message it names."""
        try:
            event = json.loads(advisory.data)
            stream, seq, count = event["stream"], int(event["stream_seq"]), int(event["deliveries"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"unreadable max_deliver advisory: {exc}") from exc
        with translated(f"read the message behind a max_deliver advisory in {stream}", self._adapter.secrets):
            try:
                answer = await self._adapter.request(f"$JS.API.STREAM.MSG.GET.{stream}", b'{"seq":%d}' % seq)
            except jx.NotFoundError:
                await self._settle_raw(advisory, _ACK)  # acked or removed since: nothing left to dead-letter
                return None
        stored = answer["message"]
        headers = parse_header_block(base64.b64decode(stored["hdrs"])) if stored.get("hdrs") else None
        body = base64.b64decode(stored.get("data") or b"")
        record = decode(headers, body, f"nats-{stream}-{seq}", 0.0)
        reason = f"delivered {count} times without being settled (the NATS consumer's max_deliver backstop)"
        record = dead_letter_record(record, reason, count, self._source)
        delivery = NatsDelivery(self, record, deliveries, advisory)
        delivery.source = (stream, seq) if self._source.kind == "queue" else None
        return delivery

    # -- settling (called by NatsDelivery) ----------------------------------------------------------

    async def _settle_raw(self, msg: Msg, payload: bytes) -> None:
        nc, _ = self._adapter.connected()
        with translated(f"settle on {self._route.endpoint}", self._adapter.secrets):
            await nc.publish(msg.reply, payload)

    async def _settle(self, d: NatsDelivery, payload: bytes) -> None:
        if d.source is not None and payload in (_ACK, _TERM):
            stream, seq = d.source
            with translated(f"remove the message {stream}#{seq} that reached max_deliver", self._adapter.secrets):
                try:
                    await self._adapter.request(f"$JS.API.STREAM.MSG.DELETE.{stream}", b'{"seq":%d}' % seq)
                except jx.NotFoundError:
                    pass  # gone already
        await self._settle_raw(d.raw, payload)

    async def _progress(self, d: NatsDelivery) -> None:
        nc, _ = self._adapter.connected()
        with translated(f"extend a lock on {self._route.endpoint}", self._adapter.secrets):
            await nc.publish(d.raw.reply, _PROGRESS)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """+ACK each (one buffered write; the connection's flusher sends them together)."""
        plain = [d for d in deliveries if isinstance(d, NatsDelivery) and d.source is None]
        for d in deliveries:
            if isinstance(d, NatsDelivery) and d.source is not None:
                await self._settle(d, _ACK)
        if not plain:
            return
        nc, _ = self._adapter.connected()
        with translated(f"ack on {self._route.endpoint}", self._adapter.secrets):
            for d in plain:
                await nc.publish(d.raw.reply, _ACK)

    async def _dead_letter(self, d: NatsDelivery, reason: str) -> None:
        record = dead_letter_record(d.record, reason, d.attempt, self._source)
        headers = encode(record)
        check_size(headers, record.body, self._adapter.max_payload)
        await self._adapter.publish(self._route.dead_subject, [(headers, record.body)], f"dead-letter {record.id}")
        await self._settle(d, _TERM)

    async def close(self) -> None:
        """Stop pulling; give back (-NAK) what arrived but was not handed out. Idempotent.

        Messages handed out and not settled return to others after ``ack_wait``.
        """
        if self._closed:
            return
        self._closed = True
        self._adapter.forget(self)
        self._wake.set()
        sub, self._sub = self._sub, None
        nc = self._adapter.client
        if nc is None or sub is None:
            return
        try:
            await sub.unsubscribe()
            while self._ready:
                await nc.publish(self._ready.popleft().reply, _NAK)
        except (nx.Error, OSError) as exc:  # best effort: they come back after ack_wait anyway
            log.debug("nats: releasing on close failed: %s", type(exc).__name__)


class NatsDelivery(Delivery):
    """A message pending on the durable consumer for this receiver; settled through its ack subject."""

    __slots__ = ("_receiver", "source")

    raw: Msg

    def __init__(self, receiver: NatsReceiver, record: Record, attempt: int, msg: Msg) -> None:
        super().__init__(record, attempt, msg)
        self._receiver = receiver
        self.source: tuple[str, int] | None = None  # (stream, seq) a backstop dead letter stands for

    async def ack(self) -> None:
        """+ACK: the work-queue stream deletes it (a topic stream once every subscription acked)."""
        await self._receiver._settle(self, _ACK)

    async def nack(self, delay: float | None = None) -> None:
        """-NAK, with the server holding the redelivery back ``delay`` seconds."""
        payload = _NAK if not delay or delay <= 0 else b'-NAK {"delay":%d}' % int(delay * 1e9)
        await self._receiver._settle(self, payload)

    async def dead_letter(self, reason: str) -> None:
        """Publish to the dead-letter stream (acknowledged), then +TERM here: no redelivery."""
        await self._receiver._dead_letter(self, reason)

    async def extend(self, seconds: float) -> None:
        """+WPI: the server restarts this message's ack wait (``seconds`` beyond ``ack_wait`` is not honoured)."""
        await self._receiver._progress(self)
