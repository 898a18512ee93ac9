"""Service B of the outbox end-to-end test, as a process the test SIGKILLs and restarts at random.

``python -m integration._outbox_service`` with ``MSGBUS_URL`` (the middle broker), ``E2E_DB`` (B's PostgreSQL),
``E2E_QUEUE`` and ``E2E_RUN`` in the environment (never in argv: the process list is world-readable). Each
order event is applied as one row in ``e2e_effects``, written through the inbox's transaction; the table has
no unique key, so an event applied twice shows as two rows. Prints ``READY`` once consuming; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import asyncpg

import msgbus
from msgbus.inbox import PostgresInbox


async def serve() -> None:
    run, queue = os.environ["E2E_RUN"], os.environ["E2E_QUEUE"]
    pool = await asyncpg.create_pool(os.environ["E2E_DB"], min_size=1, max_size=6)
    inbox = PostgresInbox(pool, name=queue, table="e2e_inbox")

    async def apply(msg: msgbus.Message[Any]) -> None:
        await inbox.connection().execute(
            "INSERT INTO e2e_effects (run, order_id, message_id) VALUES ($1, $2, $3)", run, msg.body["order"], msg.id
        )

    async with msgbus.connect(os.environ["MSGBUS_URL"]) as bus:
        consumer = bus.consumer(queue)
        await consumer.open()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
        print("READY", flush=True)
        await consumer.run(apply, concurrency=4, middleware=[inbox])
    await pool.close()


if __name__ == "__main__":
    asyncio.run(serve())
