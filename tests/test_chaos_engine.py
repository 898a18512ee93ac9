"""The failure suite's engine (integration/_chaos.py) can fail: on sqlite://, a "broker" that drops acknowledged
messages mid-stream is caught as lost with a hang, and a declared limit of a test double is reported as a
limit only while it really loses something. The real faults run against real brokers in integration/."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from integration import _chaos
from integration._chaos import Scenario, Target, run_scenario
from integration._toxiproxy import Toxiproxy

N = 200


@pytest.fixture(autouse=True)
def _short_calm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds of calm before and after the fault: the brokers' suite needs them, these checks do not."""
    monkeypatch.setattr(_chaos, "WARM_UP", 0.3)
    monkeypatch.setattr(_chaos, "TAIL", 0.3)


def _target() -> Target:
    return Target(Toxiproxy("http://127.0.0.1:9"), ())  # no proxies: nothing is asked of Toxiproxy


async def _nothing(target: Target) -> str:
    await asyncio.sleep(0.5)
    return "no fault"


def _dropping(db: Path, count: int) -> Scenario:
    async def drop(target: Target) -> str:
        await asyncio.sleep(0.5)  # a backlog builds up: the consumer takes half the send rate
        with sqlite3.connect(db) as conn:
            conn.execute(
                "DELETE FROM msgbus_messages WHERE seq IN "
                "(SELECT seq FROM msgbus_messages WHERE lease IS NULL ORDER BY seq LIMIT ?)",
                (count,),
            )
        return f"{count} stored messages dropped"

    return Scenario("drop", drop, 1.5, backlog=True)


async def test_a_clean_run_passes_with_exact_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    outcome = await run_scenario(
        "sqlite", url, Scenario("none", _nothing, 1.0), _target(), messages=N, send_bound=10, recover_bound=10
    )
    assert (outcome.status, outcome.sent, outcome.delivered, outcome.lost) == ("pass", N, N, 0), outcome.line()
    assert outcome.problems == []


async def test_acknowledged_messages_dropped_by_the_broker_are_lost_and_fail(tmp_path: Path) -> None:
    db = tmp_path / "bus.db"
    outcome = await run_scenario(
        "sqlite", f"sqlite:///{db}", _dropping(db, 10), _target(), messages=N, send_bound=10, recover_bound=2
    )
    assert outcome.status == "fail", outcome.line()
    assert outcome.sent == N and outcome.lost == 10 and outcome.delivered == N - 10, outcome.line()
    assert any(p.startswith("hang: 10 sent messages not delivered") for p in outcome.problems), outcome.line()


async def test_a_declared_limit_is_reported_only_while_it_loses(tmp_path: Path) -> None:
    db = tmp_path / "bus.db"
    lossy = await run_scenario(
        "sqlite",
        f"sqlite:///{db}",
        _dropping(db, 5),
        _target(),
        messages=N,
        send_bound=10,
        recover_bound=2,
        limit="keeps messages in memory",
    )
    assert (lossy.status, lossy.lost) == ("limit", 5), lossy.line()
    assert lossy.detail.startswith("limit of the double: keeps messages in memory")
    clean = await run_scenario(
        "sqlite",
        f"sqlite:///{tmp_path}/other.db",
        Scenario("none", _nothing, 1.0),
        _target(),
        messages=N,
        send_bound=10,
        recover_bound=10,
        limit="keeps messages in memory",
    )
    assert clean.status == "fail" and clean.lost == 0, clean.line()
    assert any("the limit is stale" in p for p in clean.problems)
