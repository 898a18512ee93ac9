"""The Kafka adapter: queues and topics are Kafka topics, each queue and subscription a consumer group.

Sending: one idempotent producer per bus with ``acks=all``; ``send`` returns once the broker acknowledged
every record. The record key picks the partition, so one key's records stay in order.

Receiving (``KafkaReceiver``): one aiokafka consumer per receiver, offsets committed by the adapter only.
Acks may complete out of order, so a partition's committed offset is its first unsettled offset; what is
settled beyond it, and how often each unsettled offset was delivered, is kept in the commit's metadata,
so a partition's next owner (after a rebalance or a crash) skips settled records and counts attempts on.
Per-key order: a key with a delivered, unsettled record is held; its later records wait (the partition's
other keys flow); a nack redelivers the same record from memory before the key moves on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka import errors as kx
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.admin import DeleteGroupsRequest
from aiokafka.structs import OffsetAndMetadata

from msgbus.adapter import (
    Adapter,
    BusURL,
    Capabilities,
    Endpoint,
    OptionReader,
    Receiver,
    Record,
    deleted_queue,
)
from msgbus.errors import BrokerError, ClosedError, ConfigError, TopologyError

from . import _codec
from ._config import AUTO_REPLICATION, KafkaOptions, read_options
from ._errors import translated
from ._names import dead_letters_of, group_of, topic_of, valid_topic
from ._receiver import KafkaReceiver, close_quietly

__all__ = ["KafkaAdapter", "create"]


def create(url: BusURL, options: OptionReader) -> KafkaAdapter:
    """Entry point for ``kafka://`` and ``kafka+ssl://`` (registered in ``msgbus.adapters``)."""
    return KafkaAdapter(url, read_options(url, options))


def _capabilities(o: KafkaOptions) -> Capabilities:
    return Capabilities(
        ordering="per_key",
        delayed_delivery=False,  # Kafka has no delayed records; no delay topic is emulated
        delayed_nack=True,  # redelivery is held in memory by the partition's owner
        native_dead_letter=False,  # the adapter produces to the dead-letter topic
        max_message_size=o.max_message_size,
        persistence="disk",
        cross_process=True,
        lock_extension=True,  # extend() keeps a busy receiver in its group (see KafkaReceiver)
        restartable=True,
        lock_duration=o.visibility_timeout,
        counts_deliveries=True,  # attempt notes in the commit metadata, written before a record is handed out
        ack_delay=o.commit_interval,  # acks are settled in memory and committed every commit_interval
    )


class KafkaAdapter(Adapter):
    """One bus on a Kafka cluster: a producer and an admin client, opened by ``open()``."""

    # A whole fetch: Kafka returns up to 1 MiB per partition (about 1,000 records of 1 KiB) for one request, and
    # a receiver notes the attempts of what it reads ahead in one commit per batch, so a consumer at this credit
    # pays one commit per 512 records instead of one per 32 (harness, C=16, 1 KiB: 54k msgs/s at 512, 7.6k at
    # 32). No per-message lock runs out meanwhile: a partition stays ours while the member is alive.
    credit = 512

    # Concurrent single sends are coalesced by the core (the default): a batch of them goes out through
    # ``_send_batches`` as whole record batches, cheaper than aiokafka appending them one by one
    # (16 senders: 11.8k -> 17.7k msgs/s at 16 B, 15.7k -> 18.0k at 1 KiB, medians of 4 interleaved).

    def __init__(self, url: BusURL, options: KafkaOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = _capabilities(options)
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._topics: set[str] = set()
        self._receivers: set[KafkaReceiver] = set()
        self._secrets = [options.password]

    def __repr__(self) -> str:
        return f"KafkaAdapter({self.url.redacted!r})"

    async def open(self) -> None:
        o = self.options
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            **o.client_kwargs(),
            acks="all",
            enable_idempotence=True,
            max_request_size=max(o.max_message_size + 64 * 1024, 1_048_576),
            # send_many puts a call's unkeyed records on one partition: 100 x 1 KiB must not need 7 batches
            # there, each its own produce round trip (one in flight per partition); the broker's own limit
            # on a batch is 1 MB (message.max.bytes)
            max_batch_size=_MAX_BATCH,
            linger_ms=int(o.linger * 1000),
        )
        admin = AIOKafkaAdminClient(**o.client_kwargs())
        try:
            with translated("connect", secrets=self._secrets):
                await admin.start()
                await producer.start()
        except BaseException:  # a cancelled open (a ping's timeout) too
            await close_quietly(admin.close(), producer.stop())
            raise
        self._producer, self._admin = producer, admin

    async def close(self) -> None:
        for receiver in list(self._receivers):
            await receiver.close()
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        await close_quietly(
            *(c for c in (producer.stop() if producer else None, admin.close() if admin else None) if c)
        )

    @property
    def admin(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            raise ClosedError("the kafka bus is not open")
        return self._admin

    # --- topology ---

    async def ping(self) -> None:
        """A metadata request (DescribeCluster) to the cluster."""
        with translated("ping", secrets=self._secrets):
            await self.admin.describe_cluster()

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """The group's lag: per partition, the end offset minus the committed one, less what the commit notes say
        is settled beyond it; the same of the dead-letter topic for its group; the group's members. Kafka does not
        tell delivered from waiting records, so ``depth`` counts every unsettled one (no ``in_flight``), and an ack
        counts once committed (every ``commit_interval``)."""
        if endpoint.kind == "topic" and endpoint.subscription is None:
            raise ConfigError(f"{endpoint} has no consumer group: ask for a queue or a TOPIC/SUBSCRIPTION")
        live = Endpoint(endpoint.kind, endpoint.name, endpoint.subscription)
        dead = dead_letters_of(live)
        await self._ensure_topics({topic_of(live): 0, topic_of(dead): 0}, create=False)  # a missing one: typed, at once
        group = group_of(live, self.options.group_prefix)
        reader = AIOKafkaConsumer(**self.options.client_kwargs(), enable_auto_commit=False)
        try:
            with translated(f"stats of {endpoint}", secrets=self._secrets):
                await reader.start()
                depth = await self._lag(reader, group, topic_of(live))
                dead_n = await self._lag(reader, group_of(dead, self.options.group_prefix), topic_of(dead))
                (described,) = await self.admin.describe_consumer_groups([group])
        finally:
            await close_quietly(reader.stop())
        members = described.groups[0][5]  # error_code, group, state, protocol_type, protocol, members
        return {"depth": depth, "dead_letters": dead_n, "consumers": len(members)}

    async def _lag(self, reader: AIOKafkaConsumer, group: str, topic: str) -> int:
        """Records of ``topic`` that ``group`` has not settled (from the start of the log where it never committed)."""
        parts = await self._partitions(topic)
        ends = await reader.end_offsets(parts)
        starts = await reader.beginning_offsets(parts)
        committed = await self.admin.list_consumer_group_offsets(group, partitions=parts)
        lag = 0
        for tp in parts:
            meta = committed.get(tp)
            at = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            notes = _codec.decode_notes(meta.metadata if meta is not None else None)
            lag += max(0, ends[tp] - at) - sum(1 for o in notes.settled if at <= o < ends[tp])
        return lag

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        o = self.options
        wanted = {topic_of(endpoint): o.partitions if not endpoint.dead_letter else o.dead_letter_partitions}
        if endpoint.kind == "queue" or endpoint.subscription is not None:
            wanted[topic_of(dead_letters_of(endpoint))] = o.dead_letter_partitions
        if not endpoint.dead_letter:
            wanted[endpoint.name] = o.partitions
        await self._ensure_topics(wanted, create=create)
        if endpoint.subscription is not None and not endpoint.dead_letter:
            await self._ensure_subscription(endpoint, create=create)

    async def delete(self, endpoint: Endpoint) -> None:
        """Delete the queue's Kafka topic and its ``.dlq`` topic, then the consumer groups that read them (a
        missing one is fine; a group with members still reading is a ``BrokerError``). Kafka has only topics, so
        msgbus topic ``name`` (the same Kafka topic) goes too."""
        queue = Endpoint("queue", deleted_queue(endpoint))
        topics = [topic_of(queue), topic_of(dead_letters_of(queue))]
        if not all(valid_topic(t) for t in topics):
            raise ConfigError(f"{endpoint}: not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
        self._topics -= set(topics)
        with translated(f"delete {endpoint}", secrets=self._secrets):
            response = await self.admin.delete_topics(topics)
        for name, code, message in _topic_errors(response):
            if code not in (0, kx.UnknownTopicOrPartitionError.errno):
                raise BrokerError(f"kafka could not delete topic {name!r}: error {code} {message or ''}".rstrip())
        for group in (
            group_of(queue, self.options.group_prefix),
            group_of(dead_letters_of(queue), self.options.group_prefix),
        ):
            await self._delete_group(group, f"delete {endpoint}")

    async def _delete_group(self, group: str, doing: str) -> None:
        """DeleteGroups at the group's coordinator: aiokafka's admin client has no call for it (its request and
        node-addressed send are used as its own calls use them). The coordinator keeps an empty group's offsets
        for ``offsets.retention.minutes`` (7 days), so without this the group outlives its topic."""
        admin: Any = self.admin
        with translated(doing, secrets=self._secrets):
            node = await admin.find_coordinator(group)
            request = (
                DeleteGroupsRequest[1]([group])
                if isinstance(DeleteGroupsRequest, list)
                else DeleteGroupsRequest([group])
            )
            response = await admin._send_request_to_node(node, request)
        for name, code in response.results:
            if code not in (0, kx.GroupIdNotFound.errno):
                raise BrokerError(f"kafka could not delete consumer group {name!r}: error {code}")

    async def _ensure_topics(self, wanted: dict[str, int], *, create: bool) -> None:
        missing = {t: n for t, n in wanted.items() if t not in self._topics}
        if not missing:
            return
        with translated("list topics", secrets=self._secrets):
            existing = set(await self.admin.list_topics())
        self._topics |= existing & set(missing)
        missing = {t: n for t, n in missing.items() if t not in existing}
        if not missing:
            return
        if not create:
            raise TopologyError(f"kafka topic(s) missing (topology=verify): {', '.join(sorted(missing))}")
        factor, configs = await self._replication()
        new = [NewTopic(t, n, factor, topic_configs=configs) for t, n in missing.items()]
        with translated("create topics", secrets=self._secrets):
            response = await self.admin.create_topics(new)
        for name, code, message in _topic_errors(response):
            if code not in (0, kx.TopicAlreadyExistsError.errno):
                raise TopologyError(f"kafka could not create topic {name!r}: error {code} {message or ''}".rstrip())
        self._topics |= set(missing)

    async def _replication(self) -> tuple[int, dict[str, str]]:
        """Replication of topics msgbus creates: the ``replication_factor`` option, else the cluster's size up to
        3 copies, with ``min.insync.replicas=2`` once there are 3, so an ``acks=all`` send is on two brokers
        before it returns and one broker can die without losing it or stopping sends."""
        if self.options.replication_factor != AUTO_REPLICATION:
            return self.options.replication_factor, {}
        with translated("describe cluster", secrets=self._secrets):
            brokers = len((await self.admin.describe_cluster())["brokers"])
        factor = max(1, min(3, brokers))
        return factor, {"min.insync.replicas": "2"} if factor == 3 else {}

    async def _ensure_subscription(self, endpoint: Endpoint, *, create: bool) -> None:
        """A subscription exists once its group has committed offsets; a new one starts at the topic's end,
        so it gets every message published after ``declare`` returns (and none from before)."""
        group = group_of(endpoint, self.options.group_prefix)
        with translated("read subscription offsets", secrets=self._secrets):
            committed = await self.admin.list_consumer_group_offsets(group)
        if committed:
            return
        if not create:
            raise TopologyError(f"kafka subscription {endpoint} (group {group!r}) does not exist (topology=verify)")
        parts = await self._partitions(endpoint.name)
        starter = AIOKafkaConsumer(**self.options.client_kwargs(), group_id=group, enable_auto_commit=False)
        try:
            with translated("create subscription", secrets=self._secrets):
                await starter.start()
                starter.assign(parts)
                ends = await starter.end_offsets(parts)
                try:
                    await starter.commit({tp: OffsetAndMetadata(ends[tp], "") for tp in parts})
                except kx.CommitFailedError:
                    pass  # members already joined the group: it exists
        finally:
            await close_quietly(starter.stop())

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic``. A topic created a moment ago may not be in the cluster's metadata yet
        (describe answers without partitions): ask again until it is, for up to ``request_timeout``."""
        deadline = time.monotonic() + self.options.request_timeout
        while True:
            with translated("describe topic", secrets=self._secrets):
                described = await self.admin.describe_topics([topic])
            parts = [TopicPartition(topic, p["partition"]) for d in described for p in d.get("partitions", ())]
            if parts:
                return parts
            if time.monotonic() > deadline:
                raise TopologyError(f"kafka topic {topic!r} has no partitions in the cluster metadata")
            await asyncio.sleep(0.1)

    # --- sending ---

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        if delay:
            raise TopologyError("kafka does not support delayed delivery")  # the core checks capabilities first
        producer = self._producer
        if producer is None:
            raise ClosedError("the kafka bus is not open")
        topic = topic_of(endpoint)
        with translated(f"send to {topic!r}", publish=True, secrets=self._secrets):
            if len(records) == 1:  # a single send: aiokafka batches concurrent ones by itself
                kr = _codec.encode(records[0])
                ack = await producer.send(topic, kr.value, key=kr.key, headers=kr.headers, timestamp_ms=kr.timestamp_ms)
                await ack
            elif records:
                await asyncio.gather(*await self._send_batches(producer, topic, records))

    async def _send_batches(
        self, producer: AIOKafkaProducer, topic: str, records: Sequence[Record]
    ) -> list[asyncio.Future[Any]]:
        """Hand ``records`` to the producer as whole record batches, one partition each; their acks.

        Keyed records go where ``producer.send`` would put them (the producer's default partitioner, so one
        key keeps one partition and its order); the records without a key go to one partition, chosen at
        random per call (Kafka's sticky partitioning). Much cheaper than one ``send`` per record: aiokafka
        then builds each batch once instead of appending record by record under its accumulator.
        """
        partitions = await producer.partitions_for(topic)
        everywhere = list(partitions)  # the same list producer.send gives the partitioner
        by_partition: dict[int, list[_codec.KafkaRecord]] = {}
        unkeyed: int | None = None
        for record in records:
            kr = _codec.encode(record)
            if kr.key is None:
                if unkeyed is None:
                    unkeyed = _PARTITIONER(None, everywhere, everywhere)
                partition = unkeyed
            else:
                partition = _PARTITIONER(kr.key, everywhere, everywhere)
            by_partition.setdefault(partition, []).append(kr)
        acks: list[asyncio.Future[Any]] = []
        for partition, group in by_partition.items():
            batch = producer.create_batch()
            for kr in group:
                if batch.append(key=kr.key, value=kr.value, timestamp=kr.timestamp_ms, headers=kr.headers) is None:
                    acks.append(await producer.send_batch(batch, topic, partition=partition))  # full: send it
                    batch = producer.create_batch()  # an empty batch takes any record; the core checked its size
                    batch.append(key=kr.key, value=kr.value, timestamp=kr.timestamp_ms, headers=kr.headers)
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        return acks

    # --- receiving ---

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        if self._producer is None:
            raise ClosedError("the kafka bus is not open")
        receiver = KafkaReceiver(self, endpoint, prefetch)
        self._receivers.add(receiver)
        return receiver

    def forget(self, receiver: KafkaReceiver) -> None:
        """``receiver`` closed: the adapter no longer closes it."""
        self._receivers.discard(receiver)


_MAX_BATCH = 512 * 1024  # bytes in one record batch (aiokafka's default: 16 KiB)
_PARTITIONER = DefaultPartitioner()  # the producer's own (it is built with the default): same key, same partition


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) from a CreateTopics or DeleteTopics response of any version."""
    out = []
    items = getattr(response, "topic_errors", None) or getattr(response, "topic_error_codes", None)
    for item in items or getattr(response, "topics", []):
        out.append((item[0], item[1], item[2] if len(item) > 2 and isinstance(item[2], str) else None))
    return out
