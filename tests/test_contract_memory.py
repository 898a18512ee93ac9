"""The shipped contract suite against memory:// (one test per promise; see docs/contract.md)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest

from msgbus import Message, _batch, _bus, _codec, _memory, _redrive, _reply, _runtime, _telemetry, _url, adapter
from msgbus.adapter import Endpoint, Record, dead_letter_record
from msgbus.errors import DecodeError
from msgbus.testing import ContractSuite, run_check
from msgbus.testing._runner import select


class TestMemoryContract(ContractSuite):
    # A namespace of its own, and a short lease so the lock-expiry checks take seconds, not minutes.
    url = f"memory://contract-{uuid.uuid4().hex[:8]}?visibility_timeout=1&dedup_window=60"


# The suite can fail: break one promise of the memory backend at a time and the check for it must say so.


async def _noop(*_args: object, **_kwargs: object) -> None:
    return None


def _forget_reason(record: Record, reason: str, attempts: int, source: Endpoint) -> Record:
    return _REAL_DEAD_LETTER_RECORD(record, "", attempts, source)


def _unordered_store(self: Any, ns: Any, *, ordered: bool, with_dead_letters: bool) -> None:
    _REAL_STORE_INIT(self, ns, ordered=False, with_dead_letters=with_dead_letters)


def _first_subscription_only(self: Any, endpoint: Endpoint) -> list[Any]:
    return _REAL_TARGETS(self, endpoint)[:1]


async def _receive_raising_on_unreadable(self: Any, max_messages: int, timeout: float) -> list[Any]:
    """A receiver that raises over one message it cannot read (Service Bus did), stranding its batch."""
    got = await _REAL_RECEIVE(self, max_messages, timeout)
    if any("x-msgbus-prior-attempts" in d.record.headers for d in got):
        raise DecodeError("malformed msgbus property")
    return got


def _decode_unguarded(delivery: Any, model: Any) -> Any:
    """Decoding that lets a RecursionError (JSON nested deeper than the recursion limit) escape, as it did."""
    try:
        return _REAL_DECODE_DELIVERY(delivery, model)
    except DecodeError as err:
        if "nested too deeply" in str(err):
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array") from None
        raise


async def _nack_unchecked(self: Message[Any], delay: float | None = None) -> None:
    if self._settle():
        await self._delivery.nack(delay)


def _no_ambiguity_check(rest: str) -> str:
    return ""


async def _send_dropping_foreign_headers(
    self: Any, endpoint: Endpoint, records: Any, delay: float | None = None
) -> None:
    """A backend that keeps only its own (``x-msgbus-``) headers, as a strict schema would."""
    kept = [replace(r, headers={k: v for k, v in r.headers.items() if k.startswith("x-msgbus-")}) for r in records]
    await _REAL_SEND(self, endpoint, kept, delay)


async def _send_without_ce_headers(self: Any, endpoint: Endpoint, records: Any, delay: float | None = None) -> None:
    """A backend that drops the CloudEvents binding's ``ce_`` headers, as a gateway filtering unknown prefixes."""
    kept = [replace(r, headers={k: v for k, v in r.headers.items() if not k.startswith("ce_")}) for r in records]
    await _REAL_SEND(self, endpoint, kept, delay)


async def _send_stripping_header_values(
    self: Any, endpoint: Endpoint, records: Any, delay: float | None = None
) -> None:
    """A backend that trims whitespace around header values, as some HTTP-style header stores do."""
    kept = [replace(r, headers={k: v.strip() for k, v in r.headers.items()}) for r in records]
    await _REAL_SEND(self, endpoint, kept, delay)


def _dead_letter_without_headers(record: Record, reason: str, attempts: int, source: Endpoint) -> Record:
    return _REAL_DEAD_LETTER_RECORD(replace(record, headers={}), reason, attempts, source)


def _no_context(msg: Any) -> None:
    return None


async def _dead_letter_unobserved(
    self: Any, endpoint: Endpoint, record: Record, attempt: int, reason: str, dead_letter: Any
) -> None:
    await dead_letter  # dead-lettered before any handler, with no span


def _redriven_as_dead(record: Record, subscription: str | None) -> Record:
    """Redrive that sends the dead letter back as it is: no history, its dead-letter headers still on."""
    return record


async def _redrive_without_removing(self: Message[Any]) -> None:
    """An ack that settles only messages outside the dead letters: redrive leaves every dead letter in place."""
    if self._settle() and not self._delivery._receiver._endpoint.dead_letter:  # type: ignore[attr-defined]
        await self._delivery.ack()


def _reply_to_the_longest_waiting(self: _reply.Replies, msg: Message[Any]) -> bool:
    """A listener that hands each reply to whichever request has waited longest, not to the one it answers."""
    if not self._waiting:
        return _REAL_DELIVER(self, msg)
    self._waiting.pop(next(iter(self._waiting))).set_result(msg)
    return True


async def _send_dropping_correlation_ids(
    self: Any, endpoint: Endpoint, records: Any, delay: float | None = None
) -> None:
    """A backend (or codec) that does not carry the correlation id."""
    await _REAL_SEND(self, endpoint, [replace(r, correlation_id=None) for r in records], delay)


_REAL_DELIVER = _reply.Replies.deliver


def _for_every_subscription(record: Record, endpoint: Endpoint) -> bool:
    """Subscribers that keep a sibling subscription's redriven dead letters: a redrive reaches them all."""
    return False


def _no_batch_failures(result: object, msgs: Any) -> dict[Message[Any], BaseException]:
    """A batch runtime that acks the whole batch on return, whatever the handler named as failed."""
    return {}


def _batch_twice_as_large(handler: Any, max_batch: int, max_wait: float) -> _batch.Batch:
    """A batch runtime that gathers twice ``max_batch`` messages."""
    return _batch.Batch(handler, 2 * max_batch, max_wait)


async def _release_by_dead_lettering(self: Any, deliveries: Any) -> None:
    """A stop that counts what it gives back so often that its buffer goes to the dead letters (RabbitMQ's
    ordered receiver did, once per stop, until the count passed max_attempts)."""
    for d in deliveries:
        await d.dead_letter("delivered 6 times without being settled (max_attempts=5)")


_REAL_DEAD_LETTER_RECORD = dead_letter_record
_REAL_RECEIVE = _memory._MemoryReceiver.receive
_REAL_DECODE_DELIVERY = _codec.decode_delivery
_REAL_STORE_INIT = _memory._Store.__init__
_REAL_TARGETS = _memory.MemoryAdapter._targets
_REAL_SEND = _memory.MemoryAdapter.send

BREAKAGES: dict[str, tuple[Any, str, Any, str]] = {
    "ack is a no-op": (_memory._MemoryDelivery, "ack", _noop, "ack removes"),
    "locks are never extended": (_memory._MemoryDelivery, "extend", _noop, "lock extended for long handlers"),
    "dead letters lose the reason": (_memory, "dead_letter_record", _forget_reason, "reject dead-letters with reason"),
    "keys are not ordered": (_memory._Store, "__init__", _unordered_store, "per-key ordering"),
    "a topic reaches one subscription": (_memory.MemoryAdapter, "_targets", _first_subscription_only, "fan-out"),
    "receive raises over one unreadable message": (
        _memory._MemoryReceiver,
        "receive",
        _receive_raising_on_unreadable,
        "undecodable payloads dead-lettered",
    ),
    "deep JSON escapes decoding": (_codec, "decode_delivery", _decode_unguarded, "undecodable payloads dead-lettered"),
    "dead-letter reasons are not cut": (adapter, "MAX_DEAD_LETTER_REASON", 10**9, "bad input raises typed errors"),
    "nack takes any delay": (Message, "nack", _nack_unchecked, "bad input raises typed errors"),
    "URLs split at the first '@'": (_url, "_authority", _no_ambiguity_check, "bad input raises typed errors"),
    "the backend drops headers it does not know": (
        _memory.MemoryAdapter,
        "send",
        _send_dropping_foreign_headers,
        "trace context survives the trip",
    ),
    "dead letters drop the original headers": (
        _memory,
        "dead_letter_record",
        _dead_letter_without_headers,
        "trace context survives the trip",
    ),
    "the consumer ignores the carried context": (
        _telemetry,
        "_extract",
        _no_context,
        "trace context survives the trip",
    ),
    "redrive forgets why they died": (
        _redrive,
        "redriven_record",
        _redriven_as_dead,
        "redrive returns every dead letter once",
    ),
    "redrive leaves the dead letters": (
        Message,
        "ack",
        _redrive_without_removing,
        "redrive returns every dead letter once",
    ),
    "the backend drops ce_ headers": (
        _memory.MemoryAdapter,
        "send",
        _send_without_ce_headers,
        "CloudEvents round-trip",
    ),
    "the backend trims header values": (
        _memory.MemoryAdapter,
        "send",
        _send_stripping_header_values,
        "CloudEvents round-trip",
    ),
    "replies go to the request that waited longest": (
        _reply.Replies,
        "deliver",
        _reply_to_the_longest_waiting,
        "a request gets exactly its reply",
    ),
    "the backend drops correlation ids": (
        _memory.MemoryAdapter,
        "send",
        _send_dropping_correlation_ids,
        "a request gets exactly its reply",
    ),
    "a subscription's redrive reaches every subscription": (
        _redrive,
        "for_other_subscription",
        _for_every_subscription,
        "redrive returns a subscription's dead letters to it alone",
    ),
    "undecodable messages are dead-lettered without a span": (
        _telemetry.Telemetry,
        "unhandled",
        _dead_letter_unobserved,
        "trace context survives the trip",
    ),
    "messages read with receive() get no span": (
        _telemetry.Telemetry,
        "received",
        lambda *_args: None,
        "trace context survives the trip",
    ),
    "run_batch acks what its handler failed by name": (
        _runtime,
        "failures",
        _no_batch_failures,
        "run_batch settles each message of a batch as told",
    ),
    "run_batch hands over batches over max_batch": (
        _bus,
        "Batch",
        _batch_twice_as_large,
        "run_batch settles each message of a batch as told",
    ),
    "a stop dead-letters its buffer": (
        _memory._MemoryReceiver,
        "release_many",
        _release_by_dead_lettering,
        "graceful shutdown",
    ),
    "keys are not ordered (batches)": (
        _memory._Store,
        "__init__",
        _unordered_store,
        "run_batch settles each message of a batch as told",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
async def test_a_broken_promise_fails_its_check(breakage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, attr, replacement, promise = BREAKAGES[breakage]
    monkeypatch.setattr(target, attr, replacement)
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)  # a sabotaged run is no result for the matrix
    (check,) = select(promise)
    url = f"memory://broken-{uuid.uuid4().hex[:8]}?visibility_timeout=0.5"
    result = await run_check(replace(check, deadline=8), url, quick=True)
    assert result.status == "fail", f"{breakage}: {promise} should fail but {result.status}: {result.detail}"
    print(f"{breakage} -> {promise}: {result.detail}")


async def test_graceful_shutdown_names_what_was_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages dead-lettered by a stop are named with their reason at once, not waited for until the deadline."""
    monkeypatch.setattr(_memory._MemoryReceiver, "release_many", _release_by_dead_lettering)
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)
    (check,) = select("graceful shutdown")
    result = await run_check(check, f"memory://broken-{uuid.uuid4().hex[:8]}", quick=True)
    assert result.status == "fail"
    assert "of the stopped consumers were dead-lettered instead" in result.detail, result.detail
    assert "delivered 6 times without being settled" in result.detail, result.detail
    assert "deadline" not in result.detail, result.detail
