"""The API: ``POST /orders`` queues an order and answers 202 with its id; ``GET /orders/{id}`` says whether a
worker has processed it (learnt from the ``order-processed`` topic, so workers may run in other processes).

``uvicorn orders_api:app``; the broker is ``MSGBUS_URL`` (docs: README.md beside this file).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from orders_worker import PROCESSED, QUEUE, Order, run_worker

import msgbus


async def _track(sub: msgbus.Subscriber[Any], status: dict[str, dict[str, Any]]) -> None:
    async for msg in sub:
        status[msg.body["order_id"]] = msg.body
        await msg.ack()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One bus for the app's life: opened before the first request, closed after the last."""
    async with msgbus.connect(os.environ.get("MSGBUS_URL")) as bus:
        # One subscription per API instance would be needed to run several; one is enough for the example.
        sub = bus.subscriber(PROCESSED, subscription="orders-api")
        await sub.open()  # exists before any order is handled: every event after this reaches it
        app.state.bus, app.state.status = bus, {}
        tasks = [asyncio.create_task(_track(sub, app.state.status))]
        if os.environ.get("WORKER_IN_PROCESS", "1") == "1":
            tasks.append(asyncio.create_task(run_worker(bus)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sub.close()


app = FastAPI(title="orders", lifespan=lifespan)


@app.post("/orders", status_code=202)
async def place_order(order: Order, request: Request) -> dict[str, str]:
    """Queue the order; the answer comes once the broker has it (msgbus's durable send)."""
    order_id = await request.app.state.bus.producer(QUEUE).send(order)
    return {"id": order_id, "status": "queued"}


@app.get("/orders/{order_id}")
async def order_status(order_id: str, request: Request) -> dict[str, Any]:
    """``processed`` with what the worker reported, or 404 while it is not (yet)."""
    done = request.app.state.status.get(order_id)
    if done is None:
        raise HTTPException(404, f"order {order_id} is not processed (yet)")
    return {"id": order_id, "status": "processed", **done}
