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
from opentelemetry.trace import SpanKind, StatusCode

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
        assert type(msg._delivery).__module__ == "msgbus._memory"  # handed out as received: nothing wraps it


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


# Messages settled without a handler of run(): dead-lettered before any handler (undecodable, over the delivery
# limit), and read with receive() / async for. Each gets the same consumer span and counts as a handled one.

LIMIT = msgbus.RetryPolicy(max_attempts=2, initial_backoff=0)
UNDECODABLE = {"body": b"{not json", "content_type": "application/json"}


@pytest.fixture(params=["memory", "sqlite"])
def bus_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh bus on either embedded backend; leases of 0.2 s, so an abandoned delivery comes back soon."""
    if request.param == "memory":
        return f"{_url()}?visibility_timeout=0.2"
    return f"sqlite:///{tmp_path}/otel.db?visibility_timeout=0.2"


async def _eventually(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _dead_lettered_unhandled(url: str, how: str, *, over_limit: bool, traceparent: str | None = None) -> Any:
    """Send one message that never reaches a handler (undecodable, or delivered past ``LIMIT``), consume it with
    ``how`` ("run" or "receive") on an instrumented bus; returns (otel, its id, send span, dead letters read)."""
    from msgbus.testing._crash import abandon

    otel = Otel()
    async with msgbus.connect(url) as plain, msgbus.connect(url) as bus:
        otel.instrument(bus)
        headers = None if traceparent is None else {"traceparent": traceparent}
        sent = (
            await (plain if traceparent is not None else bus)
            .producer("u")
            .send(**({"body": b"poison"} if over_limit else UNDECODABLE), headers=headers)
        )
        if over_limit:  # delivered LIMIT times to consumers that vanished without settling it
            for _ in range(LIMIT.max_attempts):
                gone = plain.consumer("u")
                while not await gone.receive(timeout=0.5):
                    pass
                await abandon(gone)
                await asyncio.sleep(0.25)
        handled: list[str] = []
        consumer = bus.consumer("u", retry=LIMIT)
        if how == "run":

            async def handler(msg: Message[Any]) -> None:
                handled.append(msg.id)

            task = asyncio.create_task(consumer.run(handler, retry=LIMIT))
            await _eventually(lambda: otel.process_spans(), "a process span")
            consumer.stop()
            await task
        else:
            got = await consumer.receive(timeout=2)
            handled += [m.id for m in got]
        assert handled == []
        dead = await plain.dead_letters("u").receive(max_messages=10, timeout=2)
        assert await plain.consumer("u").receive(timeout=0.3) == []  # settled, not left to come back
    (send,) = [s for s in otel.spans.get_finished_spans() if s.name == "send u"] or [None]
    return otel, sent, send, dead


@pytest.mark.parametrize("how", ["run", "receive"])
@pytest.mark.parametrize("over_limit", [False, True], ids=["undecodable", "over-limit"])
async def test_a_message_dead_lettered_before_any_handler_gets_one_span(
    bus_url: str, how: str, over_limit: bool
) -> None:
    otel, sent, send, dead = await _dead_lettered_unhandled(bus_url, how, over_limit=over_limit)
    assert [m.id for m in dead] == [sent]
    (span,) = otel.process_spans()
    reason = dead[0].dead_letter_reason
    assert reason is not None and reason.startswith("delivered 3 times" if over_limit else "DecodeError")
    assert span.attributes["messaging.message.id"] == sent
    assert span.attributes["msgbus.message.outcome"] == "dead_letter"
    assert span.attributes["msgbus.message.attempt"] == (3 if over_limit else 1)
    assert [(e.name, dict(e.attributes)) for e in span.events] == [
        ("msgbus.dead_letter", {"msgbus.dead_letter.reason": reason})
    ]
    assert span.status.status_code.name == "ERROR" and span.status.description == reason[:200]
    if not over_limit:  # sent by the instrumented bus: the dead-lettering joins the send's trace
        assert span.parent is not None and span.parent.span_id == send.context.span_id
    metrics = otel.metrics()
    assert metrics["msgbus.messages.dead_lettered"] == 1
    assert "messaging.client.consumed.messages" not in metrics  # no handler, no application saw it


async def test_receive_then_ack_nack_reject_each_get_one_span_to_settlement(bus_url: str) -> None:
    otel = Otel()
    async with msgbus.connect(bus_url) as bus:
        otel.instrument(bus)
        ids = [await bus.producer("r").send({"i": i}) for i in range(3)]
        consumer = bus.consumer("r", retry=POLICY)
        got = {m.id: m for m in await consumer.receive(max_messages=3, timeout=2)}
        assert set(got) == set(ids)
        assert otel.process_spans() == []  # each span is open until its message is settled
        await got[ids[0]].ack()
        await got[ids[1]].nack()
        await got[ids[2]].reject("not for us")
        await got[ids[0]].ack()  # settling twice is a no-op: no second span
        async for again in consumer:  # the nacked one, through async for
            await again.ack()
            break
    spans = otel.process_spans()
    sends = {
        s.attributes["messaging.message.id"]: s.context.span_id
        for s in otel.spans.get_finished_spans()
        if s.name == "send r"
    }
    outcomes = sorted(
        (
            ids.index(s.attributes["messaging.message.id"]),
            s.attributes["msgbus.message.attempt"],
            s.attributes["msgbus.message.outcome"],
        )
        for s in spans
    )
    assert outcomes == [(0, 1, "ack"), (1, 1, "retry"), (1, 2, "ack"), (2, 1, "dead_letter")]
    for span in spans:  # each a child of its message's send span
        assert span.parent is not None and span.parent.span_id == sends[span.attributes["messaging.message.id"]]
    (rejected,) = [s for s in spans if s.attributes["msgbus.message.outcome"] == "dead_letter"]
    assert [e.attributes["msgbus.dead_letter.reason"] for e in rejected.events] == ["not for us"]
    assert otel.metrics() == {
        "messaging.client.sent.messages": 3,
        "messaging.client.operation.duration": 3,
        "messaging.client.consumed.messages": 4,
        "messaging.process.duration": 4,
        "msgbus.messages.retried": 1,
        "msgbus.messages.dead_lettered": 1,
    }


@pytest.mark.parametrize("propagator", ["w3c", "raising"])
async def test_hostile_trace_headers_never_stop_receive_nor_a_dead_letter(
    bus_url: str, propagator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if propagator == "raising":  # a third-party propagator that chokes on them

        def explode(*_args: object, **_kwargs: object) -> None:
            raise ValueError("a third-party propagator choked")

        monkeypatch.setattr(_telemetry.propagate, "extract", explode)
    otel = Otel()
    async with msgbus.connect(bus_url) as plain, msgbus.connect(bus_url) as bus:
        otel.instrument(bus)
        headers = [{"traceparent": v, "tracestate": "\x00" * 600} for v in HOSTILE]
        good = [await plain.producer("h").send(b"x", headers=h) for h in headers]
        bad = [await plain.producer("h").send(**UNDECODABLE, headers=h) for h in headers]
        consumer = bus.consumer("h")
        got: list[Message[Any]] = []
        while len(got) < len(good):
            got += await consumer.receive(max_messages=100, timeout=2)
        for msg in got:
            await msg.ack()
        assert sorted(m.id for m in got) == sorted(good)
        assert len(await plain.dead_letters("h").receive(max_messages=100, timeout=2)) == len(bad)
    spans = otel.process_spans()
    outcomes = sorted((s.attributes["messaging.message.id"], s.attributes["msgbus.message.outcome"]) for s in spans)
    assert outcomes == sorted([(i, "ack") for i in good] + [(i, "dead_letter") for i in bad])
    assert all(s.parent is None for s in spans)  # each starts a trace of its own


async def test_the_bus_own_readers_are_not_observed(bus_url: str) -> None:
    """Redrive and the reply listener read with the consumer's receive, but handle nothing: no span of theirs."""
    otel = Otel()
    async with msgbus.connect(bus_url) as bus:
        otel.instrument(bus)
        await bus.producer("d").send(b"x")
        (msg,) = await bus.consumer("d").receive(timeout=2)
        await msg.reject("for the redrive")
        assert (await bus.redrive("d", idle=0.2)).moved == [msg.id]
        responder = bus.consumer("svc")

        async def answer(request: Message[Any]) -> None:
            await request.reply(b"pong")
            responder.stop()

        task = asyncio.create_task(responder.run(answer))
        reply = await bus.request("svc", b"ping", timeout=5)
        await task
        assert reply.payload == b"pong"
    spans = [(s.name, s.attributes["msgbus.message.outcome"]) for s in otel.process_spans()]
    assert spans == [("process d", "dead_letter"), ("process svc", "ack")]  # none for the redrive nor the reply


async def _run_batch_until(consumer: msgbus.Consumer[Any], handler: Any, done: asyncio.Event) -> None:
    task = asyncio.create_task(consumer.run_batch(handler, max_batch=6, max_wait=0.3, retry=POLICY))
    async with asyncio.timeout(10):
        await done.wait()
    consumer.stop()
    await task


async def test_a_batch_gets_one_process_span_linking_its_messages() -> None:
    """run_batch: one "process" span per batch, linked to the context each message was sent in, with the batch
    size, the count of each outcome and an exception event naming the message a BatchResult failed; the
    handler's own spans are its children; the per-message metrics count as under run()."""
    otel = Otel()
    async with msgbus.connect(_url()) as bus:
        otel.instrument(bus)
        producer = bus.producer("batch")
        ids = [await producer.send({"i": i}) for i in range(6)]
        tracer = otel.tracer_provider.get_tracer("test")
        done = asyncio.Event()
        attempts: list[int] = []

        async def handler(msgs: list[Message[Any]]) -> msgbus.BatchResult:
            with tracer.start_as_current_span("insert rows"):
                attempts.extend(m.attempt for m in msgs)
            if len(attempts) == 7:
                done.set()
            return msgbus.BatchResult({m: ValueError("row refused") for m in msgs if m.body["i"] == 2})

        await _run_batch_until(bus.consumer("batch"), handler, done)
    spans = otel.spans.get_finished_spans()
    sends = {s.attributes["messaging.message.id"]: s for s in spans if s.name == "send batch"}
    first, second = sorted(otel.process_spans(), key=lambda s: s.start_time)
    assert first.kind == second.kind == SpanKind.CONSUMER
    assert first.parent is None
    assert first.attributes["messaging.batch.message_count"] == 6
    assert {(link.context.span_id, link.attributes["messaging.message.id"]) for link in first.links} == {
        (sends[i].context.span_id, i) for i in ids
    }
    assert (first.attributes["msgbus.batch.ack"], first.attributes["msgbus.batch.retry"]) == (5, 1)
    assert "msgbus.message.outcome" not in first.attributes  # mixed: the counts say it
    (event,) = first.events
    assert (event.name, event.attributes["messaging.message.id"]) == ("exception", ids[2])
    assert first.status.status_code != StatusCode.ERROR  # the batch handler did not fail
    assert second.attributes["messaging.batch.message_count"] == 1
    assert [link.attributes["msgbus.message.attempt"] for link in second.links] == [2]
    assert (second.attributes["msgbus.batch.dead_letter"], second.attributes["msgbus.message.outcome"]) == (
        1,
        "dead_letter",
    )
    inserts = [s for s in spans if s.name == "insert rows"]
    assert {s.parent.span_id for s in inserts} == {first.context.span_id, second.context.span_id}
    assert otel.metrics() == {
        "messaging.client.sent.messages": 6,
        "messaging.client.operation.duration": 6,
        "messaging.client.consumed.messages": 7,
        "messaging.process.duration": 7,
        "msgbus.messages.retried": 1,
        "msgbus.messages.dead_lettered": 1,
        "msgbus.messages.in_flight": 0,
    }


async def test_a_batch_that_raises_fails_every_message_on_its_span() -> None:
    otel = Otel()
    async with msgbus.connect(_url()) as bus:
        otel.instrument(bus)
        await bus.producer("doomed").send_many([{"i": i} for i in range(3)])
        done = asyncio.Event()
        seen: list[int] = []

        async def handler(msgs: list[Message[Any]]) -> None:
            seen.extend(m.attempt for m in msgs)
            if len(seen) == 6:
                done.set()
            raise RuntimeError("database down")

        await _run_batch_until(bus.consumer("doomed"), handler, done)
    spans = otel.process_spans()
    assert sum(s.attributes["messaging.batch.message_count"] for s in spans) == 6
    assert sum(s.attributes.get("msgbus.batch.retry", 0) for s in spans) == 3
    assert sum(s.attributes.get("msgbus.batch.dead_letter", 0) for s in spans) == 3
    for span in spans:
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["error.type"] == "RuntimeError"
        assert span.attributes["msgbus.message.outcome"] in ("retry", "dead_letter")
        assert len(span.links) == span.attributes["messaging.batch.message_count"]  # each create span linked
    metrics = otel.metrics()
    assert (metrics["messaging.client.consumed.messages"], metrics["messaging.process.duration"]) == (6, 6)
    assert (metrics["msgbus.messages.retried"], metrics["msgbus.messages.dead_lettered"]) == (3, 3)
