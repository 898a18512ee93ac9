"""Declaring subscriptions of topics created a moment ago, many at once: the cluster metadata may not list a new
topic's partitions yet, and the subscription's starting offsets need them (an empty commit used to escape as a
bare ValueError; 3 of 19 contract checks run at once hit it)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import msgbus
from integration.brokers import endpoint

pytestmark = pytest.mark.integration

TOPICS = 24


async def test_subscriptions_of_new_topics_declared_at_once_all_start_at_the_end() -> None:
    run = uuid.uuid4().hex[:8]
    topics = [f"declare-{run}-{i}" for i in range(TOPICS)]
    async with msgbus.connect(endpoint("kafka").url) as bus:
        subscribers = [bus.subscriber(t, subscription="s") for t in topics]
        await asyncio.gather(*(s.open() for s in subscribers))  # raised ValueError for some before the fix
        ids = await asyncio.gather(*(bus.publisher(t).publish({"t": t}) for t in topics))
        for subscriber, msg_id in zip(subscribers, ids, strict=True):
            got: list[msgbus.Message[object]] = []
            while not got:
                got = await subscriber.receive(timeout=5.0)
            assert [m.id for m in got] == [msg_id]  # published after open(): each subscription has it
            await got[0].ack()
