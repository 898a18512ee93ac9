"""Checks for promises 7-9 and 12: headers and ids, batches, delayed delivery, undecodable and bad input."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import msgbus
from msgbus import Message, Outgoing, RetryPolicy
from msgbus.adapter import MAX_DEAD_LETTER_REASON, TIMESTAMP_LIMIT, Endpoint, Record
from msgbus.errors import (
    AdapterNotInstalled,
    CapabilityMissing,
    ConfigError,
    InvalidMessage,
    MessageTooLarge,
    MsgbusError,
)

from ._context import ContractContext, Tally, ensure, fail
from ._flow import (
    SENTINEL_HEADER,
    chunked,
    drain,
    expect_only_sentinel,
    expect_only_sentinels,
    expect_raises,
    nothing_comes_back,
    quiet_then_sentinel,
    reached,
    sentinel_sender,
    stop_run,
)

__all__ = [
    "ContractOrder",
    "check_bad_input",
    "check_batches",
    "check_delayed_delivery",
    "check_headers_round_trip",
    "check_undecodable_dead_lettered",
]

TS_SLACK = 0.002  # seconds: backends may store timestamps in milliseconds


async def check_headers_round_trip(ctx: ContractContext) -> None:
    """Headers (unicode, empty, long), id, correlation id, content type, key and timestamp arrive unchanged."""
    m = ctx.scale(50, 10)
    limit = ctx.caps.max_message_size
    long_len = 2000 if limit is None else max(16, min(2000, limit // 16))
    base = {
        "plain": "value",
        "ünïcødé-名前": "значение ✓ 🚀 ☃",
        "empty": "",
        "long": "x" * long_len,
        "spaces": "  padded  value  ",
        "punctuation": "a=b; c,d \"q\" 'q' \\ / ? & #",
        "Mixed-Case": "MiXeD",
        **{f"h{j:02d}": f"v{j}" for j in range(20)},
    }
    queue, run_id = ctx.name(), uuid.uuid4().hex[:8]
    producer = ctx.bus.producer(queue)
    expected: dict[str, Outgoing] = {}
    t_before = time.time()
    batch: list[Outgoing] = []
    for i in range(m):
        body: object = f"payload-{i}".encode() if i % 2 else {"i": i, "text": "✓"}
        ctype = "application/x-contract" if i % 2 else "application/vnd.contract+json"
        item = Outgoing(
            body,
            key=f"kéy-{i}",
            headers={**base, "seq": str(i)},
            message_id=f"ct-id-{run_id}-{i}",
            correlation_id=f"corr-{i}",
            content_type=ctype,
        )
        expected[item.message_id or ""] = item
        if i < m // 2:
            got = await producer.send(
                item.body,
                key=item.key,
                headers=item.headers,
                message_id=item.message_id,
                correlation_id=item.correlation_id,
                content_type=item.content_type,
            )
            ensure(got == item.message_id, f"send(message_id={item.message_id!r}) returned {got!r}")
        else:
            batch.append(item)
    got_ids = await producer.send_many(batch)
    ensure(got_ids == [b.message_id for b in batch], f"send_many returned {got_ids[:2]}..., not the given ids")
    t_after = time.time()
    consumer = ctx.bus.consumer(queue, prefetch=m)
    problems: list[str] = []
    first_ts: dict[str, float] = {}

    def compare(msg: Message[Any]) -> None:
        want = expected[msg.id]
        for field, value, original in (
            ("body", msg.body, want.body),
            ("headers", _sent_headers(msg), want.headers),
            ("key", msg.key, want.key),
            ("correlation_id", msg.correlation_id, want.correlation_id),
            ("content_type", msg.content_type, want.content_type),
        ):
            if value != original:
                problems.append(f"{msg.id} #{msg.attempt}: {field} {str(value)[:80]!r} != sent {str(original)[:80]!r}")
        ts = first_ts.setdefault(msg.id, msg.timestamp)
        if not t_before - TS_SLACK <= msg.timestamp <= t_after + TS_SLACK or msg.timestamp != ts:
            problems.append(f"{msg.id}: timestamp {msg.timestamp} outside the send window or changed on redelivery")

    for attempt in (1, 2):
        tally = Tally()
        received = await drain(ctx, consumer, tally, reached(tally, m), settle=False, on_message=compare)
        tally.ensure_exact(set(expected), f"round {attempt}")
        for msg in received:
            if msg.attempt != attempt:
                problems.append(f"{msg.id}: attempt {msg.attempt}, expected {attempt}")
            await (msg.nack() if attempt == 1 else msg.ack())
    ensure(not problems, f"{len(problems)} differences, e.g. {'; '.join(problems[:3])}")
    await _check_published_headers(ctx, base)
    ctx.note(
        f"{m} messages x {len(base) + 1} headers (unicode, empty, {long_len}-char) plus id, correlation id, content "
        "type, key, timestamp: unchanged on first delivery, after a nack (same id), and through a topic"
    )


# Headers a configured OpenTelemetry propagator adds to every send (docs/observability.md): a contract run in a
# process that set a global tracer provider carries them, so the round trip compares the others.
_PROPAGATION = frozenset({"traceparent", "tracestate", "baggage"})


def _sent_headers(msg: Message[Any]) -> dict[str, str]:
    return {k: v for k, v in msg.headers.items() if k not in _PROPAGATION}


async def _check_published_headers(ctx: ContractContext, headers: dict[str, str]) -> None:
    topic = ctx.name("t")
    sub = ctx.bus.subscriber(topic, subscription=ctx.name("s"))
    await sub.open()
    msg_id = await ctx.bus.publisher(topic).publish(
        b"published", headers=headers, key="k", correlation_id="c", content_type="application/x-contract"
    )
    tally = Tally()
    (msg,) = await drain(ctx, sub, tally, lambda: tally.distinct >= 1, what="the published message")
    sent = (msg_id, b"published", headers, "k", "c", "application/x-contract")
    got = (msg.id, msg.body, _sent_headers(msg), msg.key, msg.correlation_id, msg.content_type)
    ensure(got == sent, f"published message changed: {str(got)[:200]} != {str(sent)[:200]}")


async def check_batches(ctx: ContractContext) -> None:
    """send_many / publish_many take large batches; receive(max_messages) returns several per call; exact counts."""
    n = ctx.scale(2000, 200)
    ensure(await ctx.bus.producer(ctx.name()).send_many([]) == [], "send_many([]) must return []")
    notes: list[str] = []
    fresh: list[Callable[[msgbus.Bus], msgbus.Consumer[Any]]] = []
    senders: list[msgbus.Producer | msgbus.Publisher] = []
    for kind in ("queue", "topic"):
        name, sub = ctx.name(kind[0]), ctx.name("s")
        if kind == "queue":
            consumer: msgbus.Consumer[Any] = ctx.bus.consumer(name, prefetch=250)
            sender: msgbus.Producer | msgbus.Publisher = ctx.bus.producer(name)
            fresh.append(partial(_queue_consumer, name))
            ids = await ctx.bus.producer(name).send_many([{"i": i} for i in range(n)])
        else:
            consumer = ctx.bus.subscriber(name, subscription=sub, prefetch=250)
            fresh.append(partial(_subscriber, name, sub))
            await consumer.open()
            sender = ctx.bus.publisher(name)
            ids = await ctx.bus.publisher(name).publish_many([{"i": i} for i in range(n)])
        ensure(len(ids) == len(set(ids)) == n, f"{kind}: a batch of {n} returned {len(set(ids))} distinct ids")
        tally, sizes = Tally(), list[int]()
        await drain(ctx, consumer, tally, reached(tally, n), batch_sizes=sizes, max_messages=100)
        line = tally.ensure_exact(set(ids), f"{kind}: one batch of {n}")
        ensure(max(sizes) <= 100, f"{kind}: receive(max_messages=100) returned {max(sizes)} messages")
        ensure(max(sizes) > 1, f"{kind}: receive(max_messages=100) never returned more than one message")
        quiet = await expect_only_sentinel(ctx, consumer, sentinel_sender(sender), ctx.quiet, "after the batch")
        notes.append(f"{line}; {len(sizes)} receive calls, up to {max(sizes)} (mean {n / len(sizes):.0f}); {quiet}")
        drained = time.monotonic()
        await consumer.close()
        senders.append(sender)
    # Past the lock, fresh consumers of both: an ack that was lost comes back here.
    bus = await ctx.open_bus()
    groups = [(sentinel_sender(s), [make(bus)]) for s, make in zip(senders, fresh, strict=True)]
    notes.append(await expect_only_sentinels(ctx, groups, ctx.lock_window_after(drained), "fresh consumers"))
    for note in notes:
        ctx.note(note)


def _queue_consumer(queue: str, bus: msgbus.Bus) -> msgbus.Consumer[Any]:
    return bus.consumer(queue)


def _subscriber(topic: str, subscription: str, bus: msgbus.Bus) -> msgbus.Consumer[Any]:
    return bus.subscriber(topic, subscription=subscription)


async def check_delayed_delivery(ctx: ContractContext) -> None:
    """send(delay=d) is not received before d has passed (monotonic time at send) and is received after."""
    delay, m = (1.0 if ctx.quick else 1.5), ctx.scale(20, 5)
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    consumer = ctx.bus.consumer(queue, prefetch=100)
    await consumer.open()
    sent_at: dict[str, float] = {}
    immediate = set(await producer.send_many([{"now": i} for i in range(m)]))
    t0 = time.monotonic()
    for msg_id in await producer.send_many([{"later": i} for i in range(m)], delay=delay):
        sent_at[msg_id] = t0
    t1 = time.monotonic()
    sent_at[await producer.send(b"timedelta", delay=timedelta(seconds=delay))] = t1
    received_at: dict[str, float] = {}

    def stamp(msg: Message[Any]) -> None:
        received_at.setdefault(msg.id, time.monotonic())

    tally = Tally()
    await drain(ctx, consumer, tally, lambda: tally.distinct >= 2 * m + 1, on_message=stamp)
    line = tally.ensure_exact(immediate | set(sent_at), f"{m} immediate + {m + 1} delayed {delay}s")
    early = {i: received_at[i] - t for i, t in sent_at.items() if received_at[i] < t + delay - 0.05}
    ensure(not early, f"{len(early)} delayed messages arrived early, e.g. after {min(early.values(), default=0):.2f}s")
    late_first = [i for i in immediate if received_at[i] > min(received_at[j] for j in sent_at)]
    ensure(not late_first, f"{len(late_first)} undelayed messages arrived after a delayed one")
    notes = [line, f"none of the delayed arrived before {delay}s"]
    notes.append(await expect_raises(producer.send(b"x", delay=-1), InvalidMessage, "delay=-1"))
    max_delay = ctx.caps.max_delay
    if max_delay is not None:
        too_long = producer.send(b"x", delay=max_delay + 1)
        notes.append(await expect_raises(too_long, InvalidMessage, f"delay {max_delay + 1}s > max_delay"))
    notes.append(await expect_only_sentinel(ctx, consumer, sentinel_sender(producer), ctx.quiet, "after"))
    ctx.note("; ".join(notes))


@dataclass(frozen=True)
class ContractOrder:
    """The typed payload of the undecodable-payload check."""

    id: int
    name: str


async def check_undecodable_dead_lettered(ctx: ContractContext) -> None:
    """With model=..., invalid JSON and wrong shapes are dead-lettered with a decode reason; the loop goes on."""
    good_n, per_kind = ctx.scale(300, 30), ctx.scale(15, 3)
    bad_kinds: dict[str, tuple[object, str | None]] = {
        "invalid-json": (b"{not json", "application/json"),
        "not-utf8": (b"\xff\xfe{", "application/json"),
        "array": ([1, 2, 3], None),
        "missing-field": ({"name": "no id"}, None),
    }
    items: list[Outgoing] = []
    for i in range(good_n):
        items.append(Outgoing({"id": i, "name": f"order-{i}"}))
        kind = list(bad_kinds)[i % len(bad_kinds)]
        if i < per_kind * len(bad_kinds):
            body, ctype = bad_kinds[kind]
            items.append(Outgoing(body, content_type=ctype, headers={"contract-bad": kind}))
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    sent: dict[str, Outgoing] = {}
    for chunk in chunked(items, 200):
        sent.update(zip(await producer.send_many(chunk), chunk, strict=True))
    good = {i for i, o in sent.items() if not o.headers}
    bad = set(sent) - good
    tally, wrong_type = Tally(), list[str]()

    async def handle(msg: Message[ContractOrder]) -> None:
        if not isinstance(msg.body, ContractOrder):
            wrong_type.append(f"{msg.id}: {type(msg.body).__name__}")
        tally.add(msg.id)

    consumer = ctx.bus.consumer(queue, model=ContractOrder)
    task = ctx.background(consumer.run(handle, concurrency=4))
    dead, problems = Tally(), list[str]()

    def inspect(msg: Message[Any]) -> None:
        want = sent.get(msg.id)
        if want is None:
            return
        reason = msg.headers.get(msgbus.HEADER_DEAD_LETTER_REASON, "")
        if "decode" not in reason.lower():
            problems.append(f"{msg.id}: reason {reason!r} does not name the decode failure")
        original = want.body if isinstance(want.body, bytes) else None
        if original is not None and msg.payload != original:
            problems.append(f"{msg.id}: payload {msg.payload!r} != sent {original!r}")
        if original is None and json.loads(msg.payload) != want.body:
            problems.append(f"{msg.id}: payload {msg.payload!r} does not decode to the sent {want.body!r}")
        if msg.headers.get("contract-bad") != (want.headers or {}).get("contract-bad"):
            problems.append(f"{msg.id}: original headers lost: {dict(msg.headers)}")

    dlq = ctx.bus.dead_letters(queue)  # must hand undecodable payloads out raw, not dead-letter them again
    await drain(ctx, dlq, dead, lambda: dead.distinct >= len(bad), on_message=inspect, what="dead letters")
    await tally.wait_distinct(len(good))
    line_bad = dead.ensure_exact(bad, "undecodable, dead-lettered")
    line_good = tally.ensure_exact(good, "valid, handled")
    ensure(not problems, f"{line_bad}; {len(problems)} dead letters wrong, e.g. {'; '.join(problems[:3])}")
    ensure(not wrong_type, f"the handler got non-model bodies: {wrong_type[:3]}")
    ensure(not task.done(), f"run() ended after undecodable messages: {task}")
    more = set(await producer.send_many([{"id": i, "name": "after"} for i in range(per_kind)]))
    await tally.wait_until(lambda: more <= set(tally.counts))

    async def valid_sentinel() -> str:
        return await producer.send({"id": -1, "name": "sentinel"}, headers={SENTINEL_HEADER: "1"})

    quiet = await quiet_then_sentinel(ctx, tally, valid_sentinel, ctx.quiet, "handler")
    handled = time.monotonic()
    await stop_run(consumer, task)
    await consumer.close()
    send = sentinel_sender(producer)
    quiet += "; " + await nothing_comes_back(ctx, lambda bus: bus.consumer(queue), send, ctx.lock_window_after(handled))
    ctx.note(f"{line_good}; {line_bad} ({', '.join(bad_kinds)}), decode reason, payload intact")
    ctx.note(f"the loop went on: {len(more)} more handled afterwards; {quiet}")
    await _check_bad_in_a_batch(ctx)


# Private fields adapters keep in headers or properties (``x-msgbus-`` names), given garbage through the adapter
# interface itself, as a foreign producer on the same broker could: each message must be delivered with sound
# metadata or dead-lettered, never stop a receive nor strand the batch it came in.
_DAMAGED_METADATA: dict[str, dict[str, str]] = {
    "timestamp-text": {"x-msgbus-timestamp": "not-a-time"},
    "timestamp-nan": {"x-msgbus-timestamp": "nan"},
    "timestamp-huge": {"x-msgbus-timestamp": "1e300"},
    "prior-attempts": {"x-msgbus-prior-attempts": "zz"},
    "overflow": {"x-msgbus-overflow": "999999999"},
    "empty-marks": {"x-msgbus-empty": "id,cid,ct"},
    "attempts": {"x-msgbus-attempts": "-3"},
}


def _wrong_types(run_id: str, now: float) -> dict[str, Record]:
    """Records whose fields have the wrong types (past the type checker): ``Adapter.send`` must refuse each
    with a msgbus error, or store it so that it is delivered with sound metadata or dead-lettered."""
    bad: Any = 5

    def body(tag: str) -> bytes:
        return _injected_body(run_id, tag)

    return {
        "content-type-int": Record(body("content-type-int"), f"ct-wt-{run_id}-1", content_type=bad, timestamp=now),
        "header-value-int": Record(body("header-value-int"), f"ct-wt-{run_id}-2", {"h": bad}, timestamp=now),
        "key-bytes": Record(body("key-bytes"), f"ct-wt-{run_id}-3", key=b"k", timestamp=now),  # type: ignore[arg-type]
        "body-str": Record("text", f"ct-wt-{run_id}-4", timestamp=now),  # type: ignore[arg-type]
        "timestamp-nan": Record(body("timestamp-nan"), f"ct-wt-{run_id}-5", timestamp=float("nan")),
        "id-int": Record(body("id-int"), bad, timestamp=now),
        "lone-surrogate": Record(body("lone-surrogate"), f"ct-wt-{run_id}-7", {"h": "\udc80"}, timestamp=now),
    }


def _injected_body(run_id: str, tag: str) -> bytes:
    return json.dumps({"id": 0, "name": f"inject-{run_id}-{tag}"}).encode()


def _injected_tag(payload: bytes, run_id: str) -> str | None:
    """The tag of a message injected by this run, read from its raw payload (ids may not survive damage)."""
    try:
        name = json.loads(payload).get("name", "")
    except (ValueError, AttributeError, RecursionError):
        return None
    prefix = f"inject-{run_id}-"
    return name[len(prefix) :] if isinstance(name, str) and name.startswith(prefix) else None


def _deep_json(limit: int | None) -> bytes | None:
    """JSON nested far deeper than any decoder's recursion limit, within the size limit (None: no room)."""
    depth = 50_000 if limit is None else min(50_000, (limit - 1024) // 2)
    return b"[" * depth + b"]" * depth if depth >= 5_000 else None


def sound(msg: Message[Any]) -> bool:
    """Whether a handed-out message has the metadata types the API promises."""
    optional = (msg.key, msg.correlation_id, msg.content_type)
    return (
        isinstance(msg.payload, bytes)
        and isinstance(msg.id, str)
        and all(v is None or isinstance(v, str) for v in optional)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in msg.headers.items())
        and isinstance(msg.timestamp, float | int)
        and 0 <= msg.timestamp < TIMESTAMP_LIMIT
    )


async def _check_bad_in_a_batch(ctx: ContractContext) -> None:
    """One batch of good messages around bad ones, read with ``receive()`` and no model: every good one is
    returned, every bad one dead-lettered with a ``DecodeError:`` reason, and ``receive`` never raises."""
    queue, run_id, k = ctx.name("b"), uuid.uuid4().hex[:8], ctx.scale(10, 4)
    producer = ctx.bus.producer(queue)
    consumer = ctx.bus.consumer(queue, prefetch=100)
    await consumer.open()
    good = [Outgoing({"good": i}) for i in range(k)]
    bad: dict[str, Outgoing] = {
        "not-utf8-text": Outgoing(b"\xff\xfe\xfd", content_type="text/plain; charset=utf-8"),
        "bad-json-suffix": Outgoing(b"{nope", content_type="application/problem+json"),
    }
    deep = _deep_json(ctx.caps.max_message_size)
    if deep is not None:
        bad["deep-nesting"] = Outgoing(deep, content_type="application/json")
    ids = await producer.send_many([*good[: k // 2], *bad.values(), *good[k // 2 :]])  # one batch
    good_ids = set(ids[: k // 2]) | set(ids[k // 2 + len(bad) :])
    bad_ids = set(ids) - good_ids
    # Through the adapter: damaged private metadata, in one batch between two sound records.
    now = time.time()
    endpoint = Endpoint("queue", queue)

    def record(tag: str, headers: dict[str, str] | None = None) -> Record:
        return Record(_injected_body(run_id, tag), f"ct-inj-{run_id}-{tag}", headers or {}, None, None, None, now)

    stored: set[str] = set()
    refused: list[str] = []
    batch = [record("sound-first"), *(record(t, h) for t, h in _DAMAGED_METADATA.items()), record("sound-last")]
    try:
        await ctx.bus.adapter.send(endpoint, batch)
        stored |= {"sound-first", "sound-last", *_DAMAGED_METADATA}
    except MsgbusError as exc:  # refused as a whole: then nothing of it may arrive
        refused.append(f"damaged metadata batch -> {type(exc).__name__}")
    for tag, wrong in _wrong_types(run_id, now).items():
        try:
            await ctx.bus.adapter.send(endpoint, [wrong])
        except MsgbusError:
            refused.append(tag)
            continue
        except Exception as exc:
            fail(f"Adapter.send of a record with {tag} raised {type(exc).__name__}, not a msgbus error: {exc}")
        if isinstance(wrong.body, bytes):
            stored.add(tag)
        else:  # its tag is not in its payload: it must be dead-lettered, counted below by id
            bad_ids.add(str(wrong.id))
    returned, dead, problems = Tally(), Tally(), list[str]()
    injected: dict[str, str] = {}  # tag -> where it went

    def place(msg: Message[Any], where: str) -> str:
        tag = _injected_tag(msg.payload, run_id)
        if tag is not None:
            if tag in injected:
                problems.append(f"injected {tag} arrived twice ({injected[tag]}, {where})")
            injected[tag] = where
            return f"inject:{tag}"
        return msg.id

    def on_good(msg: Message[Any]) -> None:
        key = place(msg, "handed out")
        if not sound(msg):
            problems.append(f"{key} handed out with unsound metadata: {msg!r}")
        if key in bad_ids:
            problems.append(f"{key}: an undecodable message was handed out ({msg.body!r:.60})")
        returned.add(key)

    def on_dead(msg: Message[Any]) -> None:
        key = place(msg, "dead-lettered")
        reason = msg.dead_letter_reason or ""
        if not reason.startswith("DecodeError:"):
            problems.append(f"{key}: dead-letter reason {reason[:80]!r} does not start with 'DecodeError:'")
        dead.add(key)

    def all_placed() -> bool:
        return good_ids <= set(returned.counts) and bad_ids <= set(dead.counts) and stored <= set(injected)

    dlq = ctx.bus.dead_letters(queue, prefetch=100)
    while not all_placed():  # receive() must never raise here, whatever the batch holds
        ctx.waiting = lambda: f"the bad batch: {returned.distinct} returned, {dead.distinct} dead-lettered"
        for msg in await consumer.receive(max_messages=100, timeout=0.5):
            on_good(msg)
            await msg.ack()
        for msg in await dlq.receive(max_messages=100, timeout=0.2):
            on_dead(msg)
            await msg.ack()
    quiet = await expect_only_sentinel(ctx, consumer, sentinel_sender(producer), ctx.quiet, "after the bad batch")
    injected_good = {f"inject:{t}" for t, w in injected.items() if w == "handed out"}
    returned.ensure_exact(good_ids | injected_good, "good ones in a batch with bad ones, returned")
    dead.ensure_exact(bad_ids | {f"inject:{t}" for t, w in injected.items() if w == "dead-lettered"}, "dead-lettered")
    ensure(not problems, f"{len(problems)} problems, e.g. {'; '.join(problems[:3])}")
    ctx.note(
        f"one batch of {len(good_ids)} good + {len(bad)} bad ({', '.join(bad)}), no model: the good ones returned, "
        f"the bad ones dead-lettered with 'DecodeError:'; {quiet}"
    )
    kept = sorted(t for t, w in injected.items() if w == "handed out")
    ctx.note(
        f"through Adapter.send: {len(stored)} stored with damaged metadata or wrong types, {len(kept)} delivered "
        f"with sound metadata, {len(stored) - len(kept)} dead-lettered; refused typed: {', '.join(refused) or 'none'}"
    )


def _with_option(url: str, name: str, value: str) -> str:
    return url + ("&" if "?" in url else "?") + f"{name}={value}"


async def _expect_config_error(ctx: ContractContext, url: str, names: str | None, secret: str | None = None) -> str:
    """connect(url) (or opening it) must raise ConfigError naming ``names`` and not showing ``secret``."""
    try:
        bus = msgbus.connect(url)
        ctx.on_cleanup(bus.close)
        await bus.open()
    except ConfigError as exc:
        text = f"{exc} {exc!r}"
        ensure(names is None or names in text, f"ConfigError for {names!r} does not name it: {exc}")
        ensure(secret is None or secret not in text, f"ConfigError shows the secret value: {type(exc).__name__}")
        return type(exc).__name__
    except Exception as exc:
        fail(f"bad URL/option {names or ''}: expected ConfigError, got {type(exc).__name__}")
    fail(f"bad URL/option {names or url!r}: connect() and open() succeeded")


async def check_bad_input(ctx: ContractContext) -> None:
    """Bad URLs, options, bodies, headers, keys and sizes raise typed errors with clear text; nothing is sent."""
    url, scheme = ctx.url, ctx.url.split("://", 1)[0]
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    await _expect_config_error(ctx, _with_option(url, "contract_bogus_option", "1"), "contract_bogus_option")
    await _expect_config_error(ctx, _with_option(url, "contract_password", secret), "contract_password", secret)
    await _expect_config_error(ctx, _with_option(url, "topology", "sometimes"), "topology")
    await _expect_config_error(ctx, "no-scheme-at-all", None)
    await _expect_config_error(ctx, f"{scheme}://host:notaport/", None)
    unknown = await _expect_config_error(ctx, "nosuchbroker-contract://x", "nosuchbroker-contract")
    ensure(unknown == AdapterNotInstalled.__name__, f"an unknown scheme raised {unknown}, not AdapterNotInstalled")
    parts = urlsplit(url)
    if parts.password:
        # Swap in a password that appears nowhere else (the real one may equal the user name, e.g. guest:guest).
        probe = url.replace(f":{parts.password}@", f":{secret}@", 1)
        probe_bus = msgbus.connect(probe)
        shown = f"{probe_bus!r} {probe_bus.url}"
        ensure(secret not in shown, "the bus repr or url shows the password")
        ensure(urlsplit(ctx.bus.url).password != parts.password, "bus.url shows the password")
    queue = ctx.name()
    producer = ctx.bus.producer(queue)
    bad: Any = 5  # wrong types on purpose, past the type checker
    cases: list[tuple[Callable[[], Awaitable[object]], type[Exception], str]] = [
        (lambda: producer.send(b"x", headers={"n": bad}), InvalidMessage, "non-str header value"),
        (lambda: producer.send(b"x", headers={bad: "v"}), InvalidMessage, "non-str header name"),
        (lambda: producer.send(b"x", headers={"x-msgbus-mine": "v"}), InvalidMessage, "reserved header name"),
        (lambda: producer.send(object()), InvalidMessage, "object() body"),
        (lambda: producer.send({1, 2}), InvalidMessage, "set body"),
        (lambda: producer.send(b"x", key=bad), InvalidMessage, "int key"),
        (lambda: producer.send_many([{"ok": 1}, object()]), InvalidMessage, "send_many with one bad body"),
        (lambda: producer.send(b"x", delay=-1), InvalidMessage, "delay=-1"),
    ]
    if not ctx.caps.delayed_delivery:
        cases.append((lambda: producer.send(b"x", delay=1), CapabilityMissing, "delay without delayed_delivery"))
    limit = ctx.caps.max_message_size
    if limit is not None and limit <= 256 * 1024 * 1024:
        big = b"\0" * (limit + 1)
        cases.append((lambda: producer.send(big), MessageTooLarge, f"{limit + 1}-byte body"))
        cases.append((lambda: producer.send_many([b"ok", big]), MessageTooLarge, "send_many with one oversize"))
    cases += [
        (lambda: producer.send(b"x", content_type=bad), InvalidMessage, "int content_type"),
        (lambda: producer.send_many([Outgoing(b"x", content_type=bad)]), InvalidMessage, "Outgoing int content_type"),
        (lambda: producer.send(b"x", delay=10**400), InvalidMessage, "delay=10**400"),
        (lambda: producer.send(b"x", delay=float("inf")), InvalidMessage, "delay=inf"),
        (lambda: producer.send(b"x", delay=float("nan")), InvalidMessage, "delay=nan"),
        (lambda: producer.send(b"x", key="k\ud800"), InvalidMessage, "lone surrogate in key"),
        (lambda: producer.send(b"x", headers={"h": "\udfff"}), InvalidMessage, "lone surrogate in a header"),
        (lambda: producer.send(b"x", message_id="\ud800"), InvalidMessage, "lone surrogate in message_id"),
        (lambda: producer.send_many("not a list of bodies"), InvalidMessage, "send_many(str)"),
    ]
    notes = [await expect_raises(make(), error, what) for make, error, what in cases]
    for name in ("bad name with spaces", "orders\n", 5):
        try:
            ctx.bus.consumer(name)  # type: ignore[arg-type]
            fail(f"bus.consumer({name!r}) did not raise")
        except ConfigError:
            pass
    notes.append("queue names with a space, a trailing newline, or not a str -> ConfigError")
    notes += _bad_arguments(ctx)
    notes.append(await _bad_settlements(ctx))
    notes.append(await _ambiguous_passwords(ctx, scheme, secret))
    quiet = await expect_only_sentinel(ctx, ctx.bus.consumer(queue), sentinel_sender(producer), ctx.quiet, "queue")
    ctx.note("bad URL, unknown/secret/invalid options, unknown scheme -> ConfigError naming the option, no secret")
    ctx.note("; ".join(notes))
    ctx.note(f"nothing from the failed sends was stored: {quiet}")


def _bad_arguments(ctx: ContractContext) -> list[str]:
    """Bad consumer and retry-policy arguments raise ConfigError up front (never a bare TypeError later)."""
    bad: Any = "3"
    attempts: list[tuple[Callable[[], object], str]] = [
        (lambda: ctx.bus.consumer(ctx.name(), prefetch=0), "prefetch=0"),
        (lambda: ctx.bus.consumer(ctx.name(), prefetch=bad), "prefetch='3'"),
        (lambda: ctx.bus.consumer(ctx.name(), model=bad), "model='3'"),
        (lambda: RetryPolicy(max_attempts=bad), "RetryPolicy(max_attempts='3')"),
        (lambda: RetryPolicy(initial_backoff=float("nan")), "RetryPolicy(initial_backoff=nan)"),
        (lambda: RetryPolicy(jitter=float("inf")), "RetryPolicy(jitter=inf)"),
    ]
    for make, what in attempts:
        try:
            make()
        except ConfigError:
            continue
        except Exception as exc:
            fail(f"{what}: expected ConfigError, got {type(exc).__name__}: {exc}")
        fail(f"{what}: expected ConfigError, but it returned normally")
    backoff = RetryPolicy().backoff(10_000)
    ensure(0 <= backoff <= RetryPolicy().max_backoff, f"RetryPolicy().backoff(10000) = {backoff}")
    return ["bad prefetch, model and RetryPolicy values -> ConfigError; backoff(10000) is capped, no overflow"]


async def _bad_settlements(ctx: ContractContext) -> str:
    """nack/reject with bad arguments raise InvalidMessage and leave the message unsettled; a huge reject
    reason is cut to MAX_DEAD_LETTER_REASON characters in the dead letter."""
    queue = ctx.name("settle")
    msg_id = await ctx.bus.producer(queue).send(b"settle me")
    consumer = ctx.bus.consumer(queue)
    tally = Tally()
    (msg,) = await drain(ctx, consumer, tally, lambda: msg_id in tally, settle=False, what="the message to settle")
    bad: Any = "5"
    not_text: Any = 1
    settlements: list[tuple[Callable[[], Awaitable[None]], str]] = [
        (lambda: msg.nack(bad), "nack('5')"),
        (lambda: msg.nack(float("nan")), "nack(nan)"),
        (lambda: msg.nack(float("inf")), "nack(inf): it would never come back"),
        (lambda: msg.nack(-1), "nack(-1)"),
        (lambda: msg.reject(not_text), "reject(1)"),
    ]
    for make, what in settlements:
        await expect_raises(make(), InvalidMessage, what)
        ensure(not msg.settled, f"{what} raised but marked the message settled")
    await msg.reject("r" * 5_000_000)
    dead = Tally()
    (dl,) = await drain(ctx, ctx.bus.dead_letters(queue), dead, lambda: msg_id in dead, what="the rejected message")
    reason = dl.dead_letter_reason or ""
    ensure(
        0 < len(reason) <= MAX_DEAD_LETTER_REASON and reason.startswith("rrr"),
        f"a 5,000,000-character reject reason arrived as {len(reason)} characters (at most {MAX_DEAD_LETTER_REASON})",
    )
    return f"nack('5'/nan/inf/-1), reject(1) -> InvalidMessage, still unsettled; a 5 MB reason -> {len(reason)} chars"


async def _ambiguous_passwords(ctx: ContractContext, scheme: str, secret: str) -> str:
    """URLs whose password holds '/', '#', '?' or '@' unescaped: refused (or parsed), never shown."""
    for url in (
        f"{scheme}://svc:12345/{secret}@host/",
        f"{scheme}://:{secret}#frag@host/0",
        f"{scheme}://user:a?{secret}@host/",
        f"{scheme}://user:{secret}@host:notaport/",
    ):
        try:
            bus = msgbus.connect(url)
        except ConfigError as exc:
            ensure(secret not in f"{exc} {exc!r}", "ConfigError for a password with special characters shows it")
            continue
        shown = f"{bus!r} {bus.url}"
        ensure(secret not in shown, "bus.url or repr shows a password with special characters")
    return "passwords holding '/', '#', '?' or '@' unescaped: refused, never shown"
