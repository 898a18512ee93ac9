"""How the SQS receiver sizes its calls (msgbus_sqs/_receiver.py), against a recording stand-in for the client:
a receive tops up in whole batches of 10 (a call costs the same for 2 messages as for 10), and the runtime's
batched acks become delete batches of 10 whose failures are raised once every batch was tried. What SQS does
with the calls is the contract suite's business (integration/test_contract_sqs.py), on moto."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus.errors import BrokerError
from msgbus_sqs._config import read_options
from msgbus_sqs._receiver import SqsReceiver
from msgbus_sqs._topology import Resolved

URL = "https://sqs.example/q"


class FakeSqs:
    """Records each call's size; holds ``available`` messages; ``refuse`` receipt handles fail on delete."""

    def __init__(self, available: int, refuse: frozenset[str] = frozenset()) -> None:
        self.available = available
        self.refuse = refuse
        self.receives: list[int] = []
        self.waits: list[int] = []
        self.deletes: list[int] = []
        self._n = itertools.count()

    async def receive_message(self, *, MaxNumberOfMessages: int, WaitTimeSeconds: int, **_: Any) -> dict[str, Any]:
        self.receives.append(MaxNumberOfMessages)
        self.waits.append(WaitTimeSeconds)
        n = min(MaxNumberOfMessages, self.available)
        self.available -= n
        await asyncio.sleep(0)
        return {"Messages": [self._message() for _ in range(n)]}

    def _message(self) -> dict[str, Any]:
        i = next(self._n)
        return {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": "eA==", "Attributes": {}}

    async def delete_message_batch(self, *, Entries: list[dict[str, str]], **_: Any) -> dict[str, Any]:
        self.deletes.append(len(Entries))
        failed = [
            {"Id": e["Id"], "Code": "X", "SenderFault": True} for e in Entries if e["ReceiptHandle"] in self.refuse
        ]
        return {"Failed": failed}


class FakeLink:
    def __init__(self, sqs: FakeSqs, query: str = "") -> None:
        parsed = parse_url(f"sqs://us-east-1?wait_time=1{query}")
        self.options = read_options(parsed, parsed.reader())
        self.sqs = sqs

    async def resolve(self, endpoint: Endpoint) -> Resolved:
        return Resolved(URL, URL + "-dlq", None)

    async def recover(self, endpoint: Endpoint, where: Resolved) -> None:
        raise AssertionError("not here")

    async def send_raw(self, queue_url: str, record: Any) -> None:
        raise AssertionError("not here")

    def forget(self, receiver: SqsReceiver) -> None:
        pass


@pytest.mark.parametrize(
    ("room", "available", "calls", "got"),
    [
        (32, 1000, [10, 10, 10], 30),  # the remainder of 2 waits for the next receive
        (40, 1000, [10, 10, 10, 10], 40),
        (5, 1000, [5], 5),  # less than a batch: asked as is
        (32, 14, [10, 10, 10], 14),  # the queue ran dry in the top-up (its two calls go out at once)
        (32, 7, [10], 7),  # not full: no top-up
    ],
)
async def test_a_receive_tops_up_in_whole_batches(room: int, available: int, calls: list[int], got: int) -> None:
    sqs = FakeSqs(available)
    receiver = SqsReceiver(FakeLink(sqs), Endpoint("queue", "q"))
    out = await receiver.receive(room, 1.0)
    assert (sqs.receives, len(out)) == (calls, got)
    assert len({d.record.id for d in out}) == got


async def test_a_backlog_is_taken_in_one_round_without_a_long_poll() -> None:
    """After a full fetch the next one makes its calls at once without waiting (one round trip, not three in a
    row); a round that comes back short ends the backlog, and the receive after it long-polls again."""
    sqs = FakeSqs(65)
    receiver = SqsReceiver(FakeLink(sqs), Endpoint("queue", "q"))
    assert len(await receiver.receive(32, 1.0)) == 30
    assert (sqs.receives, sqs.waits) == ([10, 10, 10], [1, 0, 0])  # a long poll, then a round of two at once
    assert len(await receiver.receive(32, 1.0)) == 30
    assert (sqs.receives[3:], sqs.waits[3:]) == ([10, 10, 10], [0, 0, 0])  # the backlog: one round of three
    assert len(await receiver.receive(32, 1.0)) == 5  # short: the backlog is gone
    assert len(await receiver.receive(32, 1.0)) == 0
    assert sqs.waits[6:] == [0, 0, 0, 1]  # the next receive waits for messages again


async def test_a_backlog_that_is_gone_falls_back_to_the_long_poll() -> None:
    sqs = FakeSqs(30)
    receiver = SqsReceiver(FakeLink(sqs), Endpoint("queue", "q"))
    assert len(await receiver.receive(32, 1.0)) == 30
    assert await receiver.receive(32, 1.0) == []
    assert sqs.waits == [1, 0, 0, 0, 0, 0, 1]  # the round got nothing: the same receive long-polls


async def test_acks_go_out_in_batches_of_ten_and_every_failure_waits_for_the_rest() -> None:
    sqs = FakeSqs(25, refuse=frozenset({"r3"}))
    receiver = SqsReceiver(FakeLink(sqs), Endpoint("queue", "q"))
    deliveries = await receiver.receive(30, 1.0)
    assert len(deliveries) == 25  # 10 + 10 + 5: the queue ran dry
    with pytest.raises(BrokerError, match="ack on queue:q failed: X"):
        await receiver.ack_many(deliveries)
    assert sqs.deletes == [10, 10, 5]  # every batch went out, though the first had a failure
    await receiver.ack_many([])
    assert sqs.deletes == [10, 10, 5]
    await receiver.close()
