"""``bus.ping()`` on every broker: a real round trip when the broker is there; a typed error within its timeout when
the port is closed or when a listener accepts and never answers (a hung broker, a black-holing proxy)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest

import msgbus
from integration.brokers import Endpoint
from integration.contract_urls import at_defaults
from msgbus.errors import ConnectionLost, MsgbusError

SECRET = "pingsecret9"  # in every URL below; must never reach an error message
TIMEOUT = 2.0  # the ping's own timeout
GUARD = 30.0  # a ping that outlives this has hung: the test fails with TimeoutError, not a msgbus error

# The same adapters, pointed at a port of this test's choosing.
URLS: dict[str, Callable[[int], str]] = {
    "rabbitmq": lambda port: f"amqp://guest:{SECRET}@127.0.0.1:{port}/",
    "redis": lambda port: f"redis://:{SECRET}@127.0.0.1:{port}/0",
    "kafka": lambda port: f"kafka://127.0.0.1:{port}",
    "pubsub": lambda port: f"pubsub://test-project?emulator_host=127.0.0.1:{port}",
    "sqs": lambda port: (
        f"sqs://us-east-1?endpoint_url=http://127.0.0.1:{port}&access_key_id=testing&secret_access_key={SECRET}"
    ),
    "servicebus": lambda port: f"servicebus://RootManageSharedAccessKey:{SECRET}@127.0.0.1:{port}?emulator=true",
    "nats": lambda port: f"nats://msgbus:{SECRET}@127.0.0.1:{port}",
    "postgresql": lambda port: f"postgresql://msgbus:{SECRET}@127.0.0.1:{port}/postgres",
}


@pytest.mark.parametrize("backend", list(URLS))
async def test_ping_answers(broker_url: Callable[[str], Endpoint], backend: str) -> None:
    async with msgbus.connect(at_defaults(broker_url(backend))) as bus:
        took = await bus.ping(timeout=10.0)
        again = await bus.ping(timeout=10.0)  # open already: the round trip alone
    print(f"{backend}: first ping (with connect) {took * 1000:.1f} ms, then {again * 1000:.1f} ms")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound, then let go."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


@pytest.mark.parametrize("backend", list(URLS))
async def test_ping_of_a_closed_port_fails_typed(backend: str, closed_port: int) -> None:
    err = await failed_ping(URLS[backend](closed_port))
    print(f"{backend}: {type(err).__name__}: {err}")


@pytest.mark.parametrize("backend", list(URLS))
async def test_ping_of_a_listener_that_never_answers_times_out(backend: str) -> None:
    held: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        err = await failed_ping(URLS[backend](port))
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert held, "the client never connected to the silent listener"
    assert isinstance(err, ConnectionLost), f"{type(err).__name__}: {err}"
    print(f"{backend}: {len(held)} connection(s) accepted and left unanswered -> {err}")


async def failed_ping(url: str) -> MsgbusError:
    """The typed error ``ping`` raises for ``url`` (within the guard, the secret nowhere in it)."""
    bus = msgbus.connect(url)
    try:
        async with asyncio.timeout(GUARD):
            with pytest.raises(MsgbusError) as info:
                await bus.ping(timeout=TIMEOUT)
    finally:
        await bus.close()
    err = info.value
    shown = f"{err} {err.__cause__ or ''} {err!r}"
    assert SECRET not in shown
    return err
