"""OpenTelemetry traces and metrics of sends and handled messages (optional: ``pip install msgbus[otel]``).

A bus resolves once, when it is created and again when it opens, whether OpenTelemetry is installed and a
tracer or meter provider is configured (``resolve``). When neither is, the bus holds ``None`` and the send
path and the consume loop do nothing more than test that. Names follow the OpenTelemetry messaging semantic
conventions; the trace context travels in the W3C ``traceparent`` / ``tracestate`` headers (the globally
configured propagator's), which any other OpenTelemetry-instrumented consumer reads.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ._batch import BatchHandler, BatchResult, failures
from ._codec import describe
from ._message import Message
from ._url import BusURL
from .adapter import Delivery, Endpoint, Record

try:
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.metrics import Observation
    from opentelemetry.trace import Link, SpanKind, StatusCode
except ImportError:  # the extra is not installed: telemetry stays off
    trace = None  # type: ignore[assignment]

__all__ = ["OUTCOME", "Telemetry", "resolve"]

Handler = Callable[[Message[Any]], Awaitable[None]]
Store = Callable[[Sequence[Record]], Awaitable[None]]

# messaging.system per URL scheme: the conventions' names where they have one.
SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "sqs": "aws_sqs", "pubsub": "gcp_pubsub"}
ATTEMPT = "msgbus.message.attempt"  # the delivery attempt, 1 on first delivery (no conventions' name)
OUTCOME = "msgbus.message.outcome"  # how the runtime settled it: "ack", "retry" or "dead_letter"
# Providers that are not configured: the API's defaults. By name, since the proxies' classes are private.
_UNSET = {"ProxyTracerProvider", "NoOpTracerProvider", "_ProxyMeterProvider", "NoOpMeterProvider"}


def resolve(url: BusURL, tracer_provider: Any = None, meter_provider: Any = None) -> Telemetry | None:
    """The bus's telemetry, or None when OpenTelemetry is not installed or no provider is configured.

    ``tracer_provider`` / ``meter_provider`` replace the global ones (``Bus.instrument``).
    """
    if trace is None:
        return None
    tracer_provider = tracer_provider or trace.get_tracer_provider()
    meter_provider = meter_provider or metrics.get_meter_provider()
    tracing = type(tracer_provider).__name__ not in _UNSET
    metering = type(meter_provider).__name__ not in _UNSET
    if not tracing and not metering:
        return None
    return Telemetry(url, tracer_provider if tracing else None, meter_provider if metering else None)


class Telemetry:
    """Spans and instruments of one bus; either may be off (None provider), and then costs nothing per message.

    Only the host and port of the bus URL reach an attribute, never a user name, password or option.
    """

    def __init__(self, url: BusURL, tracer_provider: Any, meter_provider: Any) -> None:
        from . import __version__

        self.tracer = tracer_provider.get_tracer("msgbus", __version__) if tracer_provider else None
        self.common: tuple[tuple[str, str | int], ...] = (("messaging.system", SYSTEMS.get(url.scheme, url.scheme)),)
        if url.host:
            self.common += (("server.address", url.host),)
        if url.port is not None:
            self.common += (("server.port", url.port),)
        self._attributes: dict[tuple[Endpoint, str], dict[str, str | int]] = {}
        self.metering = meter_provider is not None
        instruments = _instruments(meter_provider) if self.metering else _Instruments(metrics.NoOpMeterProvider())
        self.shared = instruments
        self.sent, self.consumed = instruments.sent, instruments.consumed
        self.retried, self.dead_lettered, self.in_flight = (
            instruments.retried,
            instruments.dead_lettered,
            instruments.in_flight,
        )
        self.send_duration, self.process_duration = instruments.send_duration, instruments.process_duration

    def attributes(self, endpoint: Endpoint, operation: str) -> dict[str, str | int]:
        """The attributes every span and measurement of ``operation`` on ``endpoint`` carries: one dict per
        content for all the buses measured by one meter provider, so their counts add up (``_Count``)."""
        attrs = self._attributes.get((endpoint, operation))
        if attrs is None:
            attrs = self.shared.attributes.setdefault(
                (self.common, endpoint, operation), _attributes(self.common, endpoint, operation)
            )
            self._attributes[(endpoint, operation)] = attrs
        return attrs

    async def send(self, endpoint: Endpoint, records: Sequence[Record], store: Store, *, batch: bool) -> None:
        """``store(records)`` under a producer span whose context each record carries in its headers.

        A batch gets one "create" span per message (its context goes in that message) and one "send" span
        that links to them all, as the conventions ask.
        """
        if self.tracer is None:
            await self._measured(endpoint, records, store)
            return
        base = self.attributes(endpoint, "send")
        if batch:
            records, links = self._created(self.tracer, endpoint, records)
            attrs = {**base, "messaging.batch.message_count": len(records)}
            kind = SpanKind.CLIENT
        else:
            links = []
            attrs = {**base, "messaging.message.id": records[0].id}
            if records[0].correlation_id is not None:
                attrs["messaging.message.conversation_id"] = records[0].correlation_id
            kind = SpanKind.PRODUCER
        with self.tracer.start_as_current_span(f"send {endpoint.name}", kind=kind, attributes=attrs, links=links):
            await self._measured(endpoint, records if batch else [_carrying(records[0])], store)

    async def _measured(self, endpoint: Endpoint, records: Sequence[Record], store: Store) -> None:
        if not self.metering:
            await store(records)
            return
        base = self.attributes(endpoint, "send")
        start = time.perf_counter()
        try:
            await store(records)
        except BaseException as exc:
            self.send_duration.record(time.perf_counter() - start, {**base, "error.type": type(exc).__name__})
            raise
        self.send_duration.record(time.perf_counter() - start, base)
        self.sent.add(base, len(records))

    def _created(self, tracer: Any, endpoint: Endpoint, records: Sequence[Record]) -> tuple[list[Record], list[Link]]:
        attrs = self.attributes(endpoint, "create")
        name = f"create {endpoint.name}"
        out, links = [], []
        for record in records:
            span = tracer.start_span(
                name, kind=SpanKind.PRODUCER, attributes={**attrs, "messaging.message.id": record.id}
            )
            with trace.use_span(span, end_on_exit=True):
                out.append(_carrying(record))
            links.append(Link(span.get_span_context()))
        return out, links

    def process(self, handler: Handler, endpoint: Endpoint, max_attempts: int) -> Handler:
        """``handler`` inside a consumer "process" span whose parent is the context the message carries.

        The outcome attribute says what the runtime does next: ack on return; on a raise, retry below
        ``max_attempts`` and dead-letter at it (the runtime's rule). A handler that settled the message
        itself leaves it out. A malformed ``traceparent`` only means no parent: it never stops the loop.
        """
        base = self.attributes(endpoint, "process")
        name = f"process {endpoint.name}"
        tracer, metering = self.tracer, self.metering

        async def handle(msg: Message[Any]) -> tuple[str | None, Exception | None]:
            """How the handler ended: the runtime's outcome (None: the handler settled it) and its exception."""
            was_settled = msg.settled
            try:
                await handler(msg)
            except Exception as exc:
                failed = "dead_letter" if msg.attempt >= max_attempts else "retry"
                return (None if was_settled or msg.settled else failed), exc
            return (None if msg.settled else "ack"), None

        async def traced(msg: Message[Any]) -> None:
            if metering:
                self.consumed.add(base)
                self.in_flight.add(base)
            start = time.perf_counter()
            try:
                if tracer is None:
                    outcome, exc = await handle(msg)
                else:
                    attrs = {**base, "messaging.message.id": msg.id, ATTEMPT: msg.attempt}
                    with tracer.start_as_current_span(
                        name, context=_extract(msg.headers), kind=SpanKind.CONSUMER, attributes=attrs
                    ) as span:
                        outcome, exc = await handle(msg)
                        if outcome is not None:
                            span.set_attribute(OUTCOME, outcome)
                        if exc is not None:
                            span.set_attribute("error.type", type(exc).__name__)
                            span.record_exception(exc)
                            span.set_status(StatusCode.ERROR, describe(exc, 200))
            finally:
                if metering:
                    self.in_flight.add(base, -1)
            if metering:
                error = None if exc is None else {**base, "error.type": type(exc).__name__}
                self.process_duration.record(time.perf_counter() - start, error or base)
                if outcome == "retry":
                    self.retried.add(base)
                elif outcome == "dead_letter":
                    self.dead_lettered.add(base)
            if exc is not None:
                raise exc

        return traced

    def process_batch(self, handler: BatchHandler, endpoint: Endpoint, max_attempts: int) -> BatchHandler:
        """``handler`` of a batch inside one consumer "process" span, as the conventions ask for batch processing:
        no parent taken from the messages but a link to each one's creation context (with its id and attempt),
        ``messaging.batch.message_count``, and what became of the batch (``_end_batch``). Each message counts in
        the metrics as under ``run()``: consumed, in flight, processed (taking the batch's duration), retried or
        dead-lettered. The outcomes follow the runtime's rule (``_runtime.handle_batch``): return acks what the
        handler neither settled nor named in its ``BatchResult``; a named or raised failure retries below
        ``max_attempts`` and dead-letters at it. A malformed ``traceparent`` only means no link.
        """
        base = self.attributes(endpoint, "process")
        name = f"process {endpoint.name}"
        tracer, metering = self.tracer, self.metering

        async def traced(msgs: list[Message[Any]]) -> BatchResult | None:
            n = len(msgs)
            if metering:
                self.consumed.add(base, n)
                self.in_flight.add(base, n)
            start = time.perf_counter()
            before = [m.settled for m in msgs]
            outcomes: list[tuple[str | None, BaseException | None]] = []
            error: BaseException | None = None
            span = None
            if tracer is not None:
                attrs = {**base, "messaging.batch.message_count": n}
                span = tracer.start_span(name, kind=SpanKind.CONSUMER, attributes=attrs, links=_links(msgs))
            try:
                with _current(span):
                    try:
                        result = await handler(msgs)
                    except Exception as exc:
                        error = exc
                        outcomes = _batch_outcomes(msgs, before, dict.fromkeys(msgs, exc), max_attempts)
                        raise
                try:
                    failed = failures(result, msgs)
                except TypeError as exc:  # malformed: the runtime fails the whole batch with it
                    error, failed = exc, dict.fromkeys(msgs, exc)
                outcomes = _batch_outcomes(msgs, before, failed, max_attempts)
                return result
            finally:
                if span is not None:
                    _end_batch(span, msgs, outcomes, error)
                if metering:
                    self.in_flight.add(base, -n)
                    seconds = time.perf_counter() - start
                    for outcome, failure in outcomes or [(None, None)] * n:
                        self.process_duration.record(seconds, base if failure is None else _error(base, failure))
                        if outcome == "retry":
                            self.retried.add(base)
                        elif outcome == "dead_letter":
                            self.dead_lettered.add(base)

        return traced

    async def unhandled(
        self, endpoint: Endpoint, record: Record, attempt: int, reason: str, dead_letter: Awaitable[None]
    ) -> None:
        """Await ``dead_letter``, the dead-lettering of a message no handler saw (undecodable, or over the delivery
        limit), inside a consumer "process" span with outcome dead_letter and ``reason`` as an event and the
        status; counted in the dead-lettered metric once it returned (a failure leaves the message where it was).
        """
        base = self.attributes(endpoint, "process")
        if self.tracer is None:
            await dead_letter
        else:
            attrs = {**base, "messaging.message.id": record.id, ATTEMPT: attempt, OUTCOME: "dead_letter"}
            with self.tracer.start_as_current_span(
                f"process {endpoint.name}", context=_extract(record.headers), kind=SpanKind.CONSUMER, attributes=attrs
            ) as span:
                _dead_lettered(span, reason)
                await dead_letter
        if self.metering:
            self.dead_lettered.add(base)

    def received(self, endpoint: Endpoint, msgs: Sequence[Message[Any]]) -> None:
        """Observe ``msgs``, handed out by ``receive()`` or ``async for``: each gets a consumer "process" span from
        now until it is settled (ack, nack or reject: outcome ack, retry or dead_letter), counted as consumed now
        and as processed, retried or dead-lettered then. The span is not made current: msgbus cannot enter it
        around the caller's code (a message never settled has no span)."""
        base = self.attributes(endpoint, "process")
        for msg in msgs:
            span = None
            if self.tracer is not None:
                attrs = {**base, "messaging.message.id": msg.id, ATTEMPT: msg.attempt}
                span = self.tracer.start_span(
                    f"process {endpoint.name}", context=_extract(msg.headers), kind=SpanKind.CONSUMER, attributes=attrs
                )
            if self.metering:
                self.consumed.add(base)
            msg._delivery = _Observed(msg._delivery, self, base, span)


class _Observed(Delivery):
    """A delivery handed out by ``receive()`` / ``async for``: settling it ends its span and counts it
    (``Telemetry.received``). Everything else is the wrapped delivery's."""

    __slots__ = ("_base", "_inner", "_span", "_start", "_telemetry")

    def __init__(self, inner: Delivery, telemetry: Telemetry, base: dict[str, str | int], span: Any) -> None:
        super().__init__(inner.record, inner.attempt, inner.raw, inner.problem)
        self._inner, self._telemetry, self._base, self._span = inner, telemetry, base, span
        self._start = time.perf_counter()

    async def ack(self) -> None:
        await self._settled(self._inner.ack(), "ack")

    async def nack(self, delay: float | None = None) -> None:
        await self._settled(self._inner.nack(delay), "retry")

    async def dead_letter(self, reason: str) -> None:
        await self._settled(self._inner.dead_letter(reason), "dead_letter", reason)

    async def extend(self, seconds: float) -> None:
        await self._inner.extend(seconds)

    async def _settled(self, settle: Awaitable[None], outcome: str, reason: str | None = None) -> None:
        span, telemetry, base = self._span, self._telemetry, self._base
        error = None
        try:
            await settle
        except BaseException as exc:
            error = exc
            raise
        finally:
            if span is not None:
                span.set_attribute(OUTCOME, outcome)
                if reason is not None:
                    _dead_lettered(span, reason)
                if error is not None:
                    span.set_attribute("error.type", type(error).__name__)
                    span.record_exception(error)
                    span.set_status(StatusCode.ERROR, describe(error, 200))
                span.end()
            if telemetry.metering:
                attrs = base if error is None else {**base, "error.type": type(error).__name__}
                telemetry.process_duration.record(time.perf_counter() - self._start, attrs)
                if error is None and outcome == "retry":
                    telemetry.retried.add(base)
                elif error is None and outcome == "dead_letter":
                    telemetry.dead_lettered.add(base)


def _dead_lettered(span: Any, reason: str) -> None:
    """Mark ``span`` as its message's dead-lettering for ``reason``."""
    span.add_event("msgbus.dead_letter", {"msgbus.dead_letter.reason": reason})
    span.set_status(StatusCode.ERROR, reason[:200])


def _links(msgs: Sequence[Message[Any]]) -> list[Link]:
    """A link to the creation context each message carries (none for a message that carries none, or garbage)."""
    links = []
    for msg in msgs:
        context = _extract(msg.headers)
        if context is None:
            continue
        sc = trace.get_current_span(context).get_span_context()
        if sc.is_valid:
            links.append(Link(sc, {"messaging.message.id": msg.id, ATTEMPT: msg.attempt}))
    return links


def _current(span: Any) -> Any:
    """A context making ``span`` current around a batch handler (the handler's own spans are its children);
    exceptions are recorded by ``_end_batch``, not twice."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


def _batch_outcomes(
    msgs: Sequence[Message[Any]],
    before: Sequence[bool],
    failed: Mapping[Message[Any], BaseException],
    max_attempts: int,
) -> list[tuple[str | None, BaseException | None]]:
    """What the runtime does with each message of a handled batch: (outcome, its failure). The outcome is None
    for a message the handler settled itself (or that was settled before it)."""
    out: list[tuple[str | None, BaseException | None]] = []
    for msg, was_settled in zip(msgs, before, strict=True):
        exc = failed.get(msg)
        if was_settled or msg.settled:
            out.append((None, exc))
        elif exc is not None:
            out.append(("dead_letter" if msg.attempt >= max_attempts else "retry", exc))
        else:
            out.append(("ack", None))
    return out


def _end_batch(
    span: Any,
    msgs: Sequence[Message[Any]],
    outcomes: Sequence[tuple[str | None, BaseException | None]],
    error: BaseException | None,
) -> None:
    """Put what became of a batch on its span, then end it: a count per outcome (``msgbus.batch.ack`` ...), the
    outcome itself when all messages share it, an exception event naming each message that failed alone, and
    the error status when the whole batch failed (a raise, or a malformed result)."""
    counts: dict[str, int] = {}
    for outcome, _ in outcomes:
        if outcome is not None:
            counts[outcome] = counts.get(outcome, 0) + 1
    for outcome, count in counts.items():
        span.set_attribute(f"msgbus.batch.{outcome}", count)
    if len(counts) == 1 and sum(counts.values()) == len(msgs):
        span.set_attribute(OUTCOME, next(iter(counts)))
    if error is not None:
        span.set_attribute("error.type", type(error).__name__)
        span.record_exception(error)
        span.set_status(StatusCode.ERROR, describe(error, 200))
    else:
        for msg, (_, exc) in zip(msgs, outcomes, strict=False):
            if exc is not None:
                span.record_exception(exc, {"messaging.message.id": msg.id})
    span.end()


def _error(base: dict[str, str | int], exc: BaseException) -> dict[str, str | int]:
    return {**base, "error.type": type(exc).__name__}


def _attributes(common: tuple[tuple[str, str | int], ...], endpoint: Endpoint, operation: str) -> dict[str, str | int]:
    attrs = {
        **dict(common),
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": endpoint.name,
    }
    if endpoint.subscription is not None:
        attrs["messaging.destination.subscription.name"] = endpoint.subscription
        attrs["messaging.consumer.group.name"] = endpoint.subscription
    if endpoint.dead_letter:  # reading what was dead-lettered from that destination
        attrs["msgbus.destination.dead_letter"] = True
    return attrs


class _Instruments:
    """The instruments of one meter provider, shared by every bus it measures (an instrument name is
    registered once per meter: a second bus's callbacks would be ignored)."""

    def __init__(self, meter_provider: Any) -> None:
        from . import __version__

        meter = meter_provider.get_meter("msgbus", __version__)
        self.attributes: dict[tuple[Any, ...], dict[str, str | int]] = {}
        # Counts are kept here and read by observable instruments when metrics are collected: per message that
        # is one dict update, where an SDK measurement hashes its attributes every time (~8 us each here).
        self.sent, self.consumed, self.retried, self.dead_lettered, self.in_flight = (_Count() for _ in range(5))
        meter.create_observable_counter(
            "messaging.client.sent.messages", [self.sent.observe], "{message}", "Messages sent."
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages", [self.consumed.observe], "{message}", "Messages handed to handlers."
        )
        meter.create_observable_counter(
            "msgbus.messages.retried", [self.retried.observe], "{message}", "Handler failures retried."
        )
        meter.create_observable_counter(
            "msgbus.messages.dead_lettered",
            [self.dead_lettered.observe],
            "{message}",
            "Handler failures that dead-lettered their message.",
        )
        meter.create_observable_up_down_counter(
            "msgbus.messages.in_flight", [self.in_flight.observe], "{message}", "Messages being handled now."
        )
        self.send_duration = meter.create_histogram(
            "messaging.client.operation.duration", "s", "Duration of send operations (one per send or batch)."
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration", "s", "Duration of handling one message, handler and middleware."
        )


_SHARED: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()  # buses may be made on several threads (msgbus.sync runs its own loop)


def _instruments(meter_provider: Any) -> _Instruments:
    with _SHARED_LOCK:
        instruments = _SHARED.get(meter_provider)
        if instruments is None:
            instruments = _SHARED[meter_provider] = _Instruments(meter_provider)
        return instruments


class _Count:
    """A count per attribute set (the telemetry's cached dicts, which live as long as it does)."""

    def __init__(self) -> None:
        self.by_attributes: dict[int, list[Any]] = {}  # id(attributes) -> [attributes, count]

    def add(self, attributes: dict[str, str | int], n: int = 1) -> None:
        entry = self.by_attributes.get(id(attributes))
        if entry is None:
            self.by_attributes[id(attributes)] = [attributes, n]
        else:
            entry[1] += n

    def observe(self, _options: Any) -> list[Observation]:
        """Called by the SDK's reader, maybe on its own thread: a snapshot of the counts."""
        return [Observation(count, attributes) for attributes, count in list(self.by_attributes.values())]


def _carrying(record: Record) -> Record:
    """``record`` with the current trace context in its headers (replacing any it had)."""
    headers = dict(record.headers)
    propagate.inject(headers)
    return Record(
        record.body, record.id, headers, record.key, record.correlation_id, record.content_type, record.timestamp
    )


def _extract(headers: Mapping[str, str]) -> Any:
    """The context a received message's headers carry; None (a new trace) when they hold none or garbage."""
    try:
        return propagate.extract(headers)
    except Exception:  # a third-party propagator choking on hostile headers must not stop the consumer
        return None
