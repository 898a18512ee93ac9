"""The shipped contract suite against sqlite:// on a temporary database file (see docs/contract.md)."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from msgbus.testing import ContractSuite, run_check
from msgbus.testing._runner import select


class TestSqliteContract(ContractSuite):
    @pytest.fixture
    def contract_url(self, tmp_path: Path) -> str:
        # A fresh file per test; a short lease so the lock-expiry checks take seconds, not minutes.
        return f"sqlite:///{tmp_path}/contract.db?visibility_timeout=1&dedup_window=60"


# The checks that kill a consumer process can fail: the consumer (a worker process) is broken one way at a
# time by tests/sabotage/sitecustomize.py, and the matching check must say so.

SABOTAGE = Path(__file__).resolve().parent / "sabotage"
WORKER_BREAKAGES = {
    "sqlite-ignores-expired-leases": "poison that kills its consumer",
    "redeliveries-in-arrival-order": "poison that kills its consumer",
    "acks-wait-for-the-buffer": "acks survive a crash",
    "sqlite-acks-on-next-receive": "acks survive a crash",
}


@pytest.mark.parametrize("breakage", list(WORKER_BREAKAGES))
async def test_a_broken_consumer_process_fails_its_check(
    breakage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    promise = WORKER_BREAKAGES[breakage]
    monkeypatch.setenv("MSGBUS_TEST_SABOTAGE", breakage)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(SABOTAGE), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)  # a sabotaged run is no result for the matrix
    (check,) = select(promise)
    result = await run_check(replace(check, deadline=30), f"sqlite:///{tmp_path}/broken.db?visibility_timeout=1")
    assert result.status == "fail", f"{breakage}: {promise} should fail but {result.status}: {result.detail}"
    print(f"{breakage} -> {promise}: {result.detail}")


async def test_the_poison_check_stops_its_last_worker_when_sigint_was_ignored(tmp_path: Path) -> None:
    """A shell's background job (a CI step under ``&``, nohup) starts with SIGINT ignored and its children inherit
    that; the poison check stops its last worker with SIGINT, so the worker must take it back."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        (check,) = select("poison that kills its consumer")
        result = await run_check(replace(check, deadline=30), f"sqlite:///{tmp_path}/bg.db?visibility_timeout=1")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.status == "pass", result.detail
