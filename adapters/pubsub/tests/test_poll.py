"""``receive(n, timeout=0)`` is a poll: it answers at once, with what is ready.

``run()`` polls before each redelivery that runs alone (``msgbus._redelivery``). A Pull that finds nothing
waits server-side (pstest 0.5 s; the service up to the RPC deadline, ``pull_timeout``) unless it asks to
return immediately: without that, a consumer handed 16 messages by a stopped one paid the wait 16 times, and
the contract's "stop() hands back unstarted messages" found 8 of them still unhandled 4 s after stop().
Needs a Pub/Sub endpoint (the local pstest server); adapter defaults.
"""

from __future__ import annotations

import secrets
import time

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint, Record
from msgbus_pubsub import PubSubAdapter, create

pytestmark = [pytest.mark.integration]

POLLS = 10
EMPTY_PULL_WAIT = 0.5  # seconds pstest holds a Pull that finds nothing, unless it returns immediately


async def test_receive_with_timeout_zero_polls_without_waiting() -> None:
    from integration import brokers

    url = parse_url(brokers.endpoint("pubsub").url)
    reader = url.reader()
    adapter: PubSubAdapter = create(url, reader)
    reader.finish()
    await adapter.open()
    try:
        queue = Endpoint("queue", f"poll-{secrets.token_hex(4)}")
        await adapter.declare(queue)
        receiver = await adapter.receiver(queue, prefetch=100)
        started = time.monotonic()
        for _ in range(POLLS):
            assert await receiver.receive(10, 0.0) == []
        took = time.monotonic() - started
        # Waiting polls take POLLS * EMPTY_PULL_WAIT at least; half of that leaves room for a loaded machine.
        assert took < POLLS * EMPTY_PULL_WAIT / 2, f"{POLLS} polls of an empty subscription took {took:.2f}s"

        sent = [f"m{i}" for i in range(5)]
        await adapter.send(queue, [Record(b"x", i) for i in sent])
        got = await receiver.receive(10, 0.0)  # a poll still returns what is ready
        assert sorted(d.record.id for d in got) == sent
        await receiver.ack_many(got)
        assert await receiver.receive(10, 1.0) == []
        await receiver.close()
    finally:
        await adapter.close()
