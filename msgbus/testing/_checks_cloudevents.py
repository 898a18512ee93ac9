"""Check for the CloudEvents round trip (docs/cloudevents.md): events cross the broker in binary and structured
mode with every attribute and their data intact. Needs the CloudEvents SDK (in the dev extra; skips without it)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from msgbus import Message, _codec

from ._context import ContractContext, ContractSkip, Tally, ensure
from ._flow import drain, reached

__all__ = ["check_cloudevents_round_trip"]

WHEN = datetime(2026, 12, 4, 9, 30, 15, 123456, tzinfo=UTC)  # microseconds, to see them kept


def _events(run: str) -> list[Any]:
    """Events of each kind of data, with every optional attribute and extensions (strings: the bindings carry
    extension values as strings); some without a content type, and one with a content type but no data."""
    from msgbus.cloudevents import CloudEvent

    base = {"source": "https://example.com/orders?region=eu", "type": "com.example.order.placed.v1", "time": WHEN}
    schema = "https://example.com/schemas/order.json"
    return [
        CloudEvent(
            {
                **base,
                "id": f"{run}-json",
                "subject": "orders/7 ✓ ünïcødé",
                "datacontenttype": "application/json",
                "dataschema": schema,
                "tenant": "acme",
                "comexampleseq": "42",
            },
            {"order": 7, "items": ["é", 1.5, None], "ok": True},
        ),
        CloudEvent(
            {
                **base,
                "id": f"{run}-text",
                "subject": "  padded  ",
                "datacontenttype": "text/plain; charset=utf-8",
                "partitionkey": "customer-7",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            },
            "héllo\n  wörld  ",
        ),
        CloudEvent(
            {**base, "id": f"{run}-bytes", "datacontenttype": "application/octet-stream", "dataschema": schema},
            bytes(range(256)) * 2,
        ),
        CloudEvent({**base, "id": f"{run}-vnd", "datacontenttype": "application/vnd.example.bin"}, b"\x00\xff\r\n"),
        CloudEvent({**base, "id": f"{run}-untyped-json", "tenant": "acme"}, {"n": [1, "é"]}),
        CloudEvent({**base, "id": f"{run}-untyped-text"}, "plain ✓"),
        CloudEvent({**base, "id": f"{run}-untyped-bytes"}, bytes(range(256))),
        CloudEvent({**base, "id": f"{run}-none", "subject": "no data", "tenant": "acme"}, None),
        CloudEvent({**base, "id": f"{run}-none-typed", "datacontenttype": "application/json"}, None),
    ]


def _expected(event: Any, mode: str) -> dict[str, Any]:
    """The attributes received: all of them; in binary mode ``datacontenttype`` is the message's content type, so
    data without one gets the codec's for its type, and an event without data has none (docs/cloudevents.md)."""
    want = dict(event.get_attributes())
    data = event.get_data()
    if mode == "binary" and data is None:
        want.pop("datacontenttype", None)
    elif mode == "binary":
        want.setdefault("datacontenttype", _codec.encode(data)[1])
    return want


async def check_cloudevents_round_trip(ctx: ContractContext) -> None:
    """CloudEvents sent in binary mode (the broker's binding prefix and Kafka's ce_) and in structured mode, to a
    queue and through a topic, come back with every attribute, extension, key and their data bytes unchanged."""
    try:
        from msgbus.cloudevents import KAFKA_PREFIX, from_message, header_prefix, to_outgoing
    except ImportError:
        raise ContractSkip("the CloudEvents SDK is not installed (pip install 'msgbus[cloudevents]')") from None
    ways = list(dict.fromkeys([("binary", header_prefix(ctx.bus)), ("binary", KAFKA_PREFIX), ("structured", "")]))
    queue, topic, run = ctx.name("q"), ctx.name("t"), uuid.uuid4().hex[:8]
    subscriber = ctx.bus.subscriber(topic, subscription=ctx.name("s"))
    await subscriber.open()  # the subscription exists before the publish
    sent: dict[str, tuple[Any, str]] = {}  # message id -> (event, how it was sent)
    for mode, prefix in ways:
        how = f"{mode}{f' {prefix}' if prefix else ''}"
        for where in ("queue", "topic"):
            events = _events(f"{run}-{mode}{prefix}-{where}")
            out = [to_outgoing(e, mode=mode, prefix=prefix or KAFKA_PREFIX) for e in events]  # type: ignore[arg-type]
            if where == "queue":
                ids = await ctx.bus.producer(queue).send_many(out)
            else:
                ids = await ctx.bus.publisher(topic).publish_many(out)
            sent.update({i: (e, f"{how} via {where}") for i, e in zip(ids, events, strict=True)})
    problems: list[str] = []

    def compare(msg: Message[Any]) -> None:
        want, how = sent.get(msg.id, (None, "?"))
        if want is None:
            return
        try:
            got = from_message(msg)
        except Exception as exc:  # a broken header or body makes the event unreadable: that is the finding
            problems.append(f"{how} {want.get_id()}: unreadable: {type(exc).__name__}: {exc}")
            return
        attrs, want_attrs = got.get_attributes(), _expected(want, how.split()[0])
        for name in sorted(set(attrs) | set(want_attrs)):
            if attrs.get(name) != want_attrs.get(name):
                problems.append(f"{how} {want.get_id()}: {name} {attrs.get(name)!r} != sent {want_attrs.get(name)!r}")
        if got.get_data() != want.get_data() or type(got.get_data()) is not type(want.get_data()):
            problems.append(f"{how} {want.get_id()}: data {str(got.get_data())[:60]!r} != sent")
        if msg.key != want.get_extension("partitionkey"):
            problems.append(f"{how} {want.get_id()}: key {msg.key!r} != partitionkey")

    n = len(sent) // 2
    lines = []
    for what, consumer in (("queue", ctx.bus.consumer(queue, prefetch=n)), ("topic", subscriber)):
        tally = Tally()
        mine = {i for i, (_, how) in sent.items() if how.endswith(what)}
        await drain(ctx, consumer, tally, reached(tally, n), on_message=compare, what=f"CloudEvents from the {what}")
        lines.append(tally.ensure_exact(mine, f"via the {what}"))
    ensure(not problems, f"{'; '.join(lines)}; {len(problems)} differences, e.g. {'; '.join(problems[:3])}")
    ctx.note(
        f"{'; '.join(lines)}; {', '.join(m + (' ' + p if p else '') for m, p in ways)}: id, source, type, specversion,"
        " subject, time (µs), datacontenttype, dataschema, extensions, key and data bytes unchanged, of"
        f" {len(_events(''))} kinds of event"
    )
