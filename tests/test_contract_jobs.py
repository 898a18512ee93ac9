"""``ContractSuite`` with ``jobs > 1``: checks run at once in the background, each test reports its own check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from msgbus.testing._runner import RESULTS_ENV

SUITE = """
import atexit

import msgbus.testing._pytest as runner
import msgbus.testing._runner as runner_core
from msgbus import _memory
from msgbus.testing import ContractSuite

_run_check, _active = runner.run_check, [0, 0]


async def _counted(*args, **kwargs):  # how many checks run at once, written to most.txt at exit
    _active[0] += 1
    _active[1] = max(_active[1], _active[0])
    try:
        return await _run_check(*args, **kwargs)
    finally:
        _active[0] -= 1


runner.run_check = _counted  # a check the test runs itself
runner_core.run_check = _counted  # the checks the background batch (run_contract) runs
atexit.register(lambda: open("most.txt", "w").write(str(_active[1])))

_record = _memory.dead_letter_record


def _forgetful(record, reason, attempts, source):
    return _record(record, "" if not getattr(_memory, "healed", False) else reason, attempts, source)


if {broken}:  # dead letters lose their reason (until a test failed): breaks "reject dead-letters with reason"
    _memory.dead_letter_record = _forgetful


class TestJobs(ContractSuite):
    url = "memory://jobs?visibility_timeout=1"
    quick = True
    jobs = {jobs}
"""
# After the first failure the backend is fixed: a rerun that runs the check again passes, a stale result fails.
CONFTEST = """
def pytest_runtest_logreport(report):
    if report.when == "call" and report.outcome in ("failed", "rerun"):
        from msgbus import _memory
        _memory.healed = True
"""
PICKED = "reject_dead_letters or ack_removes or batches or headers_and_ids or nack_redelivers"


def _run(tmp_path: Path, *, broken: bool, jobs: int, extra: tuple[str, ...] = ()) -> tuple[dict[str, str], int]:
    """The outcome (PASSED, FAILED, RERUN...) of each picked test of a generated suite, and how many of their
    checks ran at once at most."""
    module = tmp_path / f"test_suite_{broken}_{jobs}.py"
    module.write_text(SUITE.format(broken=broken, jobs=jobs))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    argv = [sys.executable, "-m", "pytest", str(module), "-q", "-rAR", "-p", "no:cacheprovider", "-k", PICKED, *extra]
    env = {k: v for k, v in os.environ.items() if k != RESULTS_ENV}  # these runs are no memory:// contract results
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=240, check=False, env=env)
    outcomes: dict[str, str] = {}
    for line in done.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "RERUN") and "::test_" in rest:
            name = rest.split("::")[-1].split(" ")[0]
            outcomes[name] = outcomes.get(name, "") + word[0]  # P, F, R in the order pytest reported them
    assert outcomes, done.stdout[-3000:] + done.stderr[-2000:]
    return outcomes, int((tmp_path / "most.txt").read_text())


def test_each_test_reports_its_own_check(tmp_path: Path) -> None:
    healthy, most = _run(tmp_path, broken=False, jobs=4)
    assert set(healthy.values()) == {"P"} and len(healthy) == 5, healthy
    assert most == 4, f"at most {most} checks ran at once with jobs=4"
    assert _run(tmp_path, broken=False, jobs=1)[1] == 1
    broken, _ = _run(tmp_path, broken=True, jobs=4)
    assert broken.pop("test_reject_dead_letters_with_reason") == "F", "the broken promise fails its own test"
    assert set(broken.values()) == {"P"} and len(broken) == 4, f"the other checks' results moved: {broken}"


def test_a_rerun_runs_its_check_again(tmp_path: Path) -> None:
    rerun, _ = _run(tmp_path, broken=True, jobs=4, extra=("--reruns", "1"))
    outcome = rerun.pop("test_reject_dead_letters_with_reason")
    assert outcome[0] == "R" and set(outcome[1:]) == {"P"}, f"the rerun reused the failed result: {outcome}"
    assert set(rerun.values()) == {"P"} and len(rerun) == 4, rerun
