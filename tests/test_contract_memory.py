"""The shipped contract suite against memory:// (one test per promise; see docs/contract.md)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest

from msgbus import _memory
from msgbus.adapter import Endpoint, Record, dead_letter_record
from msgbus.testing import ContractSuite, run_check
from msgbus.testing._runner import select


class TestMemoryContract(ContractSuite):
    # A namespace of its own, and a short lease so the lock-expiry checks take seconds, not minutes.
    url = f"memory://contract-{uuid.uuid4().hex[:8]}?visibility_timeout=1"


# The suite can fail: break one promise of the memory backend at a time and the check for it must say so.


async def _noop(*_args: object, **_kwargs: object) -> None:
    return None


def _forget_reason(record: Record, reason: str, attempts: int, source: Endpoint) -> Record:
    return _REAL_DEAD_LETTER_RECORD(record, "", attempts, source)


def _unordered_store(self: Any, ns: Any, *, ordered: bool, with_dead_letters: bool) -> None:
    _REAL_STORE_INIT(self, ns, ordered=False, with_dead_letters=with_dead_letters)


def _first_subscription_only(self: Any, endpoint: Endpoint) -> list[Any]:
    return _REAL_TARGETS(self, endpoint)[:1]


_REAL_DEAD_LETTER_RECORD = dead_letter_record
_REAL_STORE_INIT = _memory._Store.__init__
_REAL_TARGETS = _memory.MemoryAdapter._targets

BREAKAGES: dict[str, tuple[Any, str, Any, str]] = {
    "ack is a no-op": (_memory._MemoryDelivery, "ack", _noop, "ack removes"),
    "locks are never extended": (_memory._MemoryDelivery, "extend", _noop, "lock extended for long handlers"),
    "dead letters lose the reason": (_memory, "dead_letter_record", _forget_reason, "reject dead-letters with reason"),
    "keys are not ordered": (_memory._Store, "__init__", _unordered_store, "per-key ordering"),
    "a topic reaches one subscription": (_memory.MemoryAdapter, "_targets", _first_subscription_only, "fan-out"),
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
