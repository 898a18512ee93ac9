"""OpenTelemetry traces and metrics of sends and handled messages (optional: ``pip install msgbus[otel]``).

A bus resolves once, when it is created and again when it opens, whether OpenTelemetry is installed and a
tracer or meter provider is configured (``resolve``). When neither is, the bus holds ``None`` and the send
path and the consume loop do nothing more than test that. Names follow the OpenTelemetry messaging semantic
conventions; the trace context travels in the W3C ``traceparent`` / ``tracestate`` headers (the globally
configured propagator's), which any other OpenTelemetry-instrumented consumer reads.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from ._message import Message
from ._url import BusURL
from .adapter import Endpoint, Record

try:
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.trace import Link, SpanKind
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

    ``tracer_provider`` / ``meter_provider`` replace the global ones (``msgbus.instrument``).
    """
    if trace is None:
        return None
    tracer_provider = tracer_provider or trace.get_tracer_provider()
    meter_provider = meter_provider or metrics.get_meter_provider()
    if type(tracer_provider).__name__ in _UNSET and type(meter_provider).__name__ in _UNSET:
        return None
    return Telemetry(url, tracer_provider, meter_provider)


class Telemetry:
    """Spans and instruments of one bus. Only the host and port of its URL reach an attribute, never secrets."""

    def __init__(self, url: BusURL, tracer_provider: Any, meter_provider: Any) -> None:
        from . import __version__

        self.tracer = tracer_provider.get_tracer("msgbus", __version__)
        meter = meter_provider.get_meter("msgbus", __version__)
        self.common: dict[str, str | int] = {"messaging.system": SYSTEMS.get(url.scheme, url.scheme)}
        if url.host:
            self.common["server.address"] = url.host
        if url.port is not None:
            self.common["server.port"] = url.port
        self.sent = meter.create_counter("messaging.client.sent.messages", "{message}", "Messages sent.")
        self.send_duration = meter.create_histogram(
            "messaging.client.operation.duration", "s", "Duration of send operations (one per send or batch)."
        )
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages", "{message}", "Messages handed to handlers."
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration", "s", "Duration of handling one message, handler and middleware."
        )
        self.retried = meter.create_counter("msgbus.messages.retried", "{message}", "Handler failures retried.")
        self.dead_lettered = meter.create_counter(
            "msgbus.messages.dead_lettered", "{message}", "Handler failures that dead-lettered their message."
        )
        self.in_flight = meter.create_up_down_counter(
            "msgbus.messages.in_flight", "{message}", "Messages being handled now."
        )

    def attributes(self, endpoint: Endpoint, operation: str) -> dict[str, str | int]:
        """The attributes every span and measurement of ``operation`` on ``endpoint`` carries."""
        attrs = {
            **self.common,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": endpoint.name,
        }
        if endpoint.subscription is not None:
            attrs["messaging.destination.subscription.name"] = endpoint.subscription
            attrs["messaging.consumer.group.name"] = endpoint.subscription
        return attrs

    async def send(self, endpoint: Endpoint, records: Sequence[Record], store: Store, *, batch: bool) -> None:
        """``store(records)`` under a producer span whose context each record carries in its headers.

        A batch gets one "create" span per message (its context goes in that message) and one "send" span
        that links to them all, as the conventions ask.
        """
        base = self.attributes(endpoint, "send")
        if batch:
            records, links = self._created(endpoint, records)
            attrs = {**base, "messaging.batch.message_count": len(records)}
            kind = SpanKind.CLIENT
        else:
            links = []
            attrs = {**base, "messaging.message.id": records[0].id}
            if records[0].correlation_id is not None:
                attrs["messaging.message.conversation_id"] = records[0].correlation_id
            kind = SpanKind.PRODUCER
        start = time.perf_counter()
        with self.tracer.start_as_current_span(f"send {endpoint.name}", kind=kind, attributes=attrs, links=links):
            if not batch:
                records = [_carrying(records[0])]
            try:
                await store(records)
            except BaseException as exc:
                self.send_duration.record(time.perf_counter() - start, {**base, "error.type": type(exc).__name__})
                raise
        self.send_duration.record(time.perf_counter() - start, base)
        self.sent.add(len(records), base)

    def _created(self, endpoint: Endpoint, records: Sequence[Record]) -> tuple[list[Record], list[Link]]:
        attrs = self.attributes(endpoint, "create")
        out, links = [], []
        for record in records:
            span = self.tracer.start_span(
                f"create {endpoint.name}",
                kind=SpanKind.PRODUCER,
                attributes={**attrs, "messaging.message.id": record.id},
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
        tracer = self.tracer

        async def traced(msg: Message[Any]) -> None:
            parent = _extract(msg)
            attrs = {**base, "messaging.message.id": msg.id, ATTEMPT: msg.attempt}
            self.consumed.add(1, base)
            self.in_flight.add(1, base)
            start = time.perf_counter()
            outcome: str | None = None
            error: str | None = None
            try:
                with tracer.start_as_current_span(
                    name, context=parent, kind=SpanKind.CONSUMER, attributes=attrs
                ) as span:
                    try:
                        was_settled = msg.settled
                        await handler(msg)
                    except Exception as exc:
                        error = type(exc).__name__
                        if not was_settled and not msg.settled:
                            outcome = "dead_letter" if msg.attempt >= max_attempts else "retry"
                        span.set_attribute("error.type", error)
                        if outcome is not None:
                            span.set_attribute(OUTCOME, outcome)
                        raise
                    if not msg.settled:
                        outcome = "ack"
                        span.set_attribute(OUTCOME, outcome)
            finally:
                measured = base if error is None else {**base, "error.type": error}
                self.process_duration.record(time.perf_counter() - start, measured)
                self.in_flight.add(-1, base)
                if outcome == "retry":
                    self.retried.add(1, base)
                elif outcome == "dead_letter":
                    self.dead_lettered.add(1, base)

        return traced


def _carrying(record: Record) -> Record:
    """``record`` with the current trace context in its headers (replacing any it had)."""
    headers = dict(record.headers)
    propagate.inject(headers)
    return replace(record, headers=headers)


def _extract(msg: Message[Any]) -> Any:
    """The context a received message carries; None (a new trace) when its headers hold none or garbage."""
    try:
        return propagate.extract(msg.headers)
    except Exception:  # a third-party propagator choking on hostile headers must not stop the consumer
        return None
