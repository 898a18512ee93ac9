"""The Google Cloud Pub/Sub adapter: topics, subscriptions, and queues as a topic with one subscription.

Sending uses the library's batching ``PublisherClient`` (its worker threads commit batches; each send
awaits the publish futures through ``asyncio.wrap_future``, so it returns once the service accepted every
message). Receiving uses the unary ``Pull`` RPC of the asyncio ``SubscriberAsyncClient``: one pull per
``receive`` asks for at most what the core asked for (the free prefetch room), which maps one to one onto the
Receiver SPI, needs no thread bridge, and bounds what is held unsettled exactly. See ``docs/adapters/pubsub.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import Sequence

import grpc
from google.api_core import exceptions as gx
from google.api_core import retry as retries
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.futures import Future as PublishFuture
from google.protobuf import duration_pb2
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1 import types as pb
from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport, PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

from msgbus.adapter import Adapter, BusURL, Capabilities, Endpoint, OptionReader, Record, deleted_queue
from msgbus.errors import CapabilityMissing, ClosedError, ConfigError, MessageTooLarge, TopologyError

from ._codec import Encoded, encode
from ._config import PubSubOptions, read_options
from ._errors import CLIENT_ERRORS, convert, is_not_found, translated
from ._names import Route, SubscriptionSpec, route
from ._receiver import PubSubReceiver

__all__ = ["PubSubAdapter", "create"]

log = logging.getLogger("msgbus.pubsub")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a msgbus name: never the ~ that separates the parts of a resource id

# Our own channels to an emulator: no message size cap (Pub/Sub takes 10 MB, gRPC's default is 4 MiB),
# and a quick reconnect after the emulator restarts (gRPC's default backoff grows to minutes).
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_TRANSIENT = retries.if_exception_type(
    gx.Aborted,
    gx.DeadlineExceeded,
    gx.InternalServerError,
    gx.ResourceExhausted,
    gx.ServiceUnavailable,
    gx.Unknown,
)


def create(url: BusURL, options: OptionReader) -> PubSubAdapter:
    """Entry point for ``pubsub://PROJECT`` URLs; does no I/O."""
    return PubSubAdapter(url, read_options(url, options))


def _capabilities(o: PubSubOptions) -> Capabilities:
    return Capabilities(
        ordering="per_key" if o.ordering else "none",
        delayed_delivery=False,  # Pub/Sub has no scheduled delivery
        max_delay=None,
        delayed_nack=True,  # modify_ack_deadline(delay), up to 600 s
        native_dead_letter=False,  # the reason headers need the adapter's own re-publish (see docs)
        max_message_size=o.max_message_size,
        persistence=o.persistence,
        cross_process=True,
        lock_extension=True,
        restartable=True,
        lock_duration=float(o.ack_deadline),
        exactly_once=False,
        counts_deliveries=True,  # delivery_attempt, which the dead-letter policy on every subscription turns on
        native_delivery_limit=o.max_delivery_attempts,  # that policy's own forwarding
    )


class PubSubAdapter(Adapter):
    """Clients for one Google Cloud project (or emulator). Task-safe; use from one event loop."""

    # One Pull RPC returns up to this many messages (the service caps a Pull at 1,000); run() extends the ack
    # deadline of those it holds (modify_ack_deadline), so a deep pull does not expire behind the handlers.
    credit = 128

    def __init__(self, url: BusURL, options: PubSubOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = _capabilities(options)
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._admin: PublisherAsyncClient | None = None
        self._subscriber: SubscriberAsyncClient | None = None
        self._routes: dict[Endpoint, Route] = {}
        self._declared: set[Endpoint] = set()  # declared with create=True: re-declared if the service lost them
        self._receivers: set[PubSubReceiver] = set()
        self._publishing: set[PublishFuture] = set()  # not resolved yet: close() waits for them (see there)
        self._publish_retry = retries.Retry(
            predicate=_TRANSIENT, initial=0.1, maximum=1.0, multiplier=1.5, timeout=options.publish_timeout
        )

    def __repr__(self) -> str:
        return f"PubSubAdapter({self.url.redacted!r})"

    # -- connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the clients and check that the project answers (a ListTopics call of one item)."""
        if self._publisher is not None:
            return
        o = self.options
        batch = pubsub_v1.types.BatchSettings(
            max_messages=o.batch_max_messages, max_bytes=o.batch_max_bytes, max_latency=o.batch_max_latency
        )
        publisher_options = pubsub_v1.types.PublisherOptions(
            enable_message_ordering=o.ordering, retry=self._publish_retry, timeout=o.publish_timeout
        )
        with translated("connect"):
            if o.emulator_host:
                sync_channel = grpc.insecure_channel(o.emulator_host, options=_CHANNEL_OPTIONS)
                publisher = pubsub_v1.PublisherClient(
                    batch, publisher_options, transport=PublisherGrpcTransport(channel=sync_channel)
                )
                admin = PublisherAsyncClient(
                    transport=PublisherGrpcAsyncIOTransport(
                        channel=grpc.aio.insecure_channel(o.emulator_host, options=_CHANNEL_OPTIONS)
                    )
                )
                subscriber = SubscriberAsyncClient(
                    transport=SubscriberGrpcAsyncIOTransport(
                        channel=grpc.aio.insecure_channel(o.emulator_host, options=_CHANNEL_OPTIONS)
                    )
                )
            else:
                publisher = pubsub_v1.PublisherClient(batch, publisher_options)
                admin = PublisherAsyncClient()
                subscriber = SubscriberAsyncClient()
        self._publisher, self._admin, self._subscriber = publisher, admin, subscriber
        try:
            with translated("connect"):
                await admin.list_topics(
                    request={"project": f"projects/{o.project}", "page_size": 1},
                    timeout=o.rpc_timeout,
                    retry=retries.AsyncRetry(predicate=_TRANSIENT, timeout=o.rpc_timeout),
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every receiver, flush and stop the publisher, close the channels. Idempotent."""
        for receiver in list(self._receivers):
            await receiver.close()
        publisher, self._publisher = self._publisher, None
        admin, self._admin = self._admin, None
        subscriber, self._subscriber = self._subscriber, None
        if publisher is not None:
            with contextlib.suppress(*CLIENT_ERRORS, RuntimeError):
                await asyncio.to_thread(publisher.stop)  # sends the pending batches, without waiting for them
            # Commits still retrying (the service down) end within publish_timeout, their retry deadline. The
            # channel closed under them instead, the commit thread died of a ValueError and their sends never
            # returned.
            if self._publishing:
                await asyncio.to_thread(
                    concurrent.futures.wait, list(self._publishing), self.options.publish_timeout + 1
                )
            await asyncio.to_thread(publisher.transport.close)
        for client in (admin, subscriber):
            if client is not None:
                with contextlib.suppress(*CLIENT_ERRORS):
                    await client.transport.close()  # type: ignore[no-untyped-call]

    def _clients(self) -> tuple[pubsub_v1.PublisherClient, PublisherAsyncClient, SubscriberAsyncClient]:
        if self._publisher is None or self._admin is None or self._subscriber is None:
            raise ClosedError(f"{self!r} is not open")
        return self._publisher, self._admin, self._subscriber

    @property
    def subscriber(self) -> SubscriberAsyncClient:
        """The asyncio subscriber client (pull, acknowledge, modify_ack_deadline); ``ClosedError`` if not open."""
        return self._clients()[2]

    def _route(self, endpoint: Endpoint) -> Route:
        found = self._routes.get(endpoint)
        if found is None:
            found = self._routes[endpoint] = route(self.options.project, self.options.prefix, endpoint)
        return found

    # -- topology -----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """A ListTopics call of one item, as ``open`` makes."""
        _, admin, _ = self._clients()
        o = self.options
        with translated("ping"):
            await admin.list_topics(request={"project": f"projects/{o.project}", "page_size": 1}, timeout=o.rpc_timeout)

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the topics and subscriptions of ``endpoint`` (with its dead-letter topic); idempotent.

        A queue's subscription is created here, so messages sent before any consumer exists are kept.
        An existing subscription bound to another topic, or without ordering when ``ordering=true``,
        raises ``TopologyError`` (Pub/Sub cannot change either after creation).
        """
        r = self._route(endpoint)
        if create:
            await self._create(r)
            self._declared.add(endpoint)
        else:
            await self._verify(r)

    async def _create(self, r: Route) -> None:
        _, admin, subscriber = self._clients()
        o = self.options
        timeout = o.rpc_timeout
        retry = retries.AsyncRetry(predicate=_TRANSIENT, timeout=timeout)
        with translated(f"declare {r.endpoint}"):
            for topic in r.topics:
                with contextlib.suppress(gx.AlreadyExists):
                    await admin.create_topic(request={"name": topic}, timeout=timeout, retry=retry)
            for spec in r.subscriptions:
                try:
                    await subscriber.create_subscription(request=self._subscription(spec), timeout=timeout, retry=retry)
                except gx.AlreadyExists:
                    existing = await subscriber.get_subscription(
                        request={"subscription": spec.name}, timeout=timeout, retry=retry
                    )
                    self._check_compatible(spec, existing)

    def _subscription(self, spec: SubscriptionSpec) -> pb.Subscription:
        o = self.options
        sub = pb.Subscription(
            name=spec.name,
            topic=spec.topic,
            ack_deadline_seconds=o.subscription_ack_deadline,
            enable_message_ordering=o.ordering and spec.dead_letter_topic is not None,
            expiration_policy=pb.ExpirationPolicy(),  # no ttl: never expires (the default is 31 idle days)
            message_retention_duration=duration_pb2.Duration(seconds=7 * 24 * 3600),
        )
        if spec.dead_letter_topic is not None:
            # The policy makes the service count delivery attempts (delivery_attempt): the attempt number
            # of every delivery, crash redeliveries included. The adapter dead-letters explicitly long
            # before max_delivery_attempts; the policy is the backstop.
            sub.dead_letter_policy = pb.DeadLetterPolicy(
                dead_letter_topic=spec.dead_letter_topic, max_delivery_attempts=o.max_delivery_attempts
            )
        return sub

    def _check_compatible(self, spec: SubscriptionSpec, existing: pb.Subscription) -> None:
        if existing.topic != spec.topic:
            raise TopologyError(f"subscription {spec.name} exists but is bound to {existing.topic}, not {spec.topic}")
        if self.options.ordering and spec.dead_letter_topic is not None and not existing.enable_message_ordering:
            raise TopologyError(
                f"subscription {spec.name} exists without message ordering; ordering=true needs a new subscription"
            )
        if spec.dead_letter_topic is not None and not existing.dead_letter_policy.dead_letter_topic:
            # Not changed behind its owner's back; but without a policy Pub/Sub does not count deliveries.
            log.warning(
                "pubsub: subscription %s exists without a dead-letter policy: Pub/Sub does not count its deliveries "
                "(delivery_attempt), so a message that kills its consumers is never dead-lettered by msgbus; add "
                "one with dead_letter_topic %s",
                spec.name,
                spec.dead_letter_topic,
            )

    async def _verify(self, r: Route) -> None:
        _, admin, subscriber = self._clients()
        timeout = self.options.rpc_timeout
        try:
            with translated(f"verify {r.endpoint}"):
                for topic in r.topics:
                    await admin.get_topic(request={"topic": topic}, timeout=timeout)
                for spec in r.subscriptions:
                    await subscriber.get_subscription(request={"subscription": spec.name}, timeout=timeout)
        except TopologyError as exc:
            raise TopologyError(f"{r.endpoint} does not exist (topology=verify): {exc}") from exc.__cause__

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue's two subscriptions, then its topic and dead-letter topic (a missing one is fine). Only
        a msgbus name (no ``~`` or ``/``) is taken, so the resource ids cannot reach another endpoint's."""
        name = deleted_queue(endpoint)
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{endpoint}: a queue name here is letters, digits, '_', '.', '-'")
        queue = Endpoint("queue", name)
        r = self._route(queue)
        self._declared.discard(queue)
        _, admin, subscriber = self._clients()
        timeout = self.options.rpc_timeout
        with translated(f"delete {endpoint}"):
            for spec in r.subscriptions:
                with contextlib.suppress(gx.NotFound):
                    await subscriber.delete_subscription(request={"subscription": spec.name}, timeout=timeout)
            for topic in r.topics:
                with contextlib.suppress(gx.NotFound):
                    await admin.delete_topic(request={"topic": topic}, timeout=timeout)

    async def redeclare(self, endpoint: Endpoint) -> bool:
        """Re-create what the service lost (an emulator restarted without state); False if not ours to create."""
        if endpoint not in self._declared:
            return False
        log.warning("pubsub: %s is missing on the service; declaring it again", endpoint)
        await self._create(self._route(endpoint))
        return True

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Publish ``records`` and return once Pub/Sub accepted every one (its publish response).

        Every record is encoded and size-checked before anything is sent. Records that failed are not
        retried after the library's own retries (``publish_timeout``), except once after the topic was
        found missing and re-created; then ``PublishError`` (or the translated cause) is raised.
        """
        if delay is not None and delay > 0:
            raise CapabilityMissing("pubsub:// has no delayed delivery")
        r = self._route(endpoint)
        encoded = self._encode_all(records)
        if not encoded:
            return
        failed = await self.publish(r.topic, encoded)
        if failed and all(is_not_found(exc) for _, exc in failed) and await self.redeclare(endpoint):
            failed = await self.publish(r.topic, [e for e, _ in failed])
        if failed:
            first = failed[0][1]
            err = convert(first, f"send to {endpoint}", publish=True)
            if len(failed) > 1:
                err = type(err)(f"{err} ({len(failed)} of {len(encoded)} messages not stored)")
            raise err from first

    def _encode_all(self, records: Sequence[Record]) -> list[Encoded]:
        limit = self.options.max_message_size
        out = []
        for record in records:
            size = record.size()
            if size > limit:
                raise MessageTooLarge(size, limit)
            out.append(encode(record, ordering=self.options.ordering))
        return out

    async def publish(self, topic: str, messages: Sequence[Encoded]) -> list[tuple[Encoded, BaseException]]:
        """Publish through the batching client; the messages that failed, with why."""
        publisher, _, _ = self._clients()
        futures: list[asyncio.Future[str]] = []
        try:
            for m in messages:
                future: PublishFuture = publisher.publish(topic, m.data, ordering_key=m.ordering_key, **m.attributes)
                self._publishing.add(future)
                future.add_done_callback(self._publishing.discard)
                futures.append(asyncio.wrap_future(future))
        except CLIENT_ERRORS as exc:
            raise convert(exc, f"publish to {topic}", publish=True) from exc
        except RuntimeError as exc:  # the client was stopped under us
            raise ClosedError(f"{self!r} is closed") from exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed: list[tuple[Encoded, BaseException]] = []
        for m, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                failed.append((m, result))
                if m.ordering_key:
                    # The library pauses a key after a failure so later messages cannot overtake it;
                    # the caller saw the error, so the next send of that key may go.
                    publisher.resume_publish(topic, m.ordering_key)
        return failed

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> PubSubReceiver:
        """A receiver pulling from the endpoint's subscription."""
        r = self._route(endpoint)
        if r.subscription is None:
            raise ConfigError(f"cannot receive from {endpoint}: name a subscription of the topic")
        self._clients()
        receiver = PubSubReceiver(self, r)
        self._receivers.add(receiver)
        return receiver

    def forget(self, receiver: PubSubReceiver) -> None:
        """Called by a receiver that closed: ``close()`` need not close it again."""
        self._receivers.discard(receiver)
