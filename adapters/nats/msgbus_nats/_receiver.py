"""Receiving from a durable pull consumer: pulls that keep the messages the core asks for coming, and settling.

One inbox subscription per receiver. A pull request (``CONSUMER.MSG.NEXT``) asks for as many messages as the
receive asks for (the core's free prefetch room: it keeps the limit) less what arrived and was not handed out
yet or is already asked for, and lingers on the server until it is filled or expires; so the server never
holds more for this consumer than the core may. It is topped up once half of that is free, so the next
messages are usually on their way while handlers work. The server answers an expired request with a 408 that
says how much of it was left.

With ``ordering=per_key`` the receiver reads the endpoint's consumer (unkeyed messages, as above) and one consumer
per partition, each with ``max_ack_pending=1``: the server hands a partition's next message to any receiver only
once the one before is acked or terminated, and a nacked or expired one comes back before it. So a receiver keeps
a pull of one message open on each partition (its own inbox each), and asks for the partition's next one as soon
as it settles one; the core's run() then needs no ordering code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
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

Outgoing = tuple[str, dict[str, str], bytes]  # a message to publish: (subject, headers, body)


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

    async def publish(self, messages: Sequence[Outgoing], doing: str) -> None: ...

    async def request(self, subject: str, payload: bytes) -> dict[str, Any]: ...

    def forget(self, receiver: NatsReceiver) -> None: ...


@dataclass(slots=True)
class _Pull:
    """The pull requests open on one durable consumer: where they ask, where the messages come, how many."""

    index: int  # 0: the endpoint's consumer; i > 0: partition i - 1's (one message at a time)
    next: str  # the consumer's CONSUMER.MSG.NEXT subject
    inbox: str = ""
    credit: int = 0  # asked for by pull requests still open
    ends: float = 0.0  # loop time when the last open pull request expires


class NatsReceiver(Receiver):
    """Pulls one queue, subscription or dead-letter stream's durable consumer (and its partitions' under
    ``ordering=per_key``). Not for several tasks at once."""

    def __init__(self, adapter: Link, r: Route, ack_wait: float) -> None:
        self._adapter = adapter
        self._route = r
        self._stale_after = 0.8 * ack_wait  # a partition's message waiting here longer may be back with the server
        self._source = replace(r.endpoint, dead_letter=False)
        prefix = f"$JS.API.CONSUMER.MSG.NEXT.{r.stream}"
        self._pulls = [_Pull(i, f"{prefix}.{name}") for i, (name, _) in enumerate(r.consumers)]
        self._subs: list[Subscription] = []
        self._ready: deque[tuple[_Pull, Msg, float]] = deque()  # (from, message, loop time it arrived)
        self._wake = asyncio.Event()
        self._closed = False
        self._released = False  # run() stopped: give back what arrives until receive is called again

    def __repr__(self) -> str:
        return f"NatsReceiver({self._route.endpoint}, consumer={self._route.stream} > {self._route.consumer})"

    async def start(self) -> None:
        nc, _ = self._adapter.connected()
        with translated(f"subscribe to {self._route.endpoint}", self._adapter.secrets):
            for pull in self._pulls:
                pull.inbox = nc.new_inbox()
                self._subs.append(await nc.subscribe(pull.inbox, cb=self._on_msg_of(pull)))

    def _on_msg_of(self, pull: _Pull) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            await self._on_msg(pull, msg)

        return on_msg

    async def _on_msg(self, pull: _Pull, msg: Msg) -> None:
        if not msg.reply:  # a status for one of our pull requests
            headers = msg.headers or {}
            left = headers.get("Nats-Pending-Messages")
            if left is not None and left.isdigit():
                pull.credit = max(0, pull.credit - int(left))
            elif headers.get("Status") != "100":  # not a heartbeat: the request is gone, and what it asked for
                pull.credit = 0
            self._wake.set()
            return
        pull.credit = max(0, pull.credit - 1)
        if self._closed or self._released:  # arrived after close or release: give it back at once
            await self._adapter.connected()[0].publish(msg.reply, _NAK)
            return
        self._ready.append((pull, msg, asyncio.get_running_loop().time()))
        self._wake.set()

    def reconnected(self) -> None:
        """Pull requests do not survive a reconnect (nor a server restart): ask again."""
        for pull in self._pulls:
            pull.credit = 0
        self._wake.set()

    async def _pull(self, wanted: int) -> None:
        """Open pull requests: on the endpoint's consumer for what the core has room for; on each partition
        without one open, for one message (beyond that room: a partition has one unacked message at most, so
        this receiver holds at most ``partitions`` more than the core's prefetch)."""
        now = asyncio.get_running_loop().time()
        for pull in self._pulls:
            if pull.credit and now > pull.ends + 2.0:  # their 408s were lost (a disconnect): start afresh
                pull.credit = 0
            elif pull.index and not pull.credit:
                await self._request(pull, 1)
        main = self._pulls[0]
        room = wanted - sum(not pull.index for pull, _, _ in self._ready) - main.credit
        if room <= 0 or (main.credit and 2 * room < wanted):
            return
        await self._request(main, room)

    async def _request(self, pull: _Pull, batch: int) -> None:
        nc, _ = self._adapter.connected()
        request = b'{"batch":%d,"expires":%d}' % (batch, int(PULL_EXPIRES * 1e9))
        with translated(f"receive from {self._route.endpoint}", self._adapter.secrets):
            await nc.publish(pull.next, request, reply=pull.inbox)
        pull.credit += batch
        pull.ends = asyncio.get_running_loop().time() + PULL_EXPIRES

    async def _refill(self, deliveries: Sequence[NatsDelivery]) -> None:
        """After settling partition messages: ask each partition for its next one (the core has that room)."""
        for d in deliveries:
            if 0 < d.index < len(self._pulls):
                await self._refill_pull(self._pulls[d.index])

    async def _refill_pull(self, pull: _Pull) -> None:
        if not pull.credit and not self._closed:
            await self._request(pull, 1)

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliveries; up to ``max_messages`` (the core keeps the prefetch limit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            self._released = False
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
        now = asyncio.get_running_loop().time()
        while ready and len(out) < n:
            pull, msg, arrived = ready.popleft()
            if pull.index and now - arrived > self._stale_after:
                # Waited here (the core had no room) until its ack wait (nearly) ran out: the server hands it, the
                # head of its partition, to another consumer, which may have handled what follows it already.
                # Handing out this copy would run the key out of order, and settling it would settle theirs.
                log.debug("nats: dropped a partition message that waited out its ack wait unhandled")
                await self._refill_pull(pull)
                continue
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
                bad = NatsDelivery(self, Record(body=msg.data, id=f"nats-{self._route.stream}"), 1, msg, pull.index)
                try:
                    await bad.dead_letter(f"DecodeError: malformed NATS message: {exc}")
                except MsgbusError as err:
                    log.warning("nats: could not dead-letter a malformed message: %s", err)
                continue
            out.append(NatsDelivery(self, record, deliveries, msg, pull.index))
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
        if d.index:
            await self._refill([d])

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
        await self._refill(plain)

    async def _dead_letter(self, d: NatsDelivery, reason: str) -> None:
        record = dead_letter_record(d.record, reason, d.attempt, self._source)
        headers = encode(record)
        check_size(headers, record.body, self._adapter.max_payload)
        await self._adapter.publish([(self._route.dead_subject, headers, record.body)], f"dead-letter {record.id}")
        await self._settle(d, _TERM)

    async def release(self) -> None:
        """Give back (-NAK) what arrived but was not handed out, and what the pull requests still open bring
        until ``receive`` is called again (a pull request cannot be withdrawn), so another consumer gets it now."""
        self._released = True
        nc = self._adapter.client
        if nc is None:
            return
        with translated(f"release on {self._route.endpoint}", self._adapter.secrets):
            while self._ready:
                await nc.publish(self._ready.popleft()[1].reply, _NAK)

    async def close(self) -> None:
        """Stop pulling; give back (-NAK) what arrived but was not handed out. Idempotent.

        Messages handed out and not settled return to others after ``ack_wait``.
        """
        if self._closed:
            return
        self._closed = True
        self._adapter.forget(self)
        self._wake.set()
        subs, self._subs = self._subs, []
        nc = self._adapter.client
        if nc is None or not subs:
            return
        try:
            for sub in subs:
                await sub.unsubscribe()
            while self._ready:
                await nc.publish(self._ready.popleft()[1].reply, _NAK)
        except (nx.Error, OSError) as exc:  # best effort: they come back after ack_wait anyway
            log.debug("nats: releasing on close failed: %s", type(exc).__name__)


class NatsDelivery(Delivery):
    """A message pending on the durable consumer for this receiver; settled through its ack subject."""

    __slots__ = ("_receiver", "index", "source")

    raw: Msg

    def __init__(self, receiver: NatsReceiver, record: Record, attempt: int, msg: Msg, index: int = 0) -> None:
        super().__init__(record, attempt, msg)
        self._receiver = receiver
        self.index = index  # the receiver's consumer it came from (> 0: a partition's)
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
