"""OpenTelemetry traces and metrics (msgbus._telemetry) on memory://: off by default, exact counts, hostile
trace headers, no secrets in attributes. The cross-backend promise is the contract check in msgbus.testing."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import msgbus
import msgbus.sync
from msgbus import Message, RetryPolicy, _telemetry
from msgbus._url import parse_url
from msgbus.adapter import Endpoint

POLICY = RetryPolicy(max_attempts=2, initial_backoff=0)


class Otel:
    """A tracer and a meter provider of the test's own, exporting in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def instrument(self, bus: msgbus.Bus) -> None:
        bus.instrument(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)

    def metrics(self) -> dict[str, float]:
        """Metric name -> its sum (counters) or count (histograms), over all attribute sets."""
        out: dict[str, float] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points = metric.data.data_points
                    out[metric.name] = sum(getattr(p, "value", None) or getattr(p, "count", 0) for p in points)
        return out

    def process_spans(self) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith("process ")]


def _url() -> str:
    return f"memory://otel-{uuid.uuid4().hex[:8]}"


async def _run_until(consumer: msgbus.Consumer[Any], handler: Any, done: asyncio.Event) -> None:
    task = asyncio.create_task(consumer.run(handler, concurrency=4, retry=POLICY))
    await asyncio.wait_for(done.wait(), 10)
    consumer.stop()
    await task


async def test_off_without_a_configured_provider() -> None:
    # The test process configures no global provider: nothing to do per message.
    async with msgbus.connect(_url()) as bus:
        assert bus._telemetry is None
        await bus.producer("q").send(b"x")
        (msg,) = await bus.consumer("q").receive(timeout=1)
        assert "traceparent" not in msg.headers


async def test_off_without_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_telemetry, "trace", None)  # as if opentelemetry-api were not installed
    bus = msgbus.connect(_url())
    bus.instrument(tracer_provider=Otel().tracer_provider)
    assert bus._telemetry is None


async def test_counts_and_outcomes_are_exact() -> None:
    otel = Otel()
    async with msgbus.connect(_url()) as bus:
        otel.instrument(bus)
        producer = bus.producer("work")
        ok = await producer.send_many([{"do": "ack", "i": i} for i in range(5)])
        flaky = [await producer.send({"do": "flaky"}) for _ in range(3)]
        doomed = [await producer.send({"do": "fail"}) for _ in range(2)]
        seen: list[str] = []
        done = asyncio.Event()

        async def handler(msg: Message[Any]) -> None:
            seen.append(msg.id)
            if len(seen) == 5 + 2 * 3 + 2 * 2:
                done.set()
            if msg.body["do"] == "fail" or (msg.body["do"] == "flaky" and msg.attempt == 1):
                raise ValueError("boom")

        await _run_until(bus.consumer("work"), handler, done)
    outcomes = {
        (s.attributes["messaging.message.id"], s.attributes["msgbus.message.attempt"]): s.attributes.get(
            "msgbus.message.outcome"
        )
        for s in otel.process_spans()
    }
    assert outcomes == {
        **{(i, 1): "ack" for i in ok},
        **{(i, 1): "retry" for i in flaky},
        **{(i, 2): "ack" for i in flaky},
        **{(i, 1): "retry" for i in doomed},
        **{(i, 2): "dead_letter" for i in doomed},
    }
    assert otel.metrics() == {
        "messaging.client.sent.messages": 10,
        "messaging.client.operation.duration": 1 + 3 + 2,  # one per send call, the batch once
        "messaging.client.consumed.messages": 15,
        "messaging.process.duration": 15,
        "msgbus.messages.retried": 5,
        "msgbus.messages.dead_lettered": 2,
        "msgbus.messages.in_flight": 0,
    }


async def test_a_batch_send_links_the_messages_create_spans() -> None:
    otel = Otel()
    async with msgbus.connect(_url()) as bus:
        otel.instrument(bus)
        ids = await bus.producer("b").send_many([1, 2, 3])
        got = await bus.consumer("b").receive(max_messages=3, timeout=1)
    spans = otel.spans.get_finished_spans()
    creates = {s.attributes["messaging.message.id"]: s for s in spans if s.name == "create b"}
    (send,) = [s for s in spans if s.name == "send b"]
    assert set(creates) == set(ids)
    assert send.attributes["messaging.batch.message_count"] == 3
    assert {link.context.span_id for link in send.links} == {s.context.span_id for s in creates.values()}
    for msg in got:  # each message carries its own create span
        assert msg.headers["traceparent"].split("-")[2] == f"{creates[msg.id].context.span_id:016x}"


HOSTILE = [
    "",
    "garbage",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01",  # all-zero ids: invalid
    "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # version ff is forbidden
    "00-" + "g" * 32 + "-" + "b" * 16 + "-01",
    "00-" + "a" * 32 + "-" + "b" * 16 + "-01-extra-" + "x" * 10_000,
    "\u202e00-ünïcødé-☃",
    "-" * 5000,
]


async def _consume_with_trace_headers(values: list[str], *, tracestate: str = "k=v") -> list[Any]:
    """Send ``values`` as traceparent from an uninstrumented bus; an instrumented consumer must handle each."""
    otel = Otel()
    url = _url()
    async with msgbus.connect(url) as sender, msgbus.connect(url) as bus:
        ids = [
            await sender.producer("h").send(b"x", headers={"traceparent": v, "tracestate": tracestate}) for v in values
        ]
        otel.instrument(bus)
        handled: list[str] = []
        done = asyncio.Event()

        async def handler(msg: Message[Any]) -> None:
            handled.append(msg.id)
            if len(handled) == len(ids):
                done.set()

        await _run_until(bus.consumer("h"), handler, done)
        assert sorted(handled) == sorted(ids)
        assert await bus.consumer("h").receive(timeout=0.2) == []  # all acked
    return otel.process_spans()


async def test_a_malformed_traceparent_never_stops_the_consumer() -> None:
    spans = await _consume_with_trace_headers(HOSTILE, tracestate="\x00" * 600)
    assert len(spans) == len(HOSTILE)
    assert all(s.parent is None for s in spans)  # each starts a trace of its own


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=200), st.text(max_size=80))
def test_any_trace_header_text_gets_a_process_span(traceparent: str, tracestate: str) -> None:
    """The wrapped handler itself (the loop around it is covered above): any text is at worst no parent."""

    async def one() -> Any:
        otel = Otel()
        async with msgbus.connect(_url()) as bus:
            headers = {"traceparent": traceparent, "tracestate": tracestate.encode(errors="ignore").decode()}
            await bus.producer("h").send(b"x", headers=headers)
            (msg,) = await bus.consumer("h").receive(timeout=1)
            otel.instrument(bus)
            assert bus._telemetry is not None
            handled = []

            async def handler(m: Message[Any]) -> None:
                handled.append(m.id)

            await bus._telemetry.process(handler, Endpoint("queue", "h"), 2)(msg)
            assert handled == [msg.id]
        return otel.process_spans()

    (span,) = asyncio.run(one())
    assert span.attributes["msgbus.message.outcome"] == "ack"


async def test_a_propagator_that_raises_never_stops_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: object, **_kwargs: object) -> None:
        raise ValueError("a third-party propagator choked")

    monkeypatch.setattr(_telemetry.propagate, "extract", explode)
    spans = await _consume_with_trace_headers(["00-" + "a" * 32 + "-" + "b" * 16 + "-01"])
    assert [s.parent for s in spans] == [None]


def test_no_secrets_in_attributes() -> None:
    otel = Otel()
    url = parse_url("amqp://user:s3cr3t-pw@broker.example:5672/vhost?password=hunter2")
    telemetry = _telemetry.Telemetry(url, otel.tracer_provider, otel.meter_provider)
    attrs = telemetry.attributes(Endpoint("topic", "orders", "billing"), "process")
    assert attrs == {
        "messaging.system": "rabbitmq",
        "server.address": "broker.example",
        "server.port": 5672,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.destination.subscription.name": "billing",
        "messaging.consumer.group.name": "billing",
    }


def test_the_sync_facade_sends_under_the_callers_span() -> None:
    """Its calls run on a loop thread of their own: the caller's context must go with them."""
    otel = Otel()
    with msgbus.sync.connect(_url()) as bus:
        otel.instrument(bus._bus)
        with otel.tracer_provider.get_tracer("app").start_as_current_span("request") as request:
            bus.producer("s").send(b"x")
    (send,) = [s for s in otel.spans.get_finished_spans() if s.name == "send s"]
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id


async def test_buses_sharing_a_meter_provider_add_up() -> None:
    """An instrument name is registered once per meter: the second bus (and a bus re-resolved when it opens)
    must count into the same instruments, not into callbacks the SDK ignored."""
    otel = Otel()
    url = _url()
    first, second = msgbus.connect(url), msgbus.connect(url)
    for bus in (first, second):
        otel.instrument(bus)
    async with first, second:
        await first.producer("q").send(b"1")
        await second.producer("q").send_many([b"2", b"3"])
        await second.producer("other").send(b"4")
    assert otel.metrics()["messaging.client.sent.messages"] == 4
    data = otel.reader.get_metrics_data()
    assert data is not None
    (sent,) = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if "sent" in m.name]
    by_queue = {p.attributes["messaging.destination.name"]: p.value for p in sent.data.data_points}
    assert by_queue == {"q": 3, "other": 1}


_GLOBAL_PROVIDER_RUN = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from msgbus.testing import run_contract

trace.set_tracer_provider(TracerProvider())


async def main() -> None:
    with trace.get_tracer("user").start_as_current_span("user's test"):
        report = await run_contract("memory://", only=["headers and ids round-trip"])
    print(*(f"{r.status}: {r.detail}" for r in report.results))


asyncio.run(main())
"""


def test_the_contract_holds_in_a_process_with_a_global_tracer_provider() -> None:
    """A user's suite that configured OpenTelemetry globally sends a traceparent with every message; the headers
    round trip compares what the check sent (it failed with 100 differences before)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _GLOBAL_PROVIDER_RUN], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("pass: "), out.stdout + out.stderr[-2000:]
