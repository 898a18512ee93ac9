"""Health and the operator commands on the embedded backends: ping, readiness, msgbus redrive/dlq/purge/stats."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import msgbus
from msgbus.cli import main
from msgbus.errors import ClosedError, ConfigError


async def test_ping_and_readiness_follow_the_consumer(tmp_path: Path) -> None:
    async with msgbus.connect(f"sqlite:///{tmp_path}/bus.db") as bus:
        assert await bus.ping(timeout=5) >= 0
        with pytest.raises(ConfigError):
            await bus.ping(timeout=-1)
        consumer = bus.consumer("q")
        assert not consumer.ready  # not running yet
        handled = asyncio.Event()

        async def handle(msg: msgbus.Message[object]) -> None:
            handled.set()

        task = asyncio.create_task(consumer.run(handle))
        await bus.producer("q").send("x")
        await asyncio.wait_for(handled.wait(), 10)
        assert consumer.ready
        consumer.stop()
        await task
        assert not consumer.ready
    with pytest.raises(ClosedError):
        await bus.ping()


def dead_letters(url: str, n: int) -> list[str]:
    async def make() -> list[str]:
        async with msgbus.connect(url) as bus:
            ids = await bus.producer("orders").send_many([f"order \x1b[31m{i}" for i in range(n)])
            consumer = bus.consumer("orders", prefetch=n)
            for msg in await consumer.receive(n, timeout=2):
                await msg.reject(f"no stock\x1b]0;pwned\x07 for {msg.body}")
            await consumer.close()
            return ids

    return asyncio.run(make())


def test_dlq_list_redrive_stats_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    ids = dead_letters(url, 5)
    assert main(["stats", url, "orders", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orders"] == {"depth": 0, "in_flight": 0, "dead_letters": 5}
    assert main(["dlq", "list", url, "orders"]) == 0
    out = capsys.readouterr().out
    # The reason was made storable when it died (U+FFFD); the body's escape sequence is shown escaped.
    assert all(i in out for i in ids) and "no stock" in out and "order \\x1b[31m" in out and "\x1b" not in out
    assert main(["redrive", url, "orders", "--dry-run"]) == 0
    assert "5 dead letter(s)" in capsys.readouterr().out
    assert main(["redrive", url, "orders", "--limit", "2"]) == 0
    assert "moved 2 dead letter(s)" in capsys.readouterr().out
    assert main(["redrive", url, "orders"]) == 0
    assert "moved 3 dead letter(s)" in capsys.readouterr().out
    assert main(["stats", url, "orders"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:4] == ["orders", "5", "0", "0"]
    assert main(["purge", url, "orders", "--yes"]) == 0
    assert "removed 5 waiting" in capsys.readouterr().out
    assert main(["stats", url, "orders", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orders"]["depth"] == 0


def test_purge_without_a_terminal_or_yes_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    assert main(["purge", url, "orders"]) == 2
    assert "confirm on a terminal, or pass --yes" in capsys.readouterr().err


def test_stats_of_a_backend_without_figures_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from msgbus import _memory

    async def nothing(self: object, endpoint: object) -> None:
        return None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_memory.MemoryAdapter, "stats", nothing)
        assert main(["stats", "memory://", "orders"]) == 2
    assert "reports no queue figures" in capsys.readouterr().err
