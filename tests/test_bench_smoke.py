"""The benchmark harness works: tiny runs of every workload on memory:// and sqlite://, every message counted.

No timing is asserted; a run that loses, duplicates or mixes up a message raises ``LostMessages``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import msgbus
from msgbus._bench import (
    LostMessages,
    MsgbusContender,
    Plan,
    Tally,
    _report,
    _workloads,
    bench,
    drain,
    main,
    make_body,
    render_text,
)

MSGBUS = "msgbus._bench:MsgbusContender"
TINY = Plan(messages=200, single_messages=50, latency_messages=30, latency_rate=2000.0, runs=1, batch=50, concurrency=4)


def _cases(result: dict[str, Any]) -> set[tuple[str, str]]:
    assert all(f["runs"] and f["median"] > 0 for f in result["figures"]), result["figures"]
    return {(f["workload"], f["case"].split()[0]) for f in result["figures"]}


async def test_memory_every_workload() -> None:
    plan = replace(TINY, workloads=("publish", "latency", "pipeline"))
    result = await bench(f"memory://smoke-{uuid.uuid4().hex}", {"msgbus": MSGBUS}, plan, lambda _: None)
    assert _cases(result) == {
        ("publish", "single"),
        ("publish", "batch"),
        ("publish", "concurrent"),
        ("latency", "p50"),
        ("latency", "p99"),
        ("latency", "p99.9"),
        ("pipeline", "send+consume"),
    }
    assert "msgbus" in render_text(result)


async def test_sqlite_consume_and_pipeline_in_child_processes(tmp_path: Path) -> None:
    plan = replace(TINY, sizes=(1024,), modes=("batch",), workloads=("publish", "consume", "pipeline"))
    result = await bench(f"sqlite:///{tmp_path}/bench.db", {"msgbus": MSGBUS}, plan, lambda _: None)
    assert _cases(result) == {
        ("publish", "batch"),
        ("consume", "C=4"),
        ("rss", "peak"),
        ("pipeline", "send+consume"),
    }


async def test_consume_credit_is_named_in_the_case(tmp_path: Path) -> None:
    """``--prefetch N`` (Plan.prefetch) reaches the consuming process: its figures are their own cases."""
    plan = replace(TINY, sizes=(16,), workloads=("consume",), prefetch=64)
    result = await bench(f"sqlite:///{tmp_path}/bench.db", {"msgbus": MSGBUS}, plan, lambda _: None)
    cases = {(f["workload"], f["case"]) for f in result["figures"]}
    assert cases == {("consume", "C=4 prefetch 64 16 B"), ("rss", "peak of the consuming process prefetch 64")}
    assert all(len(f["runs"]) == 1 for f in result["figures"])


async def test_children_import_a_contender_from_where_the_parent_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contender package that is importable here but not installed (the repository's ``benchmarks``) reaches
    the consuming child process whatever the working directory is: no path is taken from it."""
    package = tmp_path / "code" / "peerbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "peer.py").write_text(
        "from msgbus._bench import MsgbusContender\n\n\nclass Peer(MsgbusContender):\n    name = 'peer'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.chdir(tmp_path)  # not where the package is
    plan = replace(TINY, sizes=(16,), workloads=("consume",))
    result = await bench(f"sqlite:///{tmp_path}/bench.db", {"peer": "peerbench.peer:Peer"}, plan, lambda _: None)
    assert {(f["contender"], f["workload"]) for f in result["figures"]} == {("peer", "consume"), ("peer", "rss")}


def test_tally_counts_loss_duplicates_and_strays() -> None:
    tally = Tally(7, 3)
    for i in (0, 1, 1):
        tally.add(make_body(7, i, 16))
    tally.add(make_body(8, 2, 16))  # another run's message
    assert (tally.distinct, tally.duplicates, tally.strays) == (2, 1, 1)
    with pytest.raises(LostMessages, match="lost 1, duplicates 1, strays 1"):
        tally.check("smoke")


async def test_a_lossy_run_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draining more than was sent stops after the idle timeout with LostMessages, not with a figure."""
    monkeypatch.setattr(_workloads, "IDLE_TIMEOUT", 0.3)
    contender = MsgbusContender(f"memory://smoke-{uuid.uuid4().hex}")
    await contender.open()
    try:
        await contender.publish("q", [make_body(1, i, 16) for i in range(5)], "batch", 10, 1)
        with pytest.raises(LostMessages, match="sent 6, received 5 distinct"):
            await drain(contender, "q", Tally(1, 6), 2, "smoke")
    finally:
        await contender.close()


def test_cli_entry(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["memory://", "--runs", "1", "--messages", "100", "--single-messages", "20", "--size", "16"]
    argv += ["--latency-messages", "20", "--latency-rate", "2000", "--concurrency", "2"]
    assert main(argv) == 0
    assert "pipeline" in capsys.readouterr().out


def test_asyncio_loop_is_left_clean() -> None:
    """The harness leaves no task behind (a stray task would warn, and warnings are errors here)."""

    async def one() -> int:
        contender = MsgbusContender(f"memory://smoke-{uuid.uuid4().hex}")
        await contender.open()
        await contender.publish("q", [make_body(3, i, 16) for i in range(20)], "batch", 10, 1)
        await drain(contender, "q", Tally(3, 20), 2, "smoke")
        await contender.close()
        return len(asyncio.all_tasks()) - 1

    assert asyncio.run(one()) == 0


def test_merge_replaces_the_remeasured_cases_only() -> None:
    """``benchmarks/bench.py --merge``: a re-measured case is replaced whole, other cases stay, and a contender
    new in the re-measurement joins the report."""
    from benchmarks.bench import merge

    def fig(workload: str, case: str, who: str, median: float) -> dict[str, Any]:
        return {"workload": workload, "case": case, "contender": who, "median": median, "runs": [median]}

    old = {
        "contenders": {"msgbus": "m", "kombu": "k"},
        "libraries": {"kombu": "5"},
        "figures": [
            fig("consume", "C=16 1 KiB", "msgbus", 1),
            fig("consume", "C=16 1 KiB", "kombu", 2),
            fig("publish", "single 16 B", "msgbus", 3),
        ],
        "notes": ["first"],
    }
    new = {
        "contenders": {"msgbus": "m", "aiormq": "a"},
        "libraries": {"aiormq": "7"},
        "figures": [fig("consume", "C=16 1 KiB", "msgbus", 4), fig("consume", "C=16 1 KiB", "aiormq", 5)],
        "machine": {"loadavg_start": [1.0], "loadavg_end": [1.5]},
        "plan": {"messages": 10, "prefetch": None},
        "started": "now",
    }
    merged = merge(old, new)
    assert sorted((f["case"], f["contender"], f["median"]) for f in merged["figures"]) == [
        ("C=16 1 KiB", "aiormq", 5),
        ("C=16 1 KiB", "msgbus", 4),
        ("single 16 B", "msgbus", 3),
    ]
    assert merged["contenders"] == {"msgbus": "m", "kombu": "k", "aiormq": "a"}
    assert merged["libraries"] == {"kombu": "5", "aiormq": "7"}
    assert merged["notes"] == ["first", "consume re-measured with 10 messages now (load 1.0 -> 1.5)"]


def test_msgbus_reports_the_adapter_and_client_library_versions() -> None:
    assert MsgbusContender("memory://x").versions() == {"msgbus": msgbus.__version__}
    if importlib.util.find_spec("msgbus_redis") is None:
        pytest.skip("the Redis adapter is not installed")
    found = MsgbusContender("redis://127.0.0.1").versions()
    assert {"msgbus", "msgbus-redis", "redis"} <= set(found)
    assert "hiredis" in found  # the extra the adapter depends on: its C parser is part of the figures


def test_contenders_option_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.bench import main as bench_main

    with pytest.raises(SystemExit) as exited:
        bench_main(["memory", "--smoke", "--contenders", "kombu"])
    assert exited.value.code == 2
    assert "no such contender for memory: kombu" in capsys.readouterr().err
    assert bench_main(["memory", "--smoke", "--workload", "publish", "--contenders", "msgbus"]) == 0
    assert "msgbus" in capsys.readouterr().out


@pytest.mark.parametrize(
    "url", ["redis://:s3cr3t@host:port/0?password=s3cr3t", "amqp://u:s3cr3t@host:port/?key=s3cr3t"]
)
def test_a_url_that_does_not_parse_is_shown_without_its_secrets(url: str) -> None:
    """It was shown as everything after the last '@', which kept secret options."""
    assert _report._redacted(url) == url.split("://")[0] + "://..."


class RefusesPerKey(MsgbusContender):
    """A backend whose adapter does not (yet) take ``ordering=per_key``: its bus refuses it when opened."""

    async def open(self) -> None:
        if "ordering=per_key" in self.url:
            raise msgbus.errors.CapabilityMissing("this backend cannot keep per-key order (ordering=per_key)")
        await super().open()


async def test_ordering_measures_both_options_side_by_side_and_per_key_keeps_order(tmp_path: Path) -> None:
    from benchmarks.render import section

    plan = replace(TINY, sizes=(1024,), workloads=("ordering",), ordering_messages=120, keys=8)
    for url in (f"memory://smoke-{uuid.uuid4().hex}", f"sqlite:///{tmp_path}/bench.db"):
        result = await bench(url, {"msgbus": MSGBUS}, plan, lambda _: None)
        got = {(f["case"], f["contender"]): f["runs"] for f in result["figures"]}
        assert set(got) == {(c, o) for c in ("C=4 8 keys 1 KiB", "out of key order, C=4 8 keys 1 KiB") for o in ORDER}
        assert all(rate > 0 for o in ORDER for rate in got[("C=4 8 keys 1 KiB", o)])
        assert got[("out of key order, C=4 8 keys 1 KiB", "per_key")] == [0]
        result.update(broker="memory", notes=[])
        assert "| C=4 8 keys 1 KiB | msgs/s |" in section(result) and "per_key/none" in section(result)
        assert "per_key" in render_text(result)


async def test_ordering_is_skipped_with_the_reason_where_per_key_is_refused() -> None:
    plan = replace(TINY, workloads=("ordering",), ordering_messages=20)
    result = await bench(f"memory://smoke-{uuid.uuid4().hex}", {"msgbus": f"{__name__}:RefusesPerKey"}, plan, print)
    assert result["figures"] == []
    assert result["skipped"] == [
        "ordering: ordering=per_key refused by this backend: this backend cannot keep per-key order (ordering=per_key)"
    ]


ORDER = ("none", "per_key")
