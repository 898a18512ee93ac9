"""The NATS JetStream adapter: queues and topics are streams, receivers read durable pull consumers.

See ``docs/adapters/nats.md`` for the mapping, the options and the limits this module implements.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import nats.errors as nx
import nats.js.errors as jx
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.manager import JetStreamManager

from msgbus.adapter import Adapter, BusURL, Capabilities, Endpoint, OptionReader, Record, deleted_queue
from msgbus.errors import ClosedError, ConfigError, MsgbusError, PublishError, TopologyError

from ._codec import check_size, encode
from ._config import NatsOptions, read_options
from ._errors import convert, translated
from ._names import QUEUE_CONSUMER, Route, route
from ._receiver import NatsReceiver, Outgoing

__all__ = ["NatsAdapter", "create"]

_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]+")  # what escape() makes of a msgbus name, prefix included

log = logging.getLogger("msgbus.nats")

HEADER_ROOM = 512  # bytes of max_payload kept for msgbus's own headers when max_message_size is derived
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # the server's default, assumed until INFO says otherwise
_RETRY_PAUSE = 0.2  # seconds between attempts of a send that got no answer


def create(url: BusURL, options: OptionReader) -> NatsAdapter:
    """Entry point for ``nats://`` URLs; does no I/O."""
    return NatsAdapter(url, read_options(url, options))


def _capabilities(options: NatsOptions, max_payload: int) -> Capabilities:
    return Capabilities(
        # per_key: a key's messages go to one partition subject, read by a consumer that has one unacked at a time
        ordering=options.ordering,
        delayed_delivery=False,  # JetStream schedules messages only from server 2.12 on
        delayed_nack=True,  # -NAK {"delay": ...}
        native_dead_letter=False,  # msgbus publishes to the dead-letter stream; max_deliver is only a backstop
        max_message_size=options.max_message_size or max(1, max_payload - HEADER_ROOM),
        # A standalone file store writes every message before the publish ack (it survives a killed server)
        # but fsyncs only every two minutes by default.
        persistence="process-crash" if options.storage == "file" else "none",
        cross_process=True,
        lock_extension=True,  # +WPI restarts the ack wait
        restartable=True,
        lock_duration=options.ack_wait,
        exactly_once=False,
        counts_deliveries=True,  # JetStream's num_delivered: every delivery, to dead consumers and after -NAK too
        native_delivery_limit=options.max_deliver or None,  # past it the server stops delivering (no DLQ)
    )


class NatsAdapter(Adapter):
    """One NATS connection (reconnecting on its own) shared by every sender and receiver. Task-safe."""

    # What run() needs for its workers (2 per worker), as before: a deeper pull (256) failed the contract's
    # "graceful shutdown" check at defaults three times in three (a message handed to the drain consumer twice
    # after stop() and a cancel released a deep pull), and at equal credit msgbus already consumes 1.5x nats-py
    # (docs/benchmarks.md). Raising it needs that cause found first (issue 20's report).
    credit = 16

    coalesce_sends = True

    def __init__(self, url: BusURL, options: NatsOptions) -> None:
        self.url = url
        self._options = options
        self._partitions = options.partitions if options.ordering == "per_key" else 0
        if self._partitions:
            # A receiver keeps a pull open on every partition (one message each) beside the unkeyed consumer's.
            self.credit = max(self.credit, self._partitions + 16)
        self.capabilities = _capabilities(options, DEFAULT_MAX_PAYLOAD)
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._nc: Client | None = None
        self._jsm: JetStreamManager | None = None
        self._routes: dict[Endpoint, Route] = {}
        self._receivers: set[NatsReceiver] = set()
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_prefix = ""
        self._tokens = itertools.count()
        self._closing = False

    def __repr__(self) -> str:
        return f"NatsAdapter({self.url.redacted!r})"

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return self._options.secrets

    @property
    def max_payload(self) -> int:
        """The server's limit on one message (header block + body), from its INFO."""
        return self._max_payload

    @property
    def client(self) -> Client | None:
        return self._nc

    # -- connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect; read the server's ``max_payload``; check that JetStream answers."""
        if self._nc is not None:
            return
        o = self._options
        nc = Client()
        scheme = "tls" if o.tls is not None else "nats"
        with translated("connect", self.secrets):
            try:
                await nc.connect(
                    servers=[f"{scheme}://{o.host}:{o.port}"],
                    user=o.user,
                    password=o.password,
                    token=o.token,
                    tls=o.tls,
                    connect_timeout=o.connect_timeout,  # type: ignore[arg-type]
                    reconnect_time_wait=o.reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,  # keep trying: sends and receives wait or time out meanwhile
                    ping_interval=o.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=o.max_outstanding_pings,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    name="msgbus",
                )
                jsm = nc.jsm(timeout=o.request_timeout)
                await jsm.account_info()
                self._ack_prefix = f"{nc.new_inbox()}."
                await nc.subscribe(f"{self._ack_prefix}*", cb=self._on_publish_ack)
            except BaseException:
                await nc.close()
                raise
        self._max_payload = nc.max_payload
        if o.max_message_size is not None and o.max_message_size > self._max_payload - HEADER_ROOM:
            await nc.close()
            raise ConfigError(
                f"option 'max_message_size' must be <= {self._max_payload - HEADER_ROOM} "
                f"(the server's max_payload {self._max_payload} less {HEADER_ROOM} bytes for msgbus's headers)"
            )
        self.capabilities = _capabilities(o, self._max_payload)
        self._nc, self._jsm = nc, jsm

    async def close(self) -> None:
        """Close every receiver, send what is buffered (acks), disconnect. Idempotent."""
        for receiver in list(self._receivers):
            await receiver.close()
        nc, self._nc, self._jsm = self._nc, None, None
        if nc is None:
            return
        self._closing = True
        try:
            if nc.is_connected:
                await nc.flush(timeout=2)
        except (nx.Error, OSError, TimeoutError) as exc:
            log.debug("nats: flush before close failed: %s", type(exc).__name__)
        await nc.close()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ClosedError(f"{self!r} was closed before the server confirmed a send"))
        self._acks.clear()
        self._closing = False

    def connected(self) -> tuple[Client, JetStreamManager]:
        if self._nc is None or self._jsm is None:
            raise ClosedError(f"{self!r} is not open")
        return self._nc, self._jsm

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats: %s", convert(exc, "connection", self.secrets))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats: disconnected from %s; reconnecting", self.url.redacted)

    async def _on_reconnected(self) -> None:
        log.warning("nats: reconnected to %s", self.url.redacted)
        for receiver in list(self._receivers):
            receiver.reconnected()

    async def _on_closed(self) -> None:
        log.debug("nats: connection to %s closed", self.url.redacted)

    def route(self, endpoint: Endpoint) -> Route:
        found = self._routes.get(endpoint)
        if found is None:
            found = self._routes[endpoint] = route(self._options.prefix, endpoint, self._partitions)
        return found

    # -- topology -----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """JetStream's account info: the server and its JetStream both answer."""
        _, jsm = self.connected()
        with translated("ping", self.secrets):
            await jsm.account_info()

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """From JetStream's consumer info: ``num_pending`` (not delivered yet) and ``num_ack_pending`` (delivered,
        not acked); and the dead-letter stream's message count. Pull consumers are not registered clients, so
        JetStream cannot say how many receivers there are (``num_waiting`` counts pending pull requests)."""
        r = self.route(Endpoint(endpoint.kind, endpoint.name, endpoint.subscription))
        if r.consumer is None:
            raise ConfigError(f"{endpoint} has no consumer: ask for a queue or a TOPIC/SUBSCRIPTION")
        _, jsm = self.connected()
        with translated(f"stats of {endpoint}", self.secrets):
            infos = [await jsm.consumer_info(r.stream, name) for name, _ in r.consumers]
            dead = await jsm.stream_info(r.dead_stream)
        return {  # partitions: the sums over the endpoint's consumers
            "depth": sum(info.num_pending or 0 for info in infos),
            "in_flight": sum(info.num_ack_pending or 0 for info in infos),
            "dead_letters": dead.state.messages,
        }

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the stream, the durable consumer and the dead-letter stream of ``endpoint``; idempotent.

        A queue is a work-queue stream read by one durable consumer. A topic is an interest stream (a message
        is kept until every subscription acked it); a subscription is a durable consumer on it that starts at
        the stream's end, so it gets every message published after ``declare`` returns. With ``ordering=per_key``
        each also has ``partitions`` consumers, one per partition subject, each with one unacked message at most.
        """
        r = self.route(endpoint)
        _, jsm = self.connected()
        with translated(f"declare {endpoint}", self.secrets):
            if not create:
                await self._verify(jsm, r)
                return
            o = self._options
            if endpoint.kind == "queue" or endpoint.dead_letter or endpoint.subscription is not None:
                dead_subjects = [r.dead_subject, *r.advisory_subjects]
                await self._stream(jsm, r.dead_stream, dead_subjects, RetentionPolicy.WORK_QUEUE)
                await self._consumer(jsm, r.dead_stream, QUEUE_CONSUMER, DeliverPolicy.ALL, max_deliver=0)
            if endpoint.dead_letter:
                return
            kind = RetentionPolicy.WORK_QUEUE if endpoint.kind == "queue" else RetentionPolicy.INTEREST
            await self._stream(jsm, r.stream, r.subjects, kind)
            start = DeliverPolicy.ALL if endpoint.kind == "queue" else DeliverPolicy.NEW
            for i, (name, only) in enumerate(r.consumers):
                # A partition's consumer hands out its next message only once the one before is acked or
                # terminated, and redelivers a nacked or expired one before it: per-key order, kept by the server.
                pending = 1 if i else o.max_ack_pending
                await self._consumer(
                    jsm, r.stream, name, start, max_deliver=o.max_deliver, only=only, max_ack_pending=pending
                )

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue's stream and its dead-letter stream (their consumers go with them); a missing one is
        fine. The names become subjects of the JetStream API, so a name that would not make a plain stream name
        (``*``, ``>``, spaces) is refused before any request."""
        r = self.route(Endpoint("queue", deleted_queue(endpoint)))
        if not all(_STREAM_NAME.fullmatch(name) for name in (r.stream, r.dead_stream)):
            raise ConfigError(f"{endpoint}: not a JetStream stream name (letters, digits, '_', '-', '.')")
        _, jsm = self.connected()
        with translated(f"delete {endpoint}", self.secrets):
            for stream in (r.stream, r.dead_stream):
                try:
                    await jsm.delete_stream(stream)
                except jx.NotFoundError:
                    pass

    async def _stream(self, jsm: JetStreamManager, name: str, subjects: list[str], retention: RetentionPolicy) -> None:
        o = self._options
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=retention,
            storage=StorageType.FILE if o.storage == "file" else StorageType.MEMORY,
            num_replicas=o.replicas,
            duplicate_window=o.duplicate_window,
        )
        try:
            await jsm.add_stream(config)
        except jx.BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different configuration
                raise
            info = await jsm.stream_info(name)
            if sorted(info.config.subjects or []) != sorted(subjects) or info.config.retention != retention:
                raise TopologyError(
                    f"NATS stream {name} exists with other subjects or retention than msgbus gives it"
                ) from exc
            log.info("nats: stream %s exists with other limits; using it as it is", name)

    async def _consumer(
        self,
        jsm: JetStreamManager,
        stream: str,
        name: str,
        start: DeliverPolicy,
        *,
        max_deliver: int,
        only: str | None = None,
        max_ack_pending: int | None = None,
    ) -> None:
        o = self._options
        config = ConsumerConfig(
            durable_name=name,
            deliver_policy=start,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=o.ack_wait,
            max_deliver=max_deliver or -1,
            max_ack_pending=max_ack_pending or o.max_ack_pending,
            filter_subject=only,
        )
        try:
            await jsm.add_consumer(stream, config)
        except jx.APIError as exc:
            if exc.err_code not in (10148, 10013):  # exists with another configuration
                raise
            info = await jsm.consumer_info(stream, name)
            log.info("nats: consumer %s > %s exists with other settings (%s); using it", stream, name, info.config)

    async def _verify(self, jsm: JetStreamManager, r: Route) -> None:
        try:
            if r.endpoint.kind == "queue" or r.endpoint.subscription is not None:
                for name, _ in r.consumers or [(QUEUE_CONSUMER, None)]:
                    await jsm.consumer_info(r.stream, name)
            else:
                await jsm.stream_info(r.stream)
        except jx.NotFoundError as exc:
            raise TopologyError(f"{r.endpoint} does not exist (topology=verify): no stream or consumer") from exc

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Publish ``records`` and wait for JetStream's acknowledgement of each (stored in the stream).

        Sends that get no answer (a reconnect, JetStream recovering after a restart) are retried with the
        same ``Nats-Msg-Id`` until ``send_timeout``: the stream drops the duplicate if the first one landed.
        """
        if delay:
            raise ConfigError("NATS 2.9 JetStream has no delayed delivery")  # the core checks the capability
        r = self.route(endpoint)
        if r.consumer is None and endpoint.kind == "queue":
            raise ConfigError(f"cannot send to {endpoint}")
        messages = []
        for record in records:
            record.size()  # a malformed record is refused typed (InvalidMessage) before anything is stored
            headers = encode(record)
            check_size(headers, record.body, self._max_payload)
            keyed = r.ordered and record.key is not None
            messages.append((r.partition_subject(record.key or "") if keyed else r.subject, headers, record.body))
        if not messages:
            return
        await self.publish(messages, f"send to {endpoint}")

    async def publish(self, messages: Sequence[Outgoing], doing: str) -> None:
        """Publish (subject, headers, body) to stream subjects, in order, and wait for every acknowledgement,
        retrying the unanswered ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.send_timeout
        pending = list(messages)
        while True:
            retry: list[Outgoing] = []
            reason = ""
            futures: list[asyncio.Future[Msg]] = []
            try:
                nc, _ = self.connected()
                with translated(doing, self.secrets, publish=True):
                    for subject, headers, body in pending:
                        token = str(next(self._tokens))
                        fut = self._acks[token] = loop.create_future()
                        futures.append(fut)
                        await nc.publish(subject, body, reply=self._ack_prefix + token, headers=headers)
                    wait = min(self._options.request_timeout, max(0.01, deadline - loop.time()))
                    await asyncio.wait(futures, timeout=wait)
                for message, fut in zip(pending, futures, strict=True):
                    why = _outcome(fut, doing)
                    if why is not None:
                        retry.append(message)
                        reason = why
            except MsgbusError as exc:
                if not exc.retryable:
                    raise
                retry, reason = pending, str(exc)
            finally:
                for fut in futures:
                    if not fut.done():
                        fut.cancel()
            if not retry:
                return
            if loop.time() + _RETRY_PAUSE >= deadline:
                raise PublishError(f"NATS: {doing} failed after {self._options.send_timeout:g}s: {reason}")
            pending = retry
            await asyncio.sleep(_RETRY_PAUSE)

    async def _on_publish_ack(self, msg: Msg) -> None:
        fut = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def request(self, subject: str, payload: bytes) -> dict[str, Any]:
        """A JetStream API request; its JSON answer, or the API error raised."""
        nc, _ = self.connected()
        reply = await nc.request(subject, payload, timeout=self._options.request_timeout)
        answer: dict[str, Any] = json.loads(reply.data)
        if "error" in answer:
            jx.APIError.from_error(answer["error"])
        return answer

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> NatsReceiver:
        """A receiver pulling from the endpoint's durable consumer."""
        r = self.route(endpoint)
        if r.consumer is None:
            raise ConfigError(f"cannot receive from {endpoint}: name a subscription of the topic")
        self.connected()
        receiver = NatsReceiver(self, r, self._options.ack_wait)
        await receiver.start()
        self._receivers.add(receiver)
        return receiver

    def forget(self, receiver: NatsReceiver) -> None:
        self._receivers.discard(receiver)


def _outcome(fut: asyncio.Future[Msg], doing: str) -> str | None:
    """None when the server stored the message; why to try again when it may not have.

    Raises the msgbus error for a refusal that trying again cannot fix (e.g. a message over the stream's limit).
    """
    if not fut.done() or fut.cancelled():
        return "no acknowledgement in time"
    exc = fut.exception()
    if exc is not None:
        raise exc
    msg = fut.result()
    if msg.headers and msg.headers.get("Status") == "503":
        return "no stream answered (no responders: JetStream starting, or the stream was deleted)"
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return f"unreadable acknowledgement {msg.data[:80]!r}"
    error = answer.get("error") if isinstance(answer, dict) else None
    if error is None:
        return None
    if error.get("code") == 503:
        return f"JetStream unavailable: {error.get('description')}"
    try:
        jx.APIError.from_error(error)
    except jx.APIError as api:
        raise convert(api, doing, publish=True) from api
    return None
