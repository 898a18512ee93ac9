"""The public surface: connect() resolution, registry errors, send-side validation, roles, sync facade."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import logging
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgbus
import msgbus.sync
from msgbus._memory import _MemoryDelivery, _MemoryReceiver
from msgbus.adapter import Receiver
from msgbus.errors import (
    AdapterNotInstalled,
    BrokerError,
    CapabilityMissing,
    ClosedError,
    ConfigError,
    InvalidMessage,
    MessageTooLarge,
)


def mem(**opts: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in opts.items())
    return f"memory://{uuid.uuid4().hex}" + (f"?{query}" if query else "")


def test_all_is_complete_and_sorted() -> None:
    # "@py_builtins": pytest rewrites the asserts of the package that ships a pytest plugin (msgbus.testing.plugin)
    public = {n for n in dir(msgbus) if not n.startswith(("_", "@")) and n not in {"annotations", "Any"}}
    modules = {"adapter", "errors", "sync", "testing", "cli", "msgbus_adapter", "outbox", "inbox", "cloudevents"}
    assert sorted(msgbus.__all__) == list(msgbus.__all__) or msgbus.__all__ == sorted(
        msgbus.__all__, key=lambda s: (not s.isupper(), s)
    )
    assert public - modules - {
        "connect",
        "require",
        "schemes",
        "resolve",
        "factory",
        "parse_url",
        "ConfigError",
    } <= set(msgbus.__all__)
    for name in msgbus.__all__:
        assert hasattr(msgbus, name), name


def test_errors_all_is_complete() -> None:
    exported = {n for n, v in vars(msgbus.errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert exported == set(msgbus.errors.__all__)


REPO = Path(__file__).resolve().parents[1]


def private_imports(path: Path) -> list[str]:
    """``file:line`` of every import of a private ``msgbus`` module (``msgbus._x``, or ``_x`` from ``msgbus``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if any(n.split(".")[0] == "msgbus" and any(p.startswith("_") for p in n.split(".")[1:]) for n in names):
            found.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno}")
    return found


def test_adapters_import_nothing_private_from_msgbus() -> None:
    """Adapters (and docs/writing-an-adapter.md's example) are written against the public kit
    (``msgbus.adapter``, ``msgbus.errors``) alone, so a third-party adapter can be written the same way."""
    files = sorted(REPO.glob("adapters/*/msgbus_*/**/*.py")) + sorted(REPO.glob("docs/examples/*.py"))
    assert len(files) >= 8 * 3 + 1, "every adapter package and the guide's example must be found"
    assert [hit for f in files for hit in private_imports(f)] == []


def test_private_import_check_catches_each_form(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import msgbus.errors\nfrom msgbus.adapter import BusURL\nfrom . import _codec\n"  # fine
        "from msgbus._url import redact\nimport msgbus._bus\nfrom msgbus import _url\n"
        "def f():\n    from msgbus.testing._catalog import CHECKS\n"
    )
    assert private_imports(module) == [f"{module}:{n}" for n in (4, 5, 6, 8)]


def wait_for_calls(path: Path) -> list[str]:
    """``file:line`` of every ``asyncio.wait_for`` call (or import): see msgbus/_waits.py for why."""
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "wait_for" and getattr(node.value, "id", "") == "asyncio":
            found.append(f"{where}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom) and node.module == "asyncio":
            found += [f"{where}:{node.lineno}" for a in node.names if a.name == "wait_for"]
    return found


def test_the_library_and_adapters_never_wait_with_asyncio_wait_for() -> None:
    """On Python 3.11 it loses a cancel that arrives as the awaited call finishes: stop(), close() or a timeout
    around a receive loop could go unnoticed. ``asyncio.timeout`` and ``msgbus.adapter.wait_set`` do not."""
    files = sorted(REPO.glob("msgbus/**/*.py")) + sorted(REPO.glob("adapters/*/msgbus_*/**/*.py"))
    assert len(files) > 50
    assert [hit for f in files for hit in wait_for_calls(f)] == []


def test_wait_for_check_catches_each_form(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import asyncio\nfrom asyncio import wait_for\nasyncio.wait_for(x, 1)\nev.wait_for(1)\n")
    assert [hit.rsplit(":", 1)[1] for hit in wait_for_calls(module)] == ["2", "3"]


def _from_core(value: object) -> bool:
    module = getattr(value, "__module__", "") or ""
    return module.startswith("msgbus") and module != "msgbus.errors"


def test_adapter_kit_all_is_complete_and_documented() -> None:
    import msgbus.adapter as kit

    # Everything the kit defines or re-exports from the core (errors have their own public module).
    public = {n for n, v in vars(kit).items() if not n.startswith("_") and _from_core(v)}
    constants = {n for n in vars(kit) if n.isupper() and not n.startswith("_")}
    assert public | constants == set(kit.__all__)
    for name in kit.__all__:
        value = getattr(kit, name)
        if callable(value):
            assert inspect.getdoc(value), f"msgbus.adapter.{name} needs a docstring"
            for attr, member in vars(value).items() if isinstance(value, type) else ():
                if not attr.startswith("_") and inspect.isfunction(member):
                    assert inspect.getdoc(member), f"msgbus.adapter.{name}.{attr} needs a docstring"


def test_unknown_scheme_and_missing_adapter_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgbus import _registry

    monkeypatch.setitem(_registry.PACKAGES, "fakebroker", "msgbus-fakebroker")  # first-party, not installed
    with pytest.raises(AdapterNotInstalled, match="pip install msgbus-fakebroker"):
        msgbus.connect("fakebroker://127.0.0.1:9092")
    with pytest.raises(AdapterNotInstalled, match="unknown URL scheme 'gopher"):
        msgbus.connect("gopher://x")


def test_unknown_option_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="colour"):
        msgbus.connect(mem(colour="blue"))
    with pytest.raises(ConfigError, match="topology"):
        msgbus.connect(mem(), topology="sometimes")


def test_connect_resolution_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MSGBUS_URL", raising=False)
    monkeypatch.delenv("MSGBUS_CONFIG", raising=False)
    with caplog.at_level(logging.WARNING, logger="msgbus"):
        bus = msgbus.connect()
    assert bus.url == "sqlite:///./msgbus.db"
    assert [r for r in caplog.records if "msgbus.db" in r.getMessage()], "the fallback must warn, naming the file"

    (tmp_path / "msgbus.toml").write_text(
        '[bus.default]\nurl = "memory://from-file"\n[bus.orders]\nurl = "memory://orders"\nvisibility_timeout = 5\n'
    )
    assert msgbus.connect().url == "memory://from-file"
    orders = msgbus.connect(profile="orders")
    assert orders.url == "memory://orders" and orders.capabilities.lock_duration == 5
    with pytest.raises(ConfigError, match="profiles: default, orders"):
        msgbus.connect(profile="missing")

    monkeypatch.setenv("MSGBUS_URL", "memory://from-env")
    assert msgbus.connect().url == "memory://from-env"
    assert msgbus.connect("memory://explicit").url == "memory://explicit"

    other = tmp_path / "other.toml"
    other.write_text('[bus.default]\nurl = "memory://other"\n')
    monkeypatch.delenv("MSGBUS_URL")
    monkeypatch.setenv("MSGBUS_CONFIG", str(other))
    assert msgbus.connect().url == "memory://other"
    monkeypatch.setenv("MSGBUS_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not a file"):
        msgbus.connect()


def test_bad_config_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[bus.default\nurl=")
    monkeypatch.setenv("MSGBUS_CONFIG", str(path))
    monkeypatch.delenv("MSGBUS_URL", raising=False)
    with pytest.raises(ConfigError, match="cannot read config file"):
        msgbus.connect()


@pytest.mark.parametrize("name", ["", "has space", "-lead", "x" * 201, "a/b", 5])
def test_bad_names_rejected(name: object) -> None:
    bus = msgbus.connect(mem())
    with pytest.raises(ConfigError):
        bus.producer(name)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        bus.subscriber("t", subscription=name)  # type: ignore[arg-type]


async def test_send_side_validation_raises_typed_errors() -> None:
    async with msgbus.connect(mem(max_message_size="1000")) as bus:
        p = bus.producer("q")
        with pytest.raises(InvalidMessage, match="header 'a'"):
            await p.send(b"x", headers={"a": 1})  # type: ignore[dict-item]
        with pytest.raises(InvalidMessage, match="reserved"):
            await p.send(b"x", headers={"x-msgbus-attempts": "1"})
        with pytest.raises(InvalidMessage, match="key"):
            await p.send(b"x", key=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidMessage, match="delay"):
            await p.send(b"x", delay=-1)
        with pytest.raises(InvalidMessage, match="cannot encode"):
            await p.send(object())
        with pytest.raises(MessageTooLarge) as info:
            await p.send(b"x" * 2000)
        assert info.value.limit == 1000
        assert await bus.consumer("q").receive(10, 0.2) == [], "nothing invalid may have been stored"


async def test_send_many_counts_shared_key_and_headers_against_the_limit() -> None:
    """send_many sizes plain items with the batch's key and headers included: a body that fits alone but not
    with that metadata is refused, exactly at the byte where a single send would refuse it too."""
    async with msgbus.connect(mem(max_message_size="1000")) as bus:
        p = bus.producer("q")
        meta = {"key": "k" * 10, "headers": {"h": "v" * 40, "é": "ü"}}
        fits = 1000 - 32 - len("application/octet-stream") - 10 - (1 + 40) - (2 + 2)  # id, type, key, headers
        await p.send(b"x" * fits, **meta)  # type: ignore[arg-type]
        with pytest.raises(MessageTooLarge) as single:
            await p.send(b"x" * (fits + 1), **meta)  # type: ignore[arg-type]
        assert await p.send_many([b"x" * fits], **meta)  # type: ignore[arg-type]
        with pytest.raises(MessageTooLarge) as batch:
            await p.send_many([b"x", b"x" * (fits + 1)], **meta)  # type: ignore[arg-type]
        assert batch.value.size == single.value.size == 1001
        consumer, got = bus.consumer("q"), []
        while batch_ := await consumer.receive(10, 0.2):  # one key: the second comes after the first is acked
            got += batch_
            for msg in batch_:
                await msg.ack()
        assert [len(m.body) for m in got] == [fits, fits], "the two that fit, nothing of the refused batch"


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.one_of(st.text(), st.integers()), st.one_of(st.text(), st.integers(), st.none()), max_size=5))
def test_any_headers_either_roundtrip_or_raise_invalid_message(headers: dict[object, object]) -> None:
    async def go() -> None:
        async with msgbus.connect(mem()) as bus:
            try:
                await bus.producer("q").send(b"x", headers=headers)  # type: ignore[arg-type]
            except InvalidMessage:
                return
            [msg] = await bus.consumer("q").receive(1, 1.0)
            assert dict(msg.headers) == headers

    asyncio.run(go())


async def test_closed_bus_raises_closed_error() -> None:
    bus = msgbus.connect(mem())
    async with bus:
        await bus.producer("q").send(b"x")
    with pytest.raises(ClosedError):
        await bus.producer("q").send(b"y")
    with pytest.raises(ClosedError):
        await bus.open()


async def test_require_fails_at_start_up() -> None:
    bus = msgbus.connect(mem())
    msgbus.require(bus, "delayed_delivery", "ordering")
    with pytest.raises(CapabilityMissing, match="exactly_once"):
        msgbus.require(bus, "exactly_once")


async def test_roundtrip_of_metadata_and_settlement_idempotence() -> None:
    async with msgbus.connect(mem()) as bus:
        mid = await bus.producer("q").send({"a": 1}, key="k", headers={"h": "é"}, correlation_id="c1")
        [msg] = await bus.consumer("q").receive(1, 1.0)
        assert (msg.id, msg.body, msg.key, dict(msg.headers), msg.correlation_id, msg.attempt) == (
            mid,
            {"a": 1},
            "k",
            {"h": "é"},
            "c1",
            1,
        )
        assert msg.content_type == "application/json" and msg.timestamp > 0
        await msg.ack()
        await msg.ack()
        await msg.nack()  # no effect after ack
        assert await bus.consumer("q").receive(1, 0.3) == []


async def test_run_retries_then_dead_letters_with_reason() -> None:
    async with msgbus.connect(mem()) as bus:
        await bus.producer("q").send_many([{"n": i} for i in range(20)])
        seen: dict[int, int] = {}

        async def handler(msg: msgbus.Message) -> None:
            n = msg.body["n"]
            seen[n] = seen.get(n, 0) + 1
            if n % 5 == 0:
                raise ValueError(f"bad {n}")

        consumer = bus.consumer("q")
        task = asyncio.create_task(
            consumer.run(handler, concurrency=4, retry=msgbus.RetryPolicy(max_attempts=3, initial_backoff=0.01))
        )
        dead = []
        async with asyncio.timeout(10):
            while len(dead) < 4:
                dead += await bus.dead_letters("q").receive(10, 0.5)
        consumer.stop()
        await task
        assert sorted(seen) == list(range(20))
        assert {n: c for n, c in seen.items() if n % 5 == 0} == {0: 3, 5: 3, 10: 3, 15: 3}
        assert all(c == 1 for n, c in seen.items() if n % 5)
        assert sorted(m.body["n"] for m in dead) == [0, 5, 10, 15]
        assert all(m.dead_letter_reason == f"ValueError: bad {m.body['n']}" for m in dead)
        assert all(m.dead_letter_attempts == 3 for m in dead)


async def test_cancelled_run_finishes_in_flight_and_releases_the_rest() -> None:
    async with msgbus.connect(mem()) as bus:
        await bus.producer("q").send_many(list(range(50)))
        started = asyncio.Event()
        done: list[int] = []

        async def slow(msg: msgbus.Message) -> None:
            started.set()
            await asyncio.sleep(0.3)
            done.append(msg.body)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run(slow, concurrency=4))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(done) == 4, "in-flight handlers finish on cancellation"
        rest = []
        async with asyncio.timeout(5):
            while len(rest) < 46:
                batch = await bus.consumer("q").receive(50, 0.5)
                rest += batch
                for m in batch:
                    await m.ack()
        assert sorted(done + [m.body for m in rest]) == list(range(50)), "0 lost, 0 duplicates"


async def test_stop_hands_back_the_read_ahead_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a stopped run() fetched but never started is handed back in one ``release_many``, whose kit default
    nacks all at once, not one awaited nack after another: adapters that batch settlements (SQS, Pub/Sub) then
    make a few calls (one round trip per message, 50 buffered took 1.5-3.1 s on a loaded moto, against half a 2 s
    lock). memory's own ``release_many`` is set aside here, so the default is what runs."""
    active, most, nacked = 0, 0, 0
    nack = _MemoryDelivery.nack

    async def counted(self: _MemoryDelivery, delay: float | None = None) -> None:
        nonlocal active, most, nacked
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.01)  # a round trip: a sequential release never has two of these at once
        await nack(self, delay)
        active -= 1
        nacked += 1

    monkeypatch.setattr(_MemoryDelivery, "nack", counted)
    monkeypatch.setattr(_MemoryReceiver, "release_many", Receiver.release_many)
    async with msgbus.connect(mem()) as bus:
        await bus.producer("q").send_many(list(range(30)))
        consumer = bus.consumer("q", prefetch=20)
        handled: list[int] = []

        async def handle(msg: msgbus.Message) -> None:
            handled.append(msg.body)
            await asyncio.sleep(0.05)

        task = asyncio.create_task(consumer.run(handle, concurrency=1))
        async with asyncio.timeout(5):
            while not handled:
                await asyncio.sleep(0.01)
        consumer.stop()
        await asyncio.wait_for(task, 5)
        assert nacked > 1, f"only {nacked} released: the read-ahead was empty, nothing was tested"
        assert most == nacked, f"{nacked} buffered messages were released at most {most} at a time"


async def test_stop_returns_when_a_client_turns_cancelling_an_extend_into_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run() ends at stop() even when an extend call swallows its cancellation as a client error (as redis-py
    did under load: the lock extender then ran on and run() returned a minute after stop())."""
    extending = asyncio.Event()
    swallowed: list[bool] = []

    async def extend(self: _MemoryDelivery, seconds: float) -> None:
        extending.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
            raise BrokerError("connection reset while cancelled") from None

    monkeypatch.setattr(_MemoryDelivery, "extend", extend)
    async with msgbus.connect(mem(visibility_timeout="0.3")) as bus:
        await bus.producer("q").send(b"long")
        consumer = bus.consumer("q")

        async def handle(msg: msgbus.Message) -> None:
            await extending.wait()  # the lock extender is inside an extend call

        task = asyncio.create_task(consumer.run(handle))
        await asyncio.wait_for(extending.wait(), 5)
        await asyncio.sleep(0.05)
        consumer.stop()
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            task.cancel()  # a second cancellation reaches the extender while it sleeps
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert done, "run() did not return within 5 s of stop(): the lock extender kept it waiting"
        await task


async def test_shutdown_deadline_cancels_and_nacks_stuck_handlers() -> None:
    async with msgbus.connect(mem()) as bus:
        await bus.producer("q").send(b"stuck")
        started = asyncio.Event()

        async def stuck(msg: msgbus.Message) -> None:
            started.set()
            await asyncio.sleep(60)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run(stuck, shutdown_timeout=0.2))
        await started.wait()
        consumer.stop()
        await asyncio.wait_for(task, 5)
        [again] = await bus.consumer("q").receive(1, 1.0)
        assert again.payload == b"stuck" and again.attempt == 2


async def test_undecodable_message_is_dead_lettered_and_loop_goes_on() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Order:
        id: int

    async with msgbus.connect(mem()) as bus:
        p = bus.producer("q")
        await p.send({"id": 1})
        await p.send(b"{broken", content_type="application/json")
        await p.send({"id": 2})
        got: list[Order] = []

        async def handle(msg: msgbus.Message[Order]) -> None:
            got.append(msg.body)

        consumer = bus.consumer("q", model=Order)
        task = asyncio.create_task(consumer.run(handle))
        [dead] = await bus.dead_letters("q").receive(1, 3.0)
        async with asyncio.timeout(3):
            while len(got) < 2:
                await asyncio.sleep(0.01)
        consumer.stop()
        await task
        assert got == [Order(1), Order(2)]
        assert dead.payload == b"{broken" and (dead.dead_letter_reason or "").startswith("DecodeError")


async def test_middleware_wraps_the_handler_once() -> None:
    calls: list[str] = []

    def tag(name: str) -> msgbus.Middleware:
        def wrap(inner: msgbus.Handler) -> msgbus.Handler:
            async def handler(msg: msgbus.Message) -> None:
                calls.append(name)
                await inner(msg)

            return handler

        return wrap

    async with msgbus.connect(mem()) as bus:
        await bus.producer("q").send_many([1, 2])
        seen: list[int] = []

        async def handle(msg: msgbus.Message) -> None:
            seen.append(msg.body)

        consumer = bus.consumer("q")
        task = asyncio.create_task(consumer.run(handle, middleware=[tag("outer"), tag("inner")]))
        async with asyncio.timeout(3):
            while len(seen) < 2:
                await asyncio.sleep(0.01)
        consumer.stop()
        await task
        assert calls == ["outer", "inner", "outer", "inner"]


def test_sync_facade_same_shapes() -> None:
    url = mem()
    with msgbus.sync.connect(url) as bus:
        ids = bus.producer("q").send_many([{"n": i} for i in range(10)])
        bus.publisher("t")  # shape exists
        got = []
        for msg in bus.consumer("q"):
            got.append(msg.id)
            msg.ack()
            if len(got) == 10:
                break
        assert got == ids

        bus.producer("q").send_many(list(range(30)))
        handled: list[int] = []
        consumer = bus.consumer("q")

        def handle(msg: msgbus.sync.SyncMessage) -> None:
            handled.append(msg.body)
            if len(handled) == 30:
                consumer.stop()

        consumer.run(handle, concurrency=4)
        assert sorted(handled) == list(range(30))


@pytest.mark.parametrize(
    ("sync_role", "async_role", "names"),
    [
        (msgbus.sync.SyncProducer, msgbus.Producer, ("send", "send_many")),
        (msgbus.sync.SyncPublisher, msgbus.Publisher, ("publish", "publish_many")),
    ],
)
def test_sync_send_methods_have_the_async_signatures(sync_role: type, async_role: type, names: tuple[str, ...]) -> None:
    """The blocking send methods are derived from the async ones, so they cannot drift apart."""
    for name in names:
        assert inspect.signature(getattr(sync_role, name)) == inspect.signature(getattr(async_role, name)), name
    with msgbus.sync.connect(mem()) as bus:
        sent = bus.producer("q").send({"n": 1}, key="k", headers={"h": "v"}, correlation_id="c", content_type=None)
        published = bus.publisher("t").publish(b"x", message_id="m-1")
        [msg] = bus.consumer("q").receive(10, 1.0)
        assert (msg.id, msg.body, msg.key, msg.headers, msg.correlation_id) == (sent, {"n": 1}, "k", {"h": "v"}, "c")
        assert published == "m-1"
        with pytest.raises(TypeError):
            bus.producer("q").send(1, kee="k")  # type: ignore[call-arg]
