"""The pytest plugin as a user meets it: a test file of theirs, run by pytest in a subprocess (``pytester``),
on the default memory://, on the URL --msgbus-url / MSGBUS_TEST_URL names, and with the contract suite run on
their own adapter through its entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

USER_TESTS = """
import msgbus
from msgbus.testing import assert_dead_lettered, assert_sent, wait_for_messages


async def test_order_is_queued(bus):
    print("URL", bus.url)
    await bus.producer("orders").send({"id": 1})
    await bus.producer("orders").send({"id": 2})
    await assert_sent(bus, "orders", [{"id": 2}, {"id": 1}])


async def test_bad_order_is_dead_lettered(bus):
    await bus.producer("orders").send({"id": -1})
    async with bus.consumer("orders") as consumer:
        (msg,) = await consumer.receive(1, 5.0)
        await msg.reject("negative id")
    (dead,) = await assert_dead_lettered(bus, "orders", reason="negative id")
    assert dead.body == {"id": -1}


async def test_fan_out_reaches_a_subscription(bus):
    async with bus.subscriber("placed", subscription="billing") as sub:
        await bus.publisher("placed").publish("hello")
        (msg,) = await wait_for_messages(sub, 1)
        assert msg.body == "hello"


def test_blocking_code(sync_bus):
    sync_bus.producer("orders").send(b"x")
    (msg,) = sync_bus.consumer("orders").receive(1, 5.0)
    msg.ack()
    assert msg.body == b"x"
"""


@pytest.fixture
def user_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_a_users_suite_passes_on_the_default_memory_bus(user_suite: pytest.Pytester) -> None:
    result = user_suite.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*URL memory://*"])


def test_msgbus_url_runs_the_same_suite_on_another_backend(user_suite: pytest.Pytester, tmp_path: Path) -> None:
    db = tmp_path / "user.db"
    result = user_suite.runpytest_subprocess("-s", "-p", "no:cacheprovider", f"--msgbus-url=sqlite:///{db}")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"*URL sqlite:///{db}*"])
    assert db.exists()


def test_msgbus_test_url_from_the_environment(
    user_suite: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "env.db"
    monkeypatch.setenv("MSGBUS_TEST_URL", f"sqlite:///{db}")
    result = user_suite.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"*URL sqlite:///{db}*"])


def test_tests_on_the_default_bus_never_see_each_others_messages(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        from msgbus.testing import assert_sent

        async def test_leaves_a_message(bus):
            await bus.producer("orders").send("left over")

        async def test_sees_only_its_own(bus):
            await bus.producer("orders").send("mine")
            await assert_sent(bus, "orders", ["mine"])
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_wait_that_times_out_fails_with_what_arrived(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        from msgbus.testing import assert_dead_lettered, assert_sent

        async def test_waits_for_two(bus):
            await bus.producer("orders").send({"id": 1})
            await assert_sent(bus, "orders", [{"id": 1}, {"id": 2}], timeout=0.5)

        async def test_wrong_body(bus):
            await bus.producer("orders").send({"id": 3})
            await assert_sent(bus, "orders", [{"id": 4}], timeout=2)

        async def test_no_dead_letter(bus):
            await assert_dead_lettered(bus, "orders", timeout=0.3)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    out = result.stdout.str()
    assert "E       AssertionError: waited 0.5 s for 2 message(s) from <Consumer queue:orders on memory://" in out
    assert "got 1: [{'id': 1}]" in out
    assert "expected [{'id': 4}] (any order), got [{'id': 3}]; missing [{'id': 4}], unexpected [{'id': 3}]" in out
    assert "waited 0.3 s for 1 message(s) from <Consumer queue:orders (dead letters) on memory://" in out
    assert "_expect.py" not in out, "the helper's own frames are hidden"


def test_the_contract_suite_runs_on_a_users_own_adapter(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter of docs/writing-an-adapter.md, found through its entry point as a user's installed package
    would be, proved by a ``ContractSuite`` subclass whose URL comes from --msgbus-url."""
    site = pytester.mkdir("site")
    shutil.copy(EXAMPLES / "toy_adapter.py", site / "toy_adapter.py")
    dist = site / "msgbus_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: msgbus-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[msgbus.adapters]\ntoy = toy_adapter:create\n")
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest
        from msgbus.testing import ContractSuite

        class TestToyContract(ContractSuite):
            quick = True

            @pytest.fixture
            def contract_url(self, msgbus_url):
                return msgbus_url
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)  # not a backend of the matrix
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rs", "--msgbus-url=toy://plugin", "-k", "durable_send or fan_out or delayed"
    )
    result.assert_outcomes(passed=2, skipped=1)  # the toy claims no delayed delivery
    result.stdout.fnmatch_lines(["*delayed_delivery*"])
