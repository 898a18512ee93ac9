"""The demo's numbers are exact and consistent on both embedded backends: lost == 0, every event fanned out."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest

import msgbus
from msgbus import _demo
from msgbus.cli import main


def expected(orders: int) -> dict[str, int]:
    """What a run of ``orders`` orders must report, from the demo's own failure rules."""
    ids = range(1, orders + 1)
    poison = sum(_demo.is_poison(i) for i in ids)
    flaky = sum(_demo.is_flaky(i) and not _demo.is_poison(i) for i in ids)
    return {
        "processed": orders - poison,
        "recovered": flaky,
        "retried": flaky + poison * (_demo.RETRY.max_attempts - 1),
        "dead_lettered": poison,
    }


def check(result: _demo.DemoResult, orders: int) -> None:
    want = expected(orders)
    assert result.sent == orders
    assert result.processed == want["processed"]
    assert result.recovered == want["recovered"]
    assert result.retried == want["retried"]
    assert result.dead_lettered == want["dead_lettered"]
    assert result.sent - result.processed - result.dead_lettered == 0
    assert result.lost_orders == 0 and result.lost == 0
    assert result.published == result.processed
    assert result.received == dict.fromkeys(_demo.SUBSCRIPTIONS, result.published)
    assert result.lost_events == dict.fromkeys(_demo.SUBSCRIPTIONS, 0)
    assert result.duplicates == 0
    poison_ids = [i for i in range(1, orders + 1) if _demo.is_poison(i)]
    assert [order_id for order_id, _ in result.dead_letters] == poison_ids
    for order_id, why in result.dead_letters:
        assert why == (
            f"after {_demo.RETRY.max_attempts} attempts: PaymentDeclined: card declined for order {order_id}"
        )


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'demo.db'}"


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_demo_counts_are_exact(backend: str, tmp_path: Path) -> None:
    url = f"memory://demo-{uuid.uuid4().hex[:8]}" if backend == "memory" else sqlite_url(tmp_path)
    result = await _demo.run(url, orders=60, workers=4)
    check(result, 60)
    assert result.stale == 0
    assert expected(60) == {"processed": 58, "recovered": 6, "retried": 10, "dead_lettered": 2}


async def test_rerun_on_the_same_database_does_not_mix(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    check(await _demo.run(url, orders=30, workers=2), 30)
    # A leftover from somebody else: acked and counted as stale, never as one of this run's orders.
    async with msgbus.connect(url) as bus:
        await bus.producer("orders").send(_demo.Order("another-run", 1, "customer-1", 100))
    second = await _demo.run(url, orders=30, workers=2)
    check(second, 30)
    assert second.stale == 1


def test_demo_command_summary(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://demo-{uuid.uuid4().hex[:8]}"
    assert main(["demo", "--url", url, "--orders", "60", "--workers", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"msgbus demo on {url}: 60 orders, 3 workers" in out
    assert "lost = 0  ->  OK: nothing lost" in out
    assert "dead letters (2 of 2 shown)" in out and "order 17: after 3 attempts: PaymentDeclined" in out


def test_demo_default_uses_a_fresh_sqlite_file_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--orders", "20"]) == 0
    out = capsys.readouterr().out
    assert f"msgbus demo on sqlite:///{tmp_path}/msgbus-demo-" in out
    assert "sent 20/20 | processed 19 |" in out  # progress lines when stdout is not a terminal
    assert "lost = 0  ->  OK: nothing lost" in out
    assert list(tmp_path.iterdir()) == []
