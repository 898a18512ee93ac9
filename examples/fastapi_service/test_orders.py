"""The service end to end, in-process through httpx's ASGI transport: ``pytest`` here runs it on memory://, and
``pytest --msgbus-url redis://127.0.0.1:6379/0`` runs the same test on Redis (msgbus's pytest plugin)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from orders_api import app
from orders_worker import QUEUE

import msgbus
from msgbus.testing import wait_for_messages


async def exercise(url: str, monkeypatch: pytest.MonkeyPatch, orders: int = 20) -> None:
    """``orders`` good orders are all processed, a malformed one is refused with 422 and never queued, and one
    the worker cannot fill is dead-lettered with the worker's reason; nothing else happens to any of them."""
    monkeypatch.setenv("MSGBUS_URL", url)
    run = uuid.uuid4().hex[:8]  # a real broker may hold earlier runs' messages: this run's orders are its own
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
            placed = []
            for i in range(orders):
                answer = await client.post("/orders", json={"item": f"{run}-{i}", "quantity": i + 1})
                assert answer.status_code == 202, answer.text
                placed.append(answer.json()["id"])
            refused = await client.post("/orders", json={"item": "x", "quantity": 0})
            assert refused.status_code == 422
            bad = (await client.post("/orders", json={"item": "unobtainium", "quantity": 1})).json()["id"]

            async with asyncio.timeout(30):
                pending = set(placed)
                while pending:
                    for order_id in list(pending):
                        got = await client.get(f"/orders/{order_id}")
                        if got.status_code == 200:
                            assert got.json()["status"] == "processed"
                            pending.discard(order_id)
                    await asyncio.sleep(0.05)
            assert sorted(app.state.status[i]["item"] for i in placed) == sorted(f"{run}-{i}" for i in range(orders))

            bus: msgbus.Bus = app.state.bus
            async with bus.dead_letters(QUEUE) as dead_letters:
                dead = await wait_for_messages(dead_letters, 1, timeout=30)
                while dead[0].id != bad:  # an earlier run's dead letter: consumed, then ours
                    dead = await wait_for_messages(dead_letters, 1, timeout=30)
            assert "OutOfStock: no unobtainium in stock" in dead[0].headers[msgbus.HEADER_DEAD_LETTER_REASON]
            assert (await client.get(f"/orders/{bad}")).status_code == 404
            assert not app.state.status.keys() & {bad}


async def test_orders_flow_end_to_end(msgbus_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await exercise(msgbus_url, monkeypatch)
