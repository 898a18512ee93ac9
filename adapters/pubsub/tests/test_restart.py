"""The local pstest server keeps what it acknowledged across a SIGKILL (its journal), and the adapter rides it.

This is what makes the contract's reconnect check mean something on a fake: here N messages are sent
with NO consumer running, the server is killed and started again, and exactly those N come back; sends
after the restart work without the caller doing anything. Needs the local launcher's server.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_pubsub import PubSubAdapter, create

pytestmark = [pytest.mark.integration]


async def test_sigkill_restart_keeps_unacked_messages_and_topology() -> None:
    from integration import brokers

    broker = brokers.endpoint("pubsub")
    if broker.handle is None:
        pytest.skip("the endpoint came from the environment: not ours to restart")
    url = parse_url(broker.url + "&ack_deadline=2")
    reader = url.reader()
    adapter: PubSubAdapter = create(url, reader)
    reader.finish()
    await adapter.open()
    try:
        queue = Endpoint("queue", f"restart-{secrets.token_hex(4)}")
        await adapter.declare(queue)
        n = 300
        await adapter.send(queue, [Record(f"before-{i}".encode(), f"b{i}") for i in range(n)])
        receiver = await adapter.receiver(queue, prefetch=1000)
        held = await receiver.receive(50, 5.0)  # delivered but unsettled when the server dies
        acked = await receiver.receive(50, 5.0)
        await receiver.ack_many(acked)
        assert held and acked

        await asyncio.to_thread(broker.restart, hard=True)

        await adapter.send(queue, [Record(f"after-{i}".encode(), f"a{i}") for i in range(n)])
        gone = {d.record.id for d in acked}
        want = {f"b{i}" for i in range(n)} - gone | {f"a{i}" for i in range(n)}
        seen: list[str] = []
        while len(set(seen)) < len(want):
            got = await receiver.receive(100, 10.0)
            assert got, f"only {len(set(seen))} of {len(want)} came back after the restart"
            seen += [d.record.id for d in got]
            await receiver.ack_many(got)
        assert set(seen) == want  # the acked ones stayed acked, everything else came back
        assert len(seen) == len(want), "duplicates"
        assert not await receiver.receive(100, 1.0)
        await receiver.close()
    finally:
        await adapter.close()
        brokers.release()
