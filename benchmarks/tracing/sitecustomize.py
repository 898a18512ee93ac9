"""Tracing and metrics switched on in every Python process started with this folder on ``PYTHONPATH``.

For measuring what telemetry costs (docs/benchmarks.md, "Tracing overhead"): ``msgbus bench`` runs some
workloads in child processes, which a provider set up in the parent would not reach. The SDK's real batch
span processor and a periodic-free in-memory metric reader do the work an application's would; the spans
are then dropped, so no exporter I/O is measured.

    PYTHONPATH=benchmarks/tracing MSGBUS_BENCH_OTEL=1 msgbus bench memory://
"""

import os

if os.environ.get("MSGBUS_BENCH_OTEL") == "1":
    from collections.abc import Sequence

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class _Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    _provider = TracerProvider()
    _provider.add_span_processor(BatchSpanProcessor(_Drop()))
    trace.set_tracer_provider(_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
