"""The worked example of docs/writing-an-adapter.md is a real adapter: the contract suite passes on it, and
fails on it once one of its promises is broken."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from msgbus import _registry
from msgbus.testing import run_contract

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The example adapter, registered for ``toy://`` as its entry point would register it."""
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)  # an example, not a backend of the matrix
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setitem(_registry._registered(), "toy", "toy_adapter:create")
    import toy_adapter

    return toy_adapter


def test_the_guide_adapter_keeps_the_contract(toy: Any) -> None:
    report = asyncio.run(run_contract("toy://guide-contract", quick=True, jobs=4))
    assert report.ok, report.table()
    skipped = {r.promise: r.detail for r in report.results if r.status == "skip"}
    # What it does not claim, each skipped with the capability's name (and nothing else skipped).
    assert skipped == {
        "lock extended for long handlers": "lock_extension",
        "per-key ordering": "ordering",
        "delayed delivery": "delayed_delivery",
        "poison that kills its consumer": "cross_process, counts_deliveries",
        "acks survive a crash": "cross_process",
        "reconnect after broker restart": "restartable, persistence",
        "a send retried with the same id is delivered once": "dedup_window",
    }, report.table()
    assert report.count("pass") == len(report.results) - len(skipped) >= 19


def test_the_contract_catches_a_receiver_that_keeps_what_it_held(toy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def close_and_forget(self: Any) -> None:
        self.closed = True
        self.held.clear()  # the unsettled deliveries are never given back: lost

    monkeypatch.setattr(toy.ToyReceiver, "close", close_and_forget)
    only = ["only the unacked come back after close or crash"]
    report = asyncio.run(run_contract("toy://guide-broken", quick=True, only=only))
    [result] = report.results
    assert result.status == "fail" and "were not back" in result.detail, report.table()
