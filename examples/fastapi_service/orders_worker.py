"""The worker: takes orders off the ``orders`` queue, handles them, and publishes ``order-processed``.

Runs inside the API process (``WORKER_IN_PROCESS=1``, the default) or on its own, as many as you like:
``MSGBUS_URL=... python orders_worker.py``. Which broker is the URL's business alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field

import msgbus

QUEUE = "orders"
PROCESSED = "order-processed"  # topic: one event per handled order
RETRY = msgbus.RetryPolicy(max_attempts=3, initial_backoff=0.1)


class Order(BaseModel):
    """What ``POST /orders`` accepts and what travels on ``orders``."""

    item: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=1, le=1000)


class OutOfStock(Exception):
    """A permanent failure: after ``RETRY.max_attempts`` the order is dead-lettered with this reason."""


def make_handler(bus: msgbus.Bus) -> msgbus.Handler:
    processed = bus.publisher(PROCESSED)

    async def handle(msg: msgbus.Message[Any]) -> None:  # return = ack, raise = retry, then dead-letter
        order: Order = msg.body
        if order.item == "unobtainium":
            raise OutOfStock(f"no {order.item} in stock")
        await processed.publish({"order_id": msg.id, "item": order.item, "quantity": order.quantity})

    return handle


async def run_worker(bus: msgbus.Bus, concurrency: int = 8) -> None:
    """Handle orders until cancelled (or ``consumer.stop()``); in-flight orders finish first."""
    consumer = bus.consumer(QUEUE, model=Order, retry=RETRY)
    await consumer.run(make_handler(bus), concurrency=concurrency)


async def main() -> None:
    async with msgbus.connect() as bus:  # MSGBUS_URL, else msgbus.toml, else sqlite:///./msgbus.db
        await run_worker(bus)


if __name__ == "__main__":
    asyncio.run(main())
