"""How the Service Bus receiver completes the runtime's batched acks and gives back a stopping consumer's buffer
(msgbus_servicebus/_receiver.py), against a recording stand-in for the SDK receiver: one ``$management``
update-disposition for those the current SDK receiver received, one ``complete_message`` each for the rest or when
that request fails; a ``released`` disposition each for a buffer given back (no delivery counted), an abandon where
that fails. What the service does with them is the contract suite's business (integration/test_contract_servicebus.py,
on the sbbroker test double)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import azure.servicebus.exceptions as sb
import pytest

from msgbus.adapter import Endpoint, Record
from msgbus.errors import BrokerError
from msgbus_servicebus._receiver import ServiceBusDelivery, ServiceBusReceiverAdapter


class FakeMessage:
    def __init__(self, delivery_id: int = 0) -> None:
        self.lock_token = str(uuid.uuid4())
        self._delivery_tag = uuid.UUID(self.lock_token).bytes_le
        self._delivery_id = delivery_id


class FakeSdk:
    """Records settlements; ``fail_together`` makes the management request fail, ``lost`` tokens fail alone."""

    def __init__(self, fail_together: bool = False, lost: frozenset[str] = frozenset()) -> None:
        self.fail_together = fail_together
        self.lost = lost
        self.together: list[tuple[str, list[str]]] = []
        self.alone: list[str] = []
        self.abandoned: list[str] = []
        self.dispositions: list[tuple[int, bytes, str]] = []
        self.refuse_release = False
        self._handler = SimpleNamespace(
            _link=SimpleNamespace(_received_delivery_tags=set()), settle_messages_async=self._disposition
        )

    async def _disposition(self, delivery_id: int, delivery_tag: bytes, outcome: str) -> None:
        if self.refuse_release:
            raise sb.ServiceBusConnectionError(message="link detached")
        self.dispositions.append((delivery_id, delivery_tag, outcome))

    async def abandon_message(self, message: FakeMessage) -> None:
        self.abandoned.append(message.lock_token)

    async def _settle_message_via_mgmt_link(self, status: str, tokens: list[str]) -> None:
        self.together.append((status, tokens))
        if self.fail_together:
            raise sb.MessageLockLostError(message="one of the locks is lost")

    async def complete_message(self, message: FakeMessage) -> None:
        self.alone.append(message.lock_token)
        if message.lock_token in self.lost:
            raise sb.MessageLockLostError(message="lock lost")

    async def close(self) -> None:
        pass


class FakeLink:
    def __init__(self, sdk: FakeSdk) -> None:
        self.options: Any = None
        self.secrets: tuple[str | None, ...] = ()
        self.sdk = sdk

    def sdk_receiver(self, endpoint: Endpoint) -> Any:
        return self.sdk

    async def send_messages(self, name: str, messages: list[Any], delay: float | None) -> None:
        raise AssertionError("not here")

    def forget(self, receiver: ServiceBusReceiverAdapter) -> None:
        pass


def deliveries(receiver: ServiceBusReceiverAdapter, sdk: FakeSdk, n: int) -> list[ServiceBusDelivery]:
    out = [ServiceBusDelivery(receiver, sdk, Record(b"x", f"m{i}"), 1, FakeMessage(i)) for i in range(n)]  # type: ignore[arg-type]
    sdk._handler._link._received_delivery_tags |= {d.raw._delivery_tag for d in out}  # unsettled on the link
    return out


def tokens(ds: list[ServiceBusDelivery]) -> list[str]:
    return [d.raw.lock_token for d in ds]


async def test_a_batch_is_completed_with_one_request() -> None:
    sdk = FakeSdk()
    receiver = ServiceBusReceiverAdapter(FakeLink(sdk), Endpoint("queue", "q"))  # type: ignore[arg-type]
    batch = deliveries(receiver, sdk, 5)
    await receiver.ack_many(batch)
    assert sdk.together == [("completed", tokens(batch))]
    assert sdk.alone == []
    assert sdk._handler._link._received_delivery_tags == set()  # the link keeps nothing per completed message


async def test_deliveries_of_a_replaced_sdk_receiver_are_completed_through_it_one_by_one() -> None:
    old, new = FakeSdk(), FakeSdk()
    receiver = ServiceBusReceiverAdapter(FakeLink(new), Endpoint("queue", "q"))  # type: ignore[arg-type]
    before, after = deliveries(receiver, old, 2), deliveries(receiver, new, 3)
    await receiver.ack_many([*before, *after])
    assert (old.together, old.alone) == ([], tokens(before))
    assert (new.together, new.alone) == ([("completed", tokens(after))], [])


async def test_a_failed_request_falls_back_to_one_by_one_and_raises_the_first_lost_lock() -> None:
    batch_tokens: list[str] = []
    sdk = FakeSdk(fail_together=True)
    receiver = ServiceBusReceiverAdapter(FakeLink(sdk), Endpoint("queue", "q"))  # type: ignore[arg-type]
    batch = deliveries(receiver, sdk, 4)
    batch_tokens = tokens(batch)
    sdk.lost = frozenset(batch_tokens[1:2])
    with pytest.raises(BrokerError):
        await receiver.ack_many(batch)
    assert sdk.together == [("completed", batch_tokens)]
    assert sdk.alone == batch_tokens  # each tried, the lost one did not stop the others


async def test_a_single_ack_is_a_plain_complete() -> None:
    sdk = FakeSdk()
    receiver = ServiceBusReceiverAdapter(FakeLink(sdk), Endpoint("queue", "q"))  # type: ignore[arg-type]
    (one,) = deliveries(receiver, sdk, 1)
    await receiver.ack_many([one])
    assert (sdk.together, sdk.alone) == ([], [one.raw.lock_token])


async def test_a_stopping_consumers_buffer_is_released_not_abandoned() -> None:
    """``released`` counts no delivery on Service Bus; an abandon would (a handed-back message comes back a suspect,
    and ten stops would dead-letter it unhandled). Those of a replaced SDK receiver went with its connection."""
    old, sdk = FakeSdk(), FakeSdk()
    receiver = ServiceBusReceiverAdapter(FakeLink(sdk), Endpoint("queue", "q"))  # type: ignore[arg-type]
    before, batch = deliveries(receiver, old, 2), deliveries(receiver, sdk, 3)
    await receiver.release_many([*before, *batch])
    assert sdk.dispositions == [(d.raw._delivery_id, d.raw._delivery_tag, "released") for d in batch]
    assert (sdk.abandoned, sdk.together, old.dispositions, old.abandoned) == ([], [], [], [])


async def test_a_release_that_fails_is_an_abandon() -> None:
    sdk = FakeSdk()
    sdk.refuse_release = True
    receiver = ServiceBusReceiverAdapter(FakeLink(sdk), Endpoint("queue", "q"))  # type: ignore[arg-type]
    (one,) = deliveries(receiver, sdk, 1)
    await receiver.release_many([one])
    assert (sdk.dispositions, sdk.abandoned) == ([], [one.raw.lock_token])
