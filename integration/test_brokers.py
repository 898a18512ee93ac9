"""The local broker launchers against the real brokers: start, ready, idempotent start, restart keeps data, stop.

These tests restart and stop the brokers on the fixed test ports; a broker that was running before the test
is left running after it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import brokers
from integration._process import (
    PidRecord,
    children,
    group_members,
    locked,
    port_bindable,
    spawn,
    start_time,
    terminate,
)
from integration.brokers import BrokerUnavailable, LauncherError, LocalBroker

N = 5  # messages written before a restart and counted after it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated(name: str, root: Path) -> LocalBroker:
    """The registered launcher for ``name``, unchanged but for free ports and its own state dir.

    The launcher tests stop and kill brokers; on their own ports they never disturb the shared test
    brokers that other test runs (contract suites, colleagues) use at the same time.
    """
    base = type(brokers.get(name))
    attrs: dict[str, object] = {"port": _free_port()}
    if name == "rabbitmq":
        dist = _free_port()
        attrs |= {
            "dist_port": dist,
            "extra_ports": (dist,),
            "node": f"msgbus-launcher-{uuid.uuid4().hex[:6]}@localhost",
        }
    elif name == "nats":
        monitor = _free_port()
        attrs |= {"monitor_port": monitor, "extra_ports": (monitor,)}
    launcher: LocalBroker = type(f"Isolated{base.__name__}", (base,), attrs)(root)
    return launcher


@pytest.fixture(scope="module", params=brokers.DEFAULT_BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A started local broker on its own ports and state dir, stopped at the end of the module."""
    launcher = isolated(request.param, tmp_path_factory.mktemp(request.param))
    assert launcher.start() is True
    yield launcher
    launcher.stop()


# --- writing and reading back data that must survive a restart ---


async def _rabbitmq_write(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        for i in range(N):
            message = aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue)


async def _rabbitmq_declare(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


async def _rabbitmq_read(url: str, queue: str) -> list[str]:
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        bodies = []
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            bodies.append(message.body.decode())
        await declared.delete()
    return bodies


def _redis_write(url: str, key: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.rpush(key, *[str(i) for i in range(N)])


def _redis_read(url: str, key: str) -> list[str]:
    import redis

    with redis.Redis.from_url(url) as client:
        values = [v.decode() for v in client.lrange(key, 0, -1)]
        client.delete(key)
    return values


async def _nats_write(url: str, stream: str) -> None:
    import nats

    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i in range(N):
            await js.publish(f"{stream}.x", str(i).encode())
    finally:
        await client.close()


async def _nats_read(url: str, stream: str) -> list[str]:
    import nats

    client = await nats.connect(url)
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        bodies = [(await js.get_msg(stream, seq)).data or b"" for seq in range(1, info.state.messages + 1)]
        await js.delete_stream(stream)
    finally:
        await client.close()
    return [b.decode() for b in bodies]


def _write(broker: LocalBroker, name: str) -> None:
    if broker.name == "rabbitmq":
        asyncio.run(_rabbitmq_write(broker.url, name))
    elif broker.name == "redis":
        _redis_write(broker.url, name)
    else:
        asyncio.run(_nats_write(broker.url, name))


def _read(broker: LocalBroker, name: str) -> list[str]:
    if broker.name == "rabbitmq":
        return asyncio.run(_rabbitmq_read(broker.url, name))
    if broker.name == "redis":
        return _redis_read(broker.url, name)
    return asyncio.run(_nats_read(broker.url, name))


# --- the launcher's lifecycle ---


def test_start_is_ready_and_idempotent(broker: LocalBroker) -> None:
    record = broker.running()
    assert record is not None
    assert broker.ready() is None
    assert broker.start() is False  # already up: a no-op
    assert broker.running() == record


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "killed"])
def test_restart_keeps_data(broker: LocalBroker, hard: bool) -> None:
    name = f"msgbus-launcher-{uuid.uuid4().hex[:8]}"
    if hard and broker.name == "rabbitmq":
        # RabbitMQ 3.x answers declare-ok before its metadata store (Mnesia) has the queue on disk: a queue
        # declared just before a SIGKILL was lost (2 of 2 runs in a CI rehearsal). What a crash must keep is the
        # confirmed persistent messages of a durable queue that exists: declare it, restart cleanly, then write.
        asyncio.run(_rabbitmq_declare(broker.url, name))
        broker.restart(hard=False)
    before = broker.running()
    _write(broker, name)

    broker.restart(hard=hard)

    after = broker.running()
    assert before is not None and after is not None and after.pid != before.pid
    assert broker.ready() is None
    assert _read(broker, name) == [str(i) for i in range(N)]  # N written, N back, in order, 0 lost


def test_stop_then_start(broker: LocalBroker) -> None:
    assert broker.stop() is True
    assert broker.running() is None
    assert broker.ready() is not None
    assert port_bindable(broker.port)
    assert broker.stop() is False  # stopping a stopped broker is a no-op

    assert broker.start() is True
    assert broker.ready() is None


def test_start_refuses_a_port_it_does_not_own(broker: LocalBroker, tmp_path: Path) -> None:
    """A second launcher with another state dir finds the port taken and leaves the running broker alone."""
    intruder = type(broker)(tmp_path)  # same ports, another state dir: not the process that owns them
    with pytest.raises(LauncherError, match="taken by a process integration/brokers did not start"):
        intruder.start(install=False)
    assert broker.ready() is None


def test_stop_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    """A PID file whose PID now belongs to another process (same PID, other start time) is not obeyed."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        launcher = type(brokers.get("redis"))(tmp_path)
        launcher.dir.mkdir(parents=True)
        started = start_time(stranger.pid)
        assert started is not None
        fake = PidRecord(stranger.pid, started + 1, ("redis-server",))
        launcher.pid_file.write_text(
            f'{{"pid": {fake.pid}, "start_time": {fake.start_time}, "argv": ["redis-server"]}}'
        )
        assert launcher.running() is None
        assert launcher.stop() is False
        assert stranger.poll() is None  # still alive
        assert not launcher.pid_file.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_hard_stop_kills_children_that_left_the_process_group(tmp_path: Path) -> None:
    """A crash takes the broker's children with it, even those in sessions of their own (PostgreSQL's
    backends are): left alive, they made the restart of a killed postmaster fail ("lock file already exists")."""
    script = "import subprocess, time; subprocess.Popen(['setsid', 'sleep', '60']); time.sleep(60)"
    record = spawn(
        [sys.executable, "-c", script], env={}, cwd=tmp_path, log=tmp_path / "log", pid_file=tmp_path / "pid"
    )
    deadline = time.monotonic() + 10
    strays: list[int] = []
    while not strays and time.monotonic() < deadline:
        strays = [pid for pid in children(record.pid) if pid not in group_members(record.pid)]
        time.sleep(0.05)
    assert strays, "the broker stand-in did not start a child in a session of its own"
    terminate(record, timeout=5, hard=True)
    assert all(start_time(pid) is None for pid in strays), "the child in its own session survived the hard stop"


def test_a_broker_lock_held_elsewhere_fails_in_bounded_time(tmp_path: Path) -> None:
    """A start or stop waiting on another one that is stuck raises, naming the lock, instead of hanging the run."""
    lock = tmp_path / "lock"
    # Another open file description of the same file: flock makes it wait, as it would another process.
    with locked(lock), pytest.raises(RuntimeError, match="still held by another process after 1s"), locked(lock, 1):
        pass
    with locked(lock, timeout=1):  # released: taken at once
        pass


def test_last_test_run_to_let_go_stops_an_auto_started_broker(tmp_path: Path) -> None:
    """A broker a test run started stays up while another live process holds a lease, then stops."""
    redis = isolated("redis", tmp_path)
    other = subprocess.Popen(["sleep", "60"])  # stands in for a second pytest process using the broker
    try:
        redis.lease(started=redis.start())
        (redis.dir / "leases" / str(other.pid)).write_text(str(start_time(other.pid)))

        assert redis.unlease() is False  # the other process still uses it
        assert redis.ready() is None

        other.kill()
        other.wait()
        redis.lease(started=False)
        assert redis.unlease() is True  # last one out, and a test run started it: stopped
        assert redis.running() is None
    finally:
        other.kill()
        other.wait()
        redis.stop()


def test_cli_start_keeps_the_broker_for_later_runs(tmp_path: Path) -> None:
    """``keep()`` (what the CLI's start does) means no test run's release stops it."""
    redis = isolated("redis", tmp_path)
    try:
        redis.lease(started=redis.start())
        redis.keep()
        assert redis.unlease() is False
        assert redis.ready() is None
    finally:
        redis.stop()


def test_moto_server_lifecycle(tmp_path: Path) -> None:
    """moto (SQS/SNS) starts, is idempotent, keeps what it acknowledged across a kill (its journal), and stops."""
    import botocore.session

    moto = isolated("sqs", tmp_path)
    assert moto.persistent is True
    assert moto.url == f"sqs://us-east-1?endpoint_url=http://127.0.0.1:{moto.port}"
    try:
        assert moto.start() is True
        first = moto.running()
        assert first is not None and moto.ready() is None
        assert moto.start() is False
        sqs = botocore.session.get_session().create_client(
            "sqs",
            region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{moto.port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        queue = sqs.create_queue(QueueName="kept")["QueueUrl"]
        sqs.send_message(QueueUrl=queue, MessageBody="stored before the kill")
        # Topology changes after the snapshot (the start's) are kept without the messages, which come from the
        # snapshot and the journal: a queue deleted and created again under its name comes back empty but for
        # what was sent to the new one, and a queue's attributes changed after its messages keep both.
        again = sqs.create_queue(QueueName="again")["QueueUrl"]
        sqs.send_message(QueueUrl=again, MessageBody="to the first 'again'")
        moto.restart()  # graceful: a snapshot with both queues and their messages
        sqs.delete_queue(QueueUrl=again)
        again = sqs.create_queue(QueueName="again")["QueueUrl"]
        sqs.send_message(QueueUrl=again, MessageBody="to the second 'again'")
        sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "7"})
        moto.restart(hard=True)
        second = moto.running()
        assert second is not None and second.pid != first.pid and moto.ready() is None
        got = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1).get("Messages", [])
        assert [m["Body"] for m in got] == ["stored before the kill"]
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["VisibilityTimeout"])["Attributes"]
        assert attrs["VisibilityTimeout"] == "7"
        got = sqs.receive_message(QueueUrl=again, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        assert [m["Body"] for m in got] == ["to the second 'again'"]
        sqs.close()
    finally:
        assert moto.stop() is True
    assert moto.running() is None


# --- endpoint resolution ---


@pytest.fixture
def fresh_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve from scratch, without Docker, and with no backend required."""
    monkeypatch.setattr(brokers, "_resolved", {})
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.delenv("MSGBUS_REQUIRE_BACKENDS", raising=False)


@pytest.mark.usefixtures("fresh_resolution")
def test_endpoint_from_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBUS_TEST_REDIS_URL", "redis://127.0.0.1:6999/3")
    found = brokers.endpoint("redis")
    assert (found.url, found.source, found.handle) == ("redis://127.0.0.1:6999/3", "env", None)
    with pytest.raises(LauncherError, match="cannot be restarted"):
        found.restart()


@pytest.mark.usefixtures("fresh_resolution")
def test_broker_own_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:8681")
    assert brokers.endpoint("pubsub").source == "env"


@pytest.mark.parametrize("name", brokers.DEFAULT_BROKERS)
@pytest.mark.usefixtures("fresh_resolution")
def test_local_endpoint_is_the_shared_broker(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing in the env, the endpoint is the shared local broker on its fixed port, restartable."""
    monkeypatch.delenv(f"MSGBUS_TEST_{name.upper()}_URL", raising=False)
    monkeypatch.setenv("MSGBUS_TEST_INSTALL", "1")
    found = brokers.endpoint(name)
    assert (found.url, found.source) == (brokers.get(name).url, "local")
    assert found.handle is not None
    assert brokers.get(name).ready() is None
    assert "guest:guest" not in repr(found)


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend whose launcher is only planned (every real one may be implemented by now)."""
    from integration import _launchers

    class Example(_launchers.PlannedBroker):
        name = "example"
        port = 1
        plan = "an example that is never written"

    monkeypatch.setitem(_launchers.LAUNCHERS, Example.name, Example)
    monkeypatch.delenv("MSGBUS_TEST_EXAMPLE_URL", raising=False)
    return Example.name


@pytest.mark.usefixtures("fresh_resolution")
def test_missing_backend_is_skipped_with_the_reason(planned: str) -> None:
    with pytest.raises(pytest.skip.Exception, match="example launcher not implemented yet"):
        brokers.endpoint(planned)


@pytest.mark.usefixtures("fresh_resolution")
def test_missing_required_backend_fails(monkeypatch: pytest.MonkeyPatch, planned: str) -> None:
    monkeypatch.setenv("MSGBUS_REQUIRE_BACKENDS", f"redis, {planned}")
    with pytest.raises(pytest.fail.Exception, match="required by MSGBUS_REQUIRE_BACKENDS"):
        brokers.endpoint(planned)
    with pytest.raises(BrokerUnavailable) as caught:
        brokers.resolve(planned)  # cached: the same answer without trying again
    assert caught.value.required


def test_required_parses_lists_and_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBUS_REQUIRE_BACKENDS", " rabbitmq ,redis")
    assert [brokers.required(n) for n in ("rabbitmq", "redis", "nats")] == [True, True, False]
    monkeypatch.setenv("MSGBUS_REQUIRE_BACKENDS", "all")
    assert brokers.required("kafka")
