"""Closing the adapter while a send is retrying (the service down) ends that send with an error, not never.

The library's ``PublisherClient.stop()`` does not wait for the batches it commits. Closing the channel right
after it killed the commit thread still retrying ("ValueError: Cannot invoke RPC on closed channel!",
unhandled), and the send awaiting that batch never returned. Runs its own pstest server (it is killed here),
on a free port, so nothing shared stops.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus.errors import ConnectionLost
from msgbus_pubsub import PubSubAdapter, create

pytestmark = [pytest.mark.integration]

PUBLISH_TIMEOUT = 3.0


@pytest.fixture
def own_pstest() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    from integration import brokers  # before _pubsub: it imports the launchers, which import _pubsub
    from integration._pubsub import SERVER, probe

    assert brokers

    if not SERVER.up_to_date():
        SERVER.build()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(SERVER.binary), "-addr", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (problem := probe("127.0.0.1", port)) is not None:
            assert time.monotonic() < deadline, f"own pstest did not start: {problem}"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}", server
    finally:
        server.kill()
        server.wait()


async def test_close_during_a_retried_send_ends_the_send_and_its_thread(
    own_pstest: tuple[str, subprocess.Popen[bytes]],
) -> None:
    host, server = own_pstest
    thread_errors: list[BaseException | None] = []
    hook, threading.excepthook = threading.excepthook, lambda args: thread_errors.append(args.exc_value)
    try:
        url = parse_url(f"pubsub://msgbus-test?emulator_host={host}&publish_timeout={PUBLISH_TIMEOUT}")
        reader = url.reader()
        adapter: PubSubAdapter = create(url, reader)
        reader.finish()
        await adapter.open()
        queue = Endpoint("queue", "closing")
        await adapter.declare(queue)
        await adapter.send(queue, [Record(b"before", "before")])
        server.kill()
        server.wait()
        send = asyncio.ensure_future(adapter.send(queue, [Record(b"during", "during")]))
        await asyncio.sleep(0.5)  # its batch is committing, retried against a dead server
        assert not send.done()
        await adapter.close()
        async with asyncio.timeout(PUBLISH_TIMEOUT + 5):  # it hung for good before
            with pytest.raises(ConnectionLost):
                await send
    finally:
        threading.excepthook = hook
    assert thread_errors == []
