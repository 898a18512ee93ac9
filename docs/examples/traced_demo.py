"""``msgbus demo`` with OpenTelemetry switched on: prints the demo's traces as trees (docs/observability.md).

    pip install "msgbus[otel]" opentelemetry-sdk
    python docs/examples/traced_demo.py

The providers are configured before the bus opens, as in any application: msgbus picks up the global ones.
A real service would export to a collector (OTLP) instead of keeping spans in memory.
"""

from __future__ import annotations

from collections import defaultdict

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import msgbus.cli

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

SHOWN = ("msgbus.message.attempt", "msgbus.message.outcome", "error.type", "messaging.batch.message_count")


def show(span: ReadableSpan, children: dict[int, list[ReadableSpan]], depth: int = 0) -> None:
    attrs = span.attributes or {}
    extra = " ".join(f"{k.split('.')[-1]}={attrs[k]}" for k in SHOWN if k in attrs)
    sub = attrs.get("messaging.destination.subscription.name")
    where = f" [{sub}]" if sub else ""
    where += " [dead letters]" if attrs.get("msgbus.destination.dead_letter") else ""
    links = f" links={len(span.links)}" if span.links else ""
    print(f"{'  ' * depth}{span.name}{where} ({span.kind.name.lower()}) {extra}{links}".rstrip())
    for child in sorted(children[span.context.span_id], key=lambda s: s.start_time or 0):
        show(child, children, depth + 1)


def main() -> int:
    status = msgbus.cli.main(["demo", "--orders", "20", "--workers", "4", "--quiet"])
    finished = spans.get_finished_spans()
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    roots = []
    for span in finished:
        (children[span.parent.span_id] if span.parent else roots).append(span)
    print(
        f"\n{len(finished)} spans in {len(roots)} traces; the batch send, then an order retried once, "
        "then one dead-lettered:"
    )
    outcomes: dict[int, set[object]] = defaultdict(set)  # trace id -> the outcomes of its process spans
    for span in finished:
        if "msgbus.message.outcome" in (span.attributes or {}):
            outcomes[span.context.trace_id].add((span.attributes or {})["msgbus.message.outcome"])
    batch = [r for r in roots if r.name.startswith("send ")][:1]
    retried = [r for r in roots if outcomes[r.context.trace_id] == {"retry", "ack"}][:1]
    dead = [r for r in roots if "dead_letter" in outcomes[r.context.trace_id]][:1]
    for root in batch + retried + dead:
        show(root, children)
    data = reader.get_metrics_data()
    print("\nmetrics:")
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    attrs = point.attributes or {}
                    value = getattr(point, "value", None)
                    shown = value if value is not None else f"count={point.count} sum={point.sum:.3f}s"  # type: ignore[attr-defined]
                    dest = attrs.get("messaging.destination.name")
                    sub = attrs.get("messaging.destination.subscription.name")
                    dead = " (dead letters)" if attrs.get("msgbus.destination.dead_letter") else ""
                    print(f"  {metric.name} {dest}{'/' + str(sub) if sub else ''}{dead}: {shown}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
