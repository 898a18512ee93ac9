"""Receiving from one Pub/Sub subscription: unary pulls of what the core asks for, ack deadlines set and
extended per message, and settling by ack id (acknowledge, modify_ack_deadline, a re-publish for dead letters).
The receiver holds a ``Link`` to its adapter (settings, the subscriber client, the publish, redeclare, forget),
not the adapter itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast

import grpc
from google.api_core import exceptions as gx
from google.api_core import gapic_v1
from google.pubsub_v1 import SubscriberAsyncClient
from google.pubsub_v1 import types as pb

from msgbus.adapter import Delivery, Endpoint, Receiver, Record, dead_letter_record
from msgbus.errors import ClosedError, PublishError

from ._codec import Encoded, decode, encode
from ._config import MAX_ACK_DEADLINE, PubSubOptions
from ._errors import CLIENT_ERRORS, convert, is_not_found, translated
from ._names import Route

log = logging.getLogger("msgbus.pubsub")

_ACK_BATCH = 1000  # ack ids per acknowledge / modify_ack_deadline request (well under the 512 KB limit)


class Link(Protocol):
    """What a receiver needs from its adapter: the settings, the subscriber client, the publish for dead letters,
    and the re-declaration of what the service lost."""

    options: PubSubOptions

    @property
    def subscriber(self) -> SubscriberAsyncClient: ...

    async def publish(self, topic: str, messages: Sequence[Encoded]) -> list[tuple[Encoded, BaseException]]: ...

    async def redeclare(self, endpoint: Endpoint) -> bool: ...

    def forget(self, receiver: PubSubReceiver) -> None: ...


class PubSubReceiver(Receiver):
    """Pulls one subscription with the unary Pull RPC, as many as asked for (the core keeps the prefetch limit).

    Each pulled message's ack deadline is set to ``ack_deadline`` at once (subscriptions cannot go
    below 10 s; the per-message deadline can), and ``extend`` pushes it further while a handler runs.
    """

    def __init__(self, adapter: Link, r: Route) -> None:
        self._adapter = adapter
        self._options = adapter.options
        self._route = r
        self._subscription = r.subscription or ""
        self._source = replace(r.endpoint, dead_letter=False)
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()
        self._routing = [
            gapic_v1.routing_header.to_grpc_metadata((("subscription", self._subscription),))  # type: ignore[no-untyped-call]
        ]

    def __repr__(self) -> str:
        return f"PubSubReceiver({self._route.endpoint})"

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds (plus at most ``pull_timeout`` for a pull under way) for deliveries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            now = loop.time()
            wait = deadline - now
            got = await self._pull(max_messages, max(0.0, wait) + self._options.pull_timeout, wait > 0)
            if got or loop.time() >= deadline:
                return got

    async def _pull(self, room: int, rpc_timeout: float, wait: bool) -> list[Delivery]:
        subscriber = self._adapter.subscriber
        # A poll (receive with timeout 0) returns at once: a pull that finds nothing otherwise waits server-side
        # (pstest 0.5 s, the service up to the RPC deadline), and run() polls before each redelivery that runs
        # alone. Through the transport's own callable: the client's pull() warns that the flag is deprecated.
        request = pb.PullRequest(subscription=self._subscription, max_messages=room, return_immediately=not wait)
        pull = cast("Callable[..., Awaitable[pb.PullResponse]]", subscriber.transport.pull)
        call = pull(request, timeout=rpc_timeout, metadata=self._routing)
        # The pull runs as its own task: if our caller is cancelled mid-pull, whatever the service
        # already handed out is released at once instead of waiting out the subscription's deadline.
        task = asyncio.ensure_future(_api_errors(call))
        try:
            response = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise
        except gx.DeadlineExceeded:
            return []
        except CLIENT_ERRORS as exc:
            if is_not_found(exc) and await self._adapter.redeclare(self._route.endpoint):
                return []
            raise convert(exc, f"receive from {self._route.endpoint}") from exc
        # The plain protobuf message: proto-plus wrappers cost more per field than the rest of a receive.
        received = list(pb.PullResponse.pb(response).received_messages)
        if not received:
            return []
        if self._options.ack_deadline < self._options.subscription_ack_deadline:
            await self._modify([m.ack_id for m in received], self._options.ack_deadline, quiet=True)
        out: list[Delivery] = []
        for rm in received:
            msg = rm.message
            publish_time = msg.publish_time.seconds + msg.publish_time.nanos / 1e9
            attempt = max(1, rm.delivery_attempt)
            try:
                record = decode(msg.data, msg.attributes, msg.message_id, publish_time, msg.ordering_key)
            except Exception as exc:  # a damaged message: handed on with its problem, the core dead-letters it
                problem = f"malformed Pub/Sub message {msg.message_id}: {exc}"
                out.append(PubSubDelivery(self, Record(body=bytes(msg.data), id=msg.message_id), attempt, rm, problem))
                continue
            out.append(PubSubDelivery(self, record, attempt, rm))
        return out

    def _release_abandoned(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        ids = [m.ack_id for m in pb.PullResponse.pb(task.result()).received_messages]
        if ids and not self._closed:
            self._spawn(self._modify(ids, 0, quiet=True))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _modify(self, ack_ids: Sequence[str], seconds: int, *, quiet: bool = False) -> None:
        subscriber = self._adapter.subscriber
        timeout = self._options.rpc_timeout
        try:
            with translated(f"modify ack deadline on {self._route.endpoint}"):
                for i in range(0, len(ack_ids), _ACK_BATCH):
                    await subscriber.modify_ack_deadline(
                        request={
                            "subscription": self._subscription,
                            "ack_ids": list(ack_ids[i : i + _ACK_BATCH]),
                            "ack_deadline_seconds": seconds,
                        },
                        timeout=timeout,
                    )
        except Exception as exc:
            if not quiet:
                raise
            log.debug("pubsub: modify_ack_deadline failed (the deadline will lapse by itself): %s", exc)

    # -- settling (called by PubSubDelivery) --------------------------------------------------------

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge every delivery, up to 1000 per request."""
        mine = [d for d in deliveries if isinstance(d, PubSubDelivery)]
        if not mine:
            return
        subscriber = self._adapter.subscriber
        ids = [d.ack_id for d in mine]
        with translated(f"ack on {self._route.endpoint}"):
            for i in range(0, len(ids), _ACK_BATCH):
                await subscriber.acknowledge(
                    request={"subscription": self._subscription, "ack_ids": ids[i : i + _ACK_BATCH]},
                    timeout=self._options.rpc_timeout,
                )

    async def _nack(self, d: PubSubDelivery, delay: float | None) -> None:
        seconds = 0 if delay is None or delay <= 0 else min(MAX_ACK_DEADLINE, math.ceil(delay))
        await self._modify([d.ack_id], seconds)

    async def _dead_letter(self, d: PubSubDelivery, reason: str) -> None:
        record = dead_letter_record(d.record, reason, d.attempt, self._source)
        encoded = encode(record, ordering=False)
        failed = await self._adapter.publish(self._route.dead_letter_topic, [encoded])
        if failed:
            raise PublishError(f"dead-letter publish to {self._route.dead_letter_topic} failed") from failed[0][1]
        await self.ack_many([d])

    async def _extend(self, d: PubSubDelivery, seconds: float) -> None:
        await self._modify([d.ack_id], min(MAX_ACK_DEADLINE, max(1, math.ceil(seconds))))

    async def close(self) -> None:
        """Stop receiving; unsettled messages return to others when their ack deadline lapses. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._adapter.forget(self)
        for t in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t


async def _api_errors(call: Awaitable[pb.PullResponse]) -> pb.PullResponse:
    """Await a raw gRPC call, raising the client library's exceptions, as its own methods do."""
    try:
        return await call
    except grpc.RpcError as exc:
        raise gx.from_grpc_error(exc) from exc  # type: ignore[no-untyped-call]


class PubSubDelivery(Delivery):
    """A pulled message, settled through its ack id. ``raw`` is the ``ReceivedMessage`` (plain protobuf)."""

    __slots__ = ("_receiver", "ack_id")

    def __init__(
        self, receiver: PubSubReceiver, record: Record, attempt: int, raw: Any, problem: str | None = None
    ) -> None:
        super().__init__(record, attempt, raw, problem)
        self._receiver = receiver
        self.ack_id: str = raw.ack_id

    async def ack(self) -> None:
        """Acknowledge: Pub/Sub will not deliver it again on this subscription (best effort, see docs)."""
        await self._receiver.ack_many([self])

    async def nack(self, delay: float | None = None) -> None:
        """Set its ack deadline to 0 (redeliver now) or to ``delay`` rounded up to whole seconds (max 600)."""
        await self._receiver._nack(self, delay)

    async def dead_letter(self, reason: str) -> None:
        """Publish it with the reason headers to the dead-letter topic, then acknowledge it here."""
        await self._receiver._dead_letter(self, reason)

    async def extend(self, seconds: float) -> None:
        """Set its ack deadline to ``seconds`` from now (rounded up to whole seconds, at most 600)."""
        await self._receiver._extend(self, seconds)
