"""Promise 11 at SPI level: the broker restarts mid-traffic; nothing acked-as-sent is lost.

Needs a broker this test may restart: the local launcher's (``integration.brokers``), or, with
``MSGBUS_TEST_RABBITMQ_URL``, a command in ``MSGBUS_TEST_RABBITMQ_RESTART_CMD`` that restarts that broker
and returns once it serves again.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from msgbus.adapter import Endpoint, Record
from msgbus.errors import ConnectionLost, MsgbusError
from msgbus_rabbitmq import RabbitMQAdapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _restarter(broker: Any) -> Callable[[], None]:
    command = os.environ.get("MSGBUS_TEST_RABBITMQ_RESTART_CMD")
    if command:
        return lambda: subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=300)
    if getattr(broker, "handle", None) is None:
        pytest.skip("broker cannot be restarted: set MSGBUS_TEST_RABBITMQ_RESTART_CMD or use the local launcher")
    return lambda: broker.restart()


async def test_broker_restart_loses_nothing_acked_as_sent(
    broker: Any, adapter: RabbitMQAdapter, names: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    restart = _restarter(broker)
    ep = Endpoint("queue", names("q"))
    await adapter.declare(ep)
    receiver = await adapter.receiver(ep, prefetch=20)
    confirmed: list[str] = []
    failed: list[str] = []
    received: Counter[str] = Counter()
    stop_sending = asyncio.Event()

    async def consume() -> None:
        while True:
            for d in await receiver.receive(20, 0.5):
                received[d.record.id] += 1
                try:
                    await d.ack()
                except ConnectionLost:
                    pass  # the channel died first: the broker redelivers it (counted as a duplicate)

    async def send_during_restart() -> None:
        i = 0
        while not stop_sending.is_set():
            msg_id = f"during-{i}"
            i += 1
            try:
                await adapter.send(ep, [Record(b"x", msg_id)])
            except MsgbusError:
                failed.append(msg_id)  # raised: not acked-as-sent, so it may or may not arrive
            else:
                confirmed.append(msg_id)
            await asyncio.sleep(0.02)

    before = [Record(b"x", f"before-{i}") for i in range(50)]
    await adapter.send(ep, before)
    confirmed.extend(r.id for r in before)
    consumer = asyncio.create_task(consume())
    sender = asyncio.create_task(send_during_restart())
    await asyncio.sleep(0.2)
    await asyncio.to_thread(restart)
    after = [Record(b"x", f"after-{i}") for i in range(50)]
    await adapter.send(ep, after)  # waits for the reconnect (send_timeout), then must succeed
    confirmed.extend(r.id for r in after)
    stop_sending.set()
    await sender

    async def all_arrived() -> None:
        while not set(confirmed) <= set(received):
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(all_arrived(), 60)
    except TimeoutError:
        pass
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await receiver.close()

    lost = set(confirmed) - set(received)
    dups = sum(received.values()) - len(received)
    with capsys.disabled():
        print(
            f"\nrabbitmq restart: {len(confirmed)} acked-as-sent, {len(set(confirmed) & set(received))} received, "
            f"{len(lost)} lost, {dups} duplicate deliveries, {len(failed)} sends raised during the outage"
        )
    assert not lost, f"lost {len(lost)} acked-as-sent messages, e.g. {sorted(lost)[:3]}"
    assert set(received) <= set(confirmed) | set(failed)  # nothing that was never sent
    assert len(confirmed) > 100  # the sender kept going across the restart
