"""Interoperating with code that does not use msgbus (issue 18), both ways, on Kafka, Pub/Sub, NATS, PostgreSQL
and RabbitMQ, through each broker's own Python client.

Raw -> msgbus: the raw client sends JSON with the content type in the broker's place for it, a key and a custom
header, no msgbus header; a msgbus consumer (no ``content_type=`` option: the type must be read) gets dicts, acks
one, nacks one (attempt 2, then acks it) and rejects one (dead-lettered with body, header and reason). Exact counts.
msgbus -> raw: the raw client reads body, content type, key, id, correlation id and headers from their native
places, and sees no ``x-msgbus-`` name but those the adapter's page documents.

PostgreSQL's tables are msgbus's own: there "raw" is plain SQL against them (``INSERT`` a row whose ``meta`` names
only a content type and a header; ``SELECT`` a row and read its ``meta`` JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import msgbus
from integration.brokers import Endpoint
from integration.contract_urls import tuned
from msgbus.adapter import Endpoint as Where
from msgbus.testing import wait_for_messages

BACKENDS = ["kafka", "pubsub", "nats", "postgresql", "rabbitmq"]
JSON = "application/json"
N = 3  # raw -> msgbus: one acked, one nacked then acked, one rejected


@dataclass
class Seen:
    """A message as the raw client found it in its native places."""

    body: bytes
    content_type: str | None
    key: str | None
    message_id: str | None
    correlation_id: str | None
    headers: dict[str, str] = field(default_factory=dict)


# --- the raw side of each broker -----------------------------------------------------------------------------


async def kafka_send(url: str, queue: str, items: list[tuple[bytes, str]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=urlsplit(url).netloc)
    await producer.start()
    try:
        for body, key in items:
            headers = [("content-type", JSON.encode()), ("origin", b"raw")]
            await producer.send_and_wait(queue, body, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def kafka_read(url: str, queue: str, n: int) -> list[Seen]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(queue, bootstrap_servers=urlsplit(url).netloc, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Seen] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        h = {k: v.decode() for k, v in r.headers}
                        out.append(
                            Seen(
                                r.value,
                                h.pop("content-type", None),
                                r.key and r.key.decode(),
                                h.pop("message-id", None),
                                h.pop("correlation-id", None),
                                h,
                            )
                        )
    finally:
        await consumer.stop()
    return out


def _pubsub(url: str) -> tuple[str, str]:
    """The project and (from the URL's emulator_host) sets PUBSUB_EMULATOR_HOST for Google's own client."""
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    os.environ["PUBSUB_EMULATOR_HOST"] = query["emulator_host"]
    return parts.netloc, query.get("prefix", "")


def _pubsub_topic(url: str, queue: str) -> str:
    from msgbus_pubsub._names import route

    project, prefix = _pubsub(url)
    return route(project, prefix, Where("queue", queue)).topic


async def pubsub_send(url: str, queue: str, items: list[tuple[bytes, str]]) -> None:
    from google.cloud import pubsub_v1

    topic = _pubsub_topic(url, queue)

    def send() -> None:
        options = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        publisher = pubsub_v1.PublisherClient(publisher_options=options)
        try:
            futures = [
                publisher.publish(topic, body, ordering_key=key, **{"content-type": JSON, "origin": "raw"})
                for body, key in items
            ]
            for f in futures:
                f.result(timeout=30)
        finally:
            publisher.stop()

    await asyncio.to_thread(send)


async def pubsub_prepare(url: str, queue: str) -> Callable[[int], Any]:
    """A raw subscription of the queue's topic, made before msgbus sends; returns the reader."""
    from google.cloud import pubsub_v1

    topic = _pubsub_topic(url, queue)
    name = topic.replace("/topics/", "/subscriptions/") + "-raw"
    subscriber = pubsub_v1.SubscriberClient()
    await asyncio.to_thread(subscriber.create_subscription, name=name, topic=topic)

    async def read(n: int) -> list[Seen]:
        out: list[Seen] = []
        async with asyncio.timeout(30):
            while len(out) < n:
                response = await asyncio.to_thread(subscriber.pull, subscription=name, max_messages=10, timeout=5)
                for rm in response.received_messages:
                    m = rm.message
                    a = dict(m.attributes)
                    out.append(
                        Seen(
                            m.data,
                            a.pop("content-type", None),
                            m.ordering_key or a.pop("key", None),
                            a.pop("message-id", None),
                            a.pop("correlation-id", None),
                            a,
                        )
                    )
                if response.received_messages:
                    ack_ids = [rm.ack_id for rm in response.received_messages]
                    await asyncio.to_thread(subscriber.acknowledge, subscription=name, ack_ids=ack_ids)
        await asyncio.to_thread(subscriber.delete_subscription, subscription=name)
        subscriber.close()
        return out

    return read


async def nats_send(url: str, queue: str, items: list[tuple[bytes, str]]) -> None:
    import nats

    from msgbus_nats._names import route

    nc = await nats.connect(url.split("?")[0])
    try:
        js = nc.jetstream()
        subject = route("msgbus", Where("queue", queue)).subject
        for body, _key in items:  # NATS has no key: the key stays msgbus's own header
            await js.publish(subject, body, headers={"Content-Type": JSON, "origin": "raw"})
    finally:
        await nc.close()


async def nats_read(url: str, queue: str, n: int) -> list[Seen]:
    import nats

    from msgbus_nats._names import route

    nc = await nats.connect(url.split("?")[0])
    try:
        js = nc.jetstream()
        stream = route("msgbus", Where("queue", queue)).stream
        out = []
        for seq in range(1, n + 1):
            m = await js.get_msg(stream, seq)
            h = dict(m.headers or {})
            out.append(
                Seen(
                    m.data or b"",
                    h.pop("Content-Type", None),
                    h.pop("Msgbus-Key", None),
                    h.pop("Nats-Msg-Id", None),
                    h.pop("Msgbus-Correlation-Id", None),
                    h,
                )
            )
        return out
    finally:
        await nc.close()


def _pg(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    return urlunsplit(parts._replace(query="")), query.get("schema", "msgbus")


async def postgresql_send(url: str, queue: str, items: list[tuple[bytes, str]]) -> None:
    import asyncpg

    dsn, schema = _pg(url)
    conn = await asyncpg.connect(dsn)
    try:
        endpoint = await conn.fetchval(
            f"SELECT id FROM {schema}.endpoints"
            " WHERE kind = 'queue' AND name = $1 AND subscription = '' AND NOT dead_letter",
            queue,
        )
        meta = json.dumps({"content_type": JSON, "headers": {"origin": "raw"}}).encode()
        for body, key in items:
            await conn.execute(
                f"INSERT INTO {schema}.messages (endpoint, visible_at, key, body, meta) VALUES ($1, now(), $2, $3, $4)",
                endpoint,
                key.encode(),
                body,
                meta,
            )
        await conn.execute("SELECT pg_notify($1, $2)", f"msgbus_{schema}", str(endpoint))
    finally:
        await conn.close()


async def postgresql_read(url: str, queue: str, n: int) -> list[Seen]:
    import asyncpg

    dsn, schema = _pg(url)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT m.key, m.body, convert_from(m.meta, 'UTF8')::jsonb AS meta FROM {schema}.messages m"
            f" JOIN {schema}.endpoints e ON e.id = m.endpoint WHERE e.kind = 'queue' AND e.name = $1 ORDER BY m.seq",
            queue,
        )
    finally:
        await conn.close()
    out = []
    for r in rows:
        meta = json.loads(r["meta"])
        key = r["key"] and bytes(r["key"]).decode()
        out.append(
            Seen(
                bytes(r["body"]),
                meta.get("content_type"),
                key,
                meta.get("id"),
                meta.get("correlation_id"),
                meta["headers"],
            )
        )
    return out


async def rabbitmq_send(url: str, queue: str, items: list[tuple[bytes, str]]) -> None:
    import aio_pika

    from msgbus_rabbitmq._names import queue_name

    conn = await aio_pika.connect(url.split("?")[0])
    try:
        channel = await conn.channel()
        for body, _key in items:  # AMQP has no key property: the key stays msgbus's own header
            message = aio_pika.Message(body, content_type=JSON, headers={"origin": "raw"}, delivery_mode=2)
            await channel.default_exchange.publish(message, routing_key=queue_name(Where("queue", queue)))
    finally:
        await conn.close()


async def rabbitmq_read(url: str, queue: str, n: int) -> list[Seen]:
    import aio_pika

    from msgbus_rabbitmq._names import queue_name

    conn = await aio_pika.connect(url.split("?")[0])
    out: list[Seen] = []
    try:
        channel = await conn.channel()
        q = await channel.get_queue(queue_name(Where("queue", queue)), ensure=False)
        async with asyncio.timeout(30):
            while len(out) < n:
                m = await q.get(fail=False)
                if m is None:
                    await asyncio.sleep(0.1)
                    continue
                h = {k: str(v) for k, v in (m.headers or {}).items()}
                out.append(Seen(m.body, m.content_type, h.pop("x-msgbus-key", None), m.message_id, m.correlation_id, h))
                await m.ack()
    finally:
        await conn.close()
    return out


SEND = {
    "kafka": kafka_send,
    "pubsub": pubsub_send,
    "nats": nats_send,
    "postgresql": postgresql_send,
    "rabbitmq": rabbitmq_send,
}
READ = {"kafka": kafka_read, "nats": nats_read, "postgresql": postgresql_read, "rabbitmq": rabbitmq_read}
# The msgbus names a raw reader may see, each documented on the adapter's page: what the broker has no place for.
OWN_NAMES = {
    "kafka": set(),
    "pubsub": {"x-msgbus-timestamp"},
    "nats": {"Msgbus-Ts"},
    "postgresql": set(),
    "rabbitmq": {"timestamp_in_ms"},
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, broker_url: Callable[[str], Endpoint]) -> tuple[str, str]:
    ep = broker_url(request.param)
    return request.param, tuned(ep)


async def test_raw_producer_to_msgbus(backend: tuple[str, str]) -> None:
    name, url = backend
    queue = f"interop-{uuid.uuid4().hex[:12]}"
    bus = msgbus.connect(url)
    deliveries: list[tuple[int, str, int]] = []  # (n, id, attempt)
    async with bus, bus.consumer(queue, prefetch=N) as consumer:
        await SEND[name](url, queue, [(json.dumps({"n": i}).encode(), f"k-{i}") for i in range(N)])
        acked: set[int] = set()
        rejected: set[int] = set()
        async with asyncio.timeout(60):
            while len(acked) + len(rejected) < N:
                for msg in await consumer.receive(max_messages=N, timeout=1.0):
                    assert isinstance(msg.body, dict), f"{name}: the content type was not read: {msg.body!r}"
                    assert msg.content_type == JSON and msg.headers.get("origin") == "raw", msg.headers
                    assert not [h for h in msg.headers if h.lower().startswith(("x-msgbus-", "msgbus-"))]
                    n = msg.body["n"]
                    deliveries.append((n, msg.id, msg.attempt))
                    if n == 1 and msg.attempt == 1:
                        await msg.nack()
                    elif n == 2:
                        await msg.reject("interop: rejected by the test")
                        rejected.add(n)
                    else:
                        await msg.ack()
                        acked.add(n)
        assert await consumer.receive(max_messages=N, timeout=1.0) == [], "a settled message came back"
        async with bus.dead_letters(queue) as dlq:
            dead = await wait_for_messages(dlq, 1, timeout=30)
    assert sorted((n, attempt) for n, _, attempt in deliveries) == [(0, 1), (1, 1), (1, 2), (2, 1)], deliveries
    ids = {n: {i for m, i, _ in deliveries if m == n} for n in range(N)}
    # Distinct between messages, stable across the redelivery. (aio-pika's aiormq stamps a random message_id on
    # whatever it publishes without one: RabbitMQ's rule for messages without one is unit-tested in test_codec.)
    assert len(set.union(*ids.values())) == N and all(len(v) == 1 for v in ids.values()), ids
    (d,) = dead
    assert d.body == {"n": 2} and d.headers.get("origin") == "raw"
    assert "interop: rejected by the test" in (d.dead_letter_reason or "")


async def test_msgbus_producer_to_raw_reader(backend: tuple[str, str]) -> None:
    name, url = backend
    queue = f"interop-{uuid.uuid4().hex[:12]}"
    async with msgbus.connect(url) as bus:
        async with bus.consumer(queue):  # declares the queue (on Pub/Sub: its topic, for the raw subscription)
            pass
        producer = bus.producer(queue)
        read = await pubsub_prepare(url, queue) if name == "pubsub" else None
        ids = [
            await producer.send({"n": i}, key="k-1", headers={"origin": "msgbus"}, correlation_id=f"c-{i}")
            for i in range(2)
        ]
    seen = await read(2) if read is not None else await READ[name](url, queue, 2)
    assert sorted(json.loads(s.body)["n"] for s in seen) == [0, 1], seen
    for s in sorted(seen, key=lambda s: s.body):
        n = json.loads(s.body)["n"]
        assert (s.content_type, s.key, s.message_id, s.correlation_id) == (JSON, "k-1", ids[n], f"c-{n}"), s
        assert s.headers.pop("origin") == "msgbus"
        own = {h for h in s.headers if h not in OWN_NAMES[name] and h != "x-delivery-count"}  # that one: the broker's
        assert not own, f"{name}: msgbus names a raw reader sees beyond the documented ones: {own}"
