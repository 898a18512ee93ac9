"""Interoperating with code that does not use msgbus (issue 18), on Redis, SQS, SNS and Service Bus, both ways.

Raw SDK -> msgbus: the broker's own Python client sends N JSON messages with a content type (where the broker has
a place for one), a custom header and no msgbus header; a msgbus consumer gets every one decoded as JSON with its
header and a distinct id, nacks a fifth once (they come back as attempt 2 with the same id) and rejects another
fifth, which the dead-letter consumer then holds with body and header. msgbus -> raw SDK: a producer sends N, and
the raw client finds body, content type, key, correlation id and header in the broker's native places. Exact
counts both ways. The mapping tested is the one on each adapter's page ("Talking to non-msgbus code").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import msgbus
from integration.brokers import Endpoint as Broker
from integration.contract_urls import tuned

N = 20  # per direction: a fifth nacked once, a fifth dead-lettered
BACKENDS = ("redis", "sqs", "sns", "servicebus")
JSON = "application/json"
Send = Callable[[list[bytes]], Awaitable[None]]
Read = Callable[[int], Awaitable[list[dict[str, Any]]]]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_raw_sdk_to_msgbus(broker_url: Callable[[str], Broker], backend: str) -> None:
    name = f"interop-in-{uuid.uuid4().hex[:8]}"
    async with msgbus.connect(tuned(broker_url("sqs" if backend == "sns" else backend))) as bus:
        topic = backend == "sns"
        consumer = bus.subscriber(name, subscription="svc") if topic else bus.consumer(name)
        await consumer.open()  # declared first: a subscription gets what is published after
        async with raw_sender(bus, backend, name) as send:
            await send([json.dumps({"n": i}).encode() for i in range(N)])
        first_ids: dict[int, str] = {}
        attempts: dict[int, list[int]] = {}
        problems: list[str] = []
        while sum(len(a) for a in attempts.values()) < N + N // 5:
            got = await consumer.receive(max_messages=10, timeout=5.0)
            assert got, f"stalled after {attempts}"
            for msg in got:
                if not isinstance(msg.body, dict) or msg.content_type != JSON:
                    problems.append(f"{msg.id}: {msg.body!r} typed {msg.content_type!r}")
                    await msg.reject("not JSON")
                    continue
                n = msg.body["n"]
                attempts.setdefault(n, []).append(msg.attempt)
                if first_ids.setdefault(n, msg.id) != msg.id:
                    problems.append(f"{n}: id {msg.id} on redelivery, was {first_ids[n]}")
                if dict(msg.headers) != {"origin": "legacy"}:
                    problems.append(f"{n}: headers {dict(msg.headers)}")
                if n % 5 == 0:
                    await msg.reject("interop: refused")
                elif n % 5 == 1 and msg.attempt == 1:
                    await msg.nack()
                else:
                    await msg.ack()
        assert not problems, problems[:5]
        assert len(set(first_ids.values())) == N, "ids of distinct messages must differ"
        assert attempts == {n: [1, 2] if n % 5 == 1 else [1] for n in range(N)}
        dead_consumer = bus.dead_letters(name, subscription="svc" if topic else None)
        dead: dict[int, Any] = {}
        while len(dead) < N // 5:
            got = await dead_consumer.receive(max_messages=10, timeout=5.0)
            assert got, f"dead letters stalled after {sorted(dead)}"
            for msg in got:
                dead[json.loads(msg.payload)["n"]] = msg
                await msg.ack()
        assert sorted(dead) == [n for n in range(N) if n % 5 == 0]
        for msg in dead.values():
            assert msg.headers["origin"] == "legacy" and msg.dead_letter_reason == "interop: refused", msg.headers
        assert await consumer.receive(max_messages=10, timeout=0.5) == []  # nothing more, nothing twice
        await consumer.close()
        await dead_consumer.close()
    print(f"{backend}: {N} raw messages in, {N // 5} retried (attempt 2), {N // 5} dead-lettered")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_msgbus_to_raw_sdk(broker_url: Callable[[str], Broker], backend: str) -> None:
    name = f"interop-out-{uuid.uuid4().hex[:8]}"
    url = tuned(broker_url("sqs" if backend == "sns" else backend))
    async with msgbus.connect(url) as bus, raw_reader(bus, backend, name) as read:
        outgoing = [
            msgbus.Outgoing({"n": i}, key=f"k{i % 3}", headers={"origin": "msgbus"}, correlation_id=f"c{i}")
            for i in range(N)
        ]
        if backend == "sns":
            ids = await bus.publisher(name).publish_many(outgoing)
        else:
            ids = await bus.producer(name).send_many(outgoing)
        got = await read(N)
    assert len(got) == N
    by_n = {json.loads(m["body"])["n"]: m for m in got}
    assert sorted(by_n) == list(range(N))
    for n, m in by_n.items():
        want = {"content_type": JSON, "key": f"k{n % 3}", "correlation_id": f"c{n}", "origin": "msgbus"}
        assert {k: m.get(k) for k in want} == want, m
        assert not [h for h in m["headers"] if h.startswith("x-msgbus-")], m["headers"]
    assert sorted(m["id"] for m in got) == sorted(ids)
    print(f"{backend}: {N} msgbus messages read by the raw client with body, content type, key and headers")


# -- the raw side, per broker --------------------------------------------------------------------------------


@asynccontextmanager
async def raw_sender(bus: msgbus.Bus, backend: str, name: str) -> AsyncIterator[Send]:
    """Sends bodies as other code would: JSON, typed where the broker has a place for it, header ``origin``."""
    if backend == "redis":
        async with _redis(bus) as client:
            stream = f"msgbus:{{q:{name}}}"

            async def send(bodies: list[bytes]) -> None:
                for body in bodies:  # the plain XADD
                    await client.xadd(stream, {"body": body, "origin": "legacy", "content-type": JSON})

            yield send
    elif backend in ("sqs", "sns"):
        async with _aws(bus, "sqs") as sqs, _aws(bus, "sns") as sns:
            attrs = {
                "content-type": {"DataType": "String", "StringValue": JSON},
                "origin": {"DataType": "String", "StringValue": "legacy"},
            }

            async def send(bodies: list[bytes]) -> None:
                if backend == "sns":
                    arn = (await sns.create_topic(Name=name))["TopicArn"]
                    for body in bodies:
                        await sns.publish(TopicArn=arn, Message=body.decode(), MessageAttributes=attrs)
                else:
                    url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
                    for body in bodies:
                        await sqs.send_message(QueueUrl=url, MessageBody=body.decode(), MessageAttributes=attrs)

            yield send
    else:
        from azure.servicebus import ServiceBusMessage

        async with _servicebus(bus) as client, client.get_queue_sender(name) as sender:

            async def send(bodies: list[bytes]) -> None:
                await sender.send_messages(
                    [
                        ServiceBusMessage(b, content_type=JSON, application_properties={"origin": "legacy"})
                        for b in bodies
                    ]
                )

            yield send


@asynccontextmanager
async def raw_reader(bus: msgbus.Bus, backend: str, name: str) -> AsyncIterator[Read]:
    """Reads what msgbus sent where the broker keeps it: ``body``, ``content_type``, ``key``, ``correlation_id``,
    ``id``, ``origin`` and the names of all ``headers``."""
    if backend == "redis":
        await bus.consumer(name).open()
        async with _redis(bus) as client:

            async def read(n: int) -> list[dict[str, Any]]:
                entries = await client.xrange(f"msgbus:{{q:{name}}}")
                out = []
                for _, fields in entries:
                    f = {k.decode(): v.decode() for k, v in fields.items()}
                    out.append(
                        {
                            "body": f["body"],
                            "content_type": f.get("content-type"),
                            "key": f.get("key"),
                            "correlation_id": f.get("correlation-id"),
                            "id": f.get("id"),
                            "origin": f.get("origin"),
                            "headers": list(f),
                        }
                    )
                return out

            yield read
    elif backend in ("sqs", "sns"):
        queue = name
        if backend == "sns":  # the raw reader reads the subscription's queue (SNS raw message delivery)
            await bus.subscriber(name, subscription="raw").open()
            queue = f"{name}--raw"
        else:
            await bus.consumer(name).open()
        async with _aws(bus, "sqs") as sqs:

            async def read(n: int) -> list[dict[str, Any]]:
                url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
                out: dict[str, dict[str, Any]] = {}
                for _ in range(50):
                    if len(out) >= n:
                        break
                    reply = await sqs.receive_message(
                        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
                    )
                    for m in reply.get("Messages", []):
                        a = {k: v.get("StringValue") for k, v in m.get("MessageAttributes", {}).items()}
                        out[m["MessageId"]] = {
                            "body": m["Body"],
                            "content_type": a.get("content-type"),
                            "key": a.get("key"),
                            "correlation_id": a.get("correlation-id"),
                            "id": json.loads(a["msgbus"])["id"],
                            "origin": a.get("origin"),
                            "headers": list(a),
                        }
                        await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                return list(out.values())

            yield read
    else:
        await bus.consumer(name).open()
        async with _servicebus(bus) as client, client.get_queue_receiver(name) as receiver:

            async def read(n: int) -> list[dict[str, Any]]:
                out: list[dict[str, Any]] = []
                for _ in range(50):
                    if len(out) >= n:
                        break
                    for m in await receiver.receive_messages(max_message_count=n - len(out), max_wait_time=2):
                        props = {_text(k): _text(v) for k, v in (m.application_properties or {}).items()}
                        out.append(
                            {
                                "body": b"".join(m.body).decode(),
                                "content_type": m.content_type,
                                "key": m.partition_key,
                                "correlation_id": m.correlation_id,
                                "id": m.message_id,
                                "origin": props.get("origin"),
                                "headers": list(props),
                            }
                        )
                        await receiver.complete_message(m)
                return out

            yield read


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@asynccontextmanager
async def _redis(bus: msgbus.Bus) -> AsyncIterator[Any]:
    import redis.asyncio

    o = bus.adapter.options  # type: ignore[attr-defined]
    client = redis.asyncio.Redis(host=o.host, port=o.port, db=o.db, username=o.username, password=o.password)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _aws(bus: msgbus.Bus, service: str) -> AsyncIterator[Any]:
    from aiobotocore.session import get_session

    o = bus.adapter.options  # type: ignore[attr-defined]
    async with get_session().create_client(
        service,
        region_name=o.region or "us-east-1",
        endpoint_url=o.endpoint_url,
        aws_access_key_id=o.access_key_id,
        aws_secret_access_key=o.secret_access_key,
    ) as client:
        yield client


@asynccontextmanager
async def _servicebus(bus: msgbus.Bus) -> AsyncIterator[Any]:
    from azure.servicebus.aio import ServiceBusClient

    async with ServiceBusClient.from_connection_string(bus.adapter.options.connection_string) as client:  # type: ignore[attr-defined]
        yield client
