"""What telemetry costs per message on memory://, in CPU microseconds (docs/benchmarks.md, "Tracing overhead").

    python -m benchmarks.tracing.cost [--rounds 5]
    PYTHONPATH=/path/to/other/checkout python -m benchmarks.tracing.cost --modes off   # the same, other code

Each mode runs in a process of its own (OpenTelemetry's global providers are set once per process), the modes
interleaved round by round; CPU time (``time.process_time``) moves far less with the machine's load than
throughput does. Modes: ``off`` (nothing configured), ``trace`` (an SDK tracer provider with the batch span
processor and an exporter that drops), ``metrics`` (an SDK meter provider with an in-memory reader), ``on``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

SENDS = 10_000
HANDLED = 10_000


def _configure(mode: str) -> None:
    if mode == "off":
        return
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    if mode in ("trace", "on"):
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=100_000))
        trace.set_tracer_provider(provider)
    if mode in ("metrics", "on"):
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


async def _measure() -> dict[str, float]:
    import msgbus

    async with msgbus.connect(f"memory://cost-{uuid.uuid4().hex[:8]}") as bus:
        producer = bus.producer("q")
        for _ in range(500):  # warm-up
            await producer.send(b"x")
        cpu = time.process_time()
        for _ in range(SENDS):
            await producer.send(b"x")
        send = (time.process_time() - cpu) / SENDS * 1e6
        consumer = bus.consumer("q")
        handled = 0

        async def handler(_msg: Any) -> None:
            nonlocal handled
            handled += 1
            if handled == SENDS + 500:
                consumer.stop()

        cpu = time.process_time()
        await consumer.run(handler, concurrency=16)
        consume = (time.process_time() - cpu) / handled * 1e6
    return {"send": send, "handle": consume}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["off", "trace", "metrics", "on"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _configure(args.child)
        print(json.dumps(asyncio.run(_measure())))
        return 0
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.tracing.cost", "--child", mode],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"| mode | CPU us per send | CPU us per handled message | (median of {args.rounds}) |")
    print("|---|---|---|---|")
    for mode, results in runs.items():
        send = statistics.median(r["send"] for r in results)
        handle = statistics.median(r["handle"] for r in results)
        print(f"| {mode} | {send:.1f} | {handle:.1f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
