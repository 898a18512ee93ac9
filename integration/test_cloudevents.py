"""CloudEvents round-trip on every real broker: events of each data kind, in binary mode with the broker's binding
prefix and with Kafka's, and in structured mode, come back with the same attributes, data and key."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

import msgbus
from integration.brokers import endpoint
from integration.contract_urls import at_defaults
from msgbus.cloudevents import KAFKA_PREFIX, CloudEvent, from_message, header_prefix, to_outgoing
from msgbus.testing import wait_for_messages

BACKENDS = ["rabbitmq", "redis", "kafka", "nats", "postgresql", "pubsub", "sqs", "servicebus"]
WHEN = datetime(2026, 12, 4, 9, 30, 15, 123456, tzinfo=UTC)


def events(run: str) -> list[CloudEvent]:
    base = {"source": "/orders", "type": "com.example.order.placed", "time": WHEN}
    return [
        CloudEvent({**base, "id": f"{run}-json", "datacontenttype": "application/json"}, {"id": 42, "n": [1, "é"]}),
        CloudEvent({**base, "id": f"{run}-text", "subject": "orders/7", "partitionkey": "customer-7"}, "héllo"),
        CloudEvent({**base, "id": f"{run}-bytes", "traceparent": "00-abc-def-01"}, bytes(range(256))),
        CloudEvent({**base, "id": f"{run}-none", "datacontenttype": "application/vnd.example"}, None),
    ]


def expected(event: CloudEvent, mode: str) -> dict[str, Any]:
    want = dict(event.get_attributes())
    data = event.get_data()
    if mode == "binary" and "datacontenttype" not in want and isinstance(data, str):
        want["datacontenttype"] = "text/plain; charset=utf-8"
    if mode == "binary" and data is None:
        want.pop("datacontenttype", None)  # no data, no content type
    return want


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cloudevents_roundtrip(backend: str) -> None:
    url = at_defaults(endpoint(backend))
    run = uuid.uuid4().hex[:8]
    async with msgbus.connect(url) as bus:
        ways = [("binary", header_prefix(bus)), ("binary", KAFKA_PREFIX), ("structured", KAFKA_PREFIX)]
        for mode, prefix in dict.fromkeys(ways):
            queue = f"ce-{run}-{mode}-{prefix.rstrip('_').lower()}"
            sent = events(f"{run}-{mode}-{prefix}")
            await bus.producer(queue).send_many([to_outgoing(e, mode=mode, prefix=prefix) for e in sent])  # type: ignore[arg-type]
            async with bus.consumer(queue) as consumer:
                got = await wait_for_messages(consumer, len(sent), timeout=60)
            received = {m.id: m for m in got}
            assert len(received) == len(sent), f"{backend} {mode} {prefix}: {len(got)} received, ids {received}"
            by_event = {from_message(m).get_id(): (from_message(m), m) for m in got}
            assert sorted(by_event) == sorted(e.get_id() for e in sent), f"{backend} {mode} {prefix}"
            for event in sent:
                back, msg = by_event[event.get_id()]
                assert back.get_attributes() == expected(event, mode), f"{backend} {mode} {prefix}"
                assert back.get_data() == event.get_data(), f"{backend} {mode} {prefix}"
                assert msg.key == event.get_extension("partitionkey"), f"{backend} {mode} {prefix}"
