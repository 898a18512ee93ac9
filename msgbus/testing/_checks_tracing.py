"""Check for promise 15 (observability): the W3C trace context crosses the broker, through retries, dead-lettering
(by a handler's failure, or of an undecodable message no handler saw) and ``receive()``. Needs the OpenTelemetry
SDK (a test dependency; the check skips without it)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import msgbus
from msgbus import Message

from ._context import ContractContext, ContractSkip, Tally, ensure, examples
from ._flow import drain, reached, stop_run

__all__ = ["check_trace_context_survives"]

Spans = list[Any]  # opentelemetry.sdk.trace.ReadableSpan


def _sdk() -> tuple[Any, Any]:
    """A tracer provider of its own (the check never touches the global one) and its in-memory exporter."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        raise ContractSkip("opentelemetry-sdk is not installed (pip install msgbus[otel] opentelemetry-sdk)") from None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def check_trace_context_survives(ctx: ContractContext) -> None:
    """A handler's span has the sender's span as parent: after send and send_many, on a retry, on the
    dead-lettered copy (its headers keep the traceparent) read with receive() and with run(), through a topic,
    and on the span of an undecodable message dead-lettered before any handler (outcome dead_letter)."""
    provider, exporter = _sdk()
    m = ctx.scale(10, 3)
    ctx.bus.instrument(tracer_provider=provider)
    tracer = provider.get_tracer("msgbus-contract")
    queue, topic, sub, unreadable = ctx.name("q"), ctx.name("t"), ctx.name("s"), ctx.name("u")
    subscriber = ctx.bus.subscriber(topic, subscription=sub)
    await subscriber.open()  # the subscription exists before the publish
    producer = ctx.bus.producer(queue)
    with tracer.start_as_current_span("contract-request") as root:
        ok = [await producer.send({"do": "ack", "i": i}) for i in range(m)]
        flaky = [await producer.send({"do": "fail-once", "i": i}) for i in range(m)]
        doomed = [await producer.send({"do": "fail", "i": i}) for i in range(m)]
        batched = await producer.send_many([{"do": "ack", "i": i} for i in range(m)])
        published = await ctx.bus.publisher(topic).publish_many([{"do": "ack", "i": i} for i in range(m)])
        undecodable = [
            await ctx.bus.producer(unreadable).send(b"{not json", content_type="application/json") for _ in range(m)
        ]
    trace_id = root.get_span_context().trace_id
    senders = _senders(exporter.get_finished_spans())
    expected = {*ok, *flaky, *doomed, *batched, *published, *undecodable}
    missing = expected - set(senders)
    ensure(not missing, f"no send/create span carries the message id of e.g. {examples(missing)}")

    handled = Tally()
    policy = msgbus.RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.05)

    async def handler(msg: Message[Any]) -> None:
        handled.add(msg.id)
        if msg.body["do"] == "fail" or (msg.body["do"] == "fail-once" and msg.attempt == 1):
            raise RuntimeError(f"contract trace boom {msg.id}")

    consumer = ctx.bus.consumer(queue)
    task = ctx.background(consumer.run(handler, concurrency=4, retry=policy), "traced-run")
    sub_task = ctx.background(subscriber.run(handler, concurrency=4, retry=policy), "traced-subscriber")
    unreadable_consumer = ctx.bus.consumer(unreadable)
    unreadable_task = ctx.background(unreadable_consumer.run(handler, retry=policy), "traced-undecodable")
    want = len(ok) + 2 * len(flaky) + 2 * len(doomed) + len(batched) + len(published)
    ctx.waiting = lambda: f"handling ({handled.total} of {want} deliveries)"
    await handled.wait_until(lambda: handled.total >= want)

    dead = Tally()
    carried: dict[str, str] = {}
    dead_letters = ctx.bus.dead_letters(queue)
    got = await drain(ctx, dead_letters, dead, reached(dead, len(doomed)), settle=False, what="dead letters")
    for msg in got:
        carried[msg.id] = msg.headers.get("traceparent", "")
        await msg.nack()  # handled again below, by run(), to see its span
    line = dead.ensure_exact(set(doomed), "always failing, dead-lettered")
    wrong = {i: tp for i, tp in carried.items() if tp.split("-")[1:3] != _ids(senders[i])}
    ensure(not wrong, f"the dead-lettered copy lost its traceparent, e.g. {list(wrong.items())[:2]}")
    again = Tally()

    async def dead_handler(msg: Message[Any]) -> None:
        again.add(msg.id)

    dl_task = ctx.background(dead_letters.run(dead_handler), "traced-dead-letters")
    ctx.waiting = lambda: f"handling dead letters ({again.distinct} of {len(doomed)})"
    await again.wait_distinct(len(doomed))
    unreadable_dead = Tally()  # read with receive() and acked: a span each, in the trace too
    wanted = reached(unreadable_dead, len(undecodable))
    await drain(ctx, ctx.bus.dead_letters(unreadable), unreadable_dead, wanted, what="undecodable dead letters")
    line_undecodable = unreadable_dead.ensure_exact(set(undecodable), "undecodable, dead-lettered")
    runs = ((consumer, task), (subscriber, sub_task), (dead_letters, dl_task), (unreadable_consumer, unreadable_task))
    for consumer_, task_ in runs:
        await stop_run(consumer_, task_)
    await asyncio.sleep(0)

    processed: dict[str, Spans] = defaultdict(list)
    for span in exporter.get_finished_spans():
        if span.name.startswith("process "):
            processed[span.attributes["messaging.message.id"]].append(span)
    problems = []
    for msg_id in expected:
        spans = processed.get(msg_id, [])
        want = 2 if msg_id in flaky or msg_id in doomed or msg_id in undecodable else 1
        want += 2 * (msg_id in carried)  # its dead letter read with receive() and nacked, then handled by run()
        if len(spans) != want:
            problems.append(f"{msg_id}: {len(spans)} process spans, expected {want}")
        for span in spans:
            parent = span.parent
            if span.context.trace_id != trace_id or parent is None or parent.span_id != senders[msg_id].span_id:
                got_parent = None if parent is None else f"{parent.span_id:016x}"
                problems.append(
                    f"{msg_id} attempt {span.attributes.get('msgbus.message.attempt')}: parent {got_parent}, "
                    f"expected the sender's {senders[msg_id].span_id:016x} in trace {trace_id:032x}"
                )
    ensure(not problems, f"{len(problems)} process spans lost the trace context: {'; '.join(problems[:3])}")
    outcomes = {i: _outcomes(processed[i]) for i in doomed}
    bad = {i: o for i, o in outcomes.items() if o != (["retry", "dead_letter"], ["ack", "retry"])}
    ensure(
        not bad,
        "outcomes of always-failing messages should be retry, dead_letter, then on the dead letter ack (run) and "
        f"retry (receive + nack); e.g. {list(bad.items())[:2]}",
    )
    unhandled = {i: _outcomes(processed[i]) for i in undecodable}
    bad = {i: o for i, o in unhandled.items() if o != (["dead_letter"], ["ack"])}
    ensure(not bad, f"undecodable messages' spans should have outcome dead_letter; e.g. {list(bad.items())[:2]}")
    events = [e for i in undecodable for s in processed[i] for e in s.events if e.name == "msgbus.dead_letter"]
    reasons = [str(e.attributes.get("msgbus.dead_letter.reason", "")) for e in events]
    ensure(
        len(events) == len(undecodable) and all(r.startswith("DecodeError") for r in reasons),
        f"undecodable messages' spans should carry the reason in a msgbus.dead_letter event; got {reasons[:2]}",
    )
    ctx.note(
        f"{len(expected)} sent under one span; {sum(map(len, processed.values()))} process spans, each a child of "
        f"its message's send/create span (retries, dead letters and undecodable ones included); {line}, "
        f"traceparent kept; {line_undecodable}, each with a dead_letter span"
    )


def _outcomes(spans: Spans) -> tuple[list[str], list[str]]:
    """The outcomes of a message's spans on its destination, in the order they ended, and on its dead-letter
    destination, sorted (read by receive() and by run() at once)."""
    ended = sorted(spans, key=lambda s: s.end_time)
    here = [str(s.attributes.get("msgbus.message.outcome")) for s in ended if not _on_dead_letters(s)]
    dead = sorted(str(s.attributes.get("msgbus.message.outcome")) for s in spans if _on_dead_letters(s))
    return here, dead


def _on_dead_letters(span: Any) -> bool:
    return bool(span.attributes.get("msgbus.destination.dead_letter"))


def _senders(spans: Spans) -> dict[str, Any]:
    """Message id -> the span whose context the message carries: its single "send" span or batch "create" span."""
    out = {}
    for span in spans:
        msg_id = (span.attributes or {}).get("messaging.message.id")
        if msg_id is not None and (span.name.startswith("send ") or span.name.startswith("create ")):
            out[msg_id] = span.context
    return out


def _ids(context: Any) -> list[str]:
    """The trace id and span id of ``context`` as a W3C traceparent writes them."""
    return [f"{context.trace_id:032x}", f"{context.span_id:016x}"]
