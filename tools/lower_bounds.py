"""Each adapter at the lowest versions its pyproject allows (``make lower-bounds``): a throwaway venv per adapter
(``build/lower-bounds/<name>``) where uv installs the core and the adapter with ``--resolution lowest-direct``;
then the adapter's direct dependencies must be at their declared lower bounds, its broker-free unit tests
(test_codec.py, test_config.py) must pass there, and one contract check ("headers and ids round-trip") must pass
against the real broker, when there is one (required when ``MSGBUS_REQUIRE_BACKENDS`` names it, as in CI).

A lower bound nobody installs is a guess: a user with an older client library gets import errors or wrong
behaviour that no test saw. uv reaches the index pip is configured with (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``,
``PIP_CERT`` are passed on). Exit status 1 when any adapter fails.

usage: lower_bounds.py [--jobs N] [--no-broker] [ADAPTER ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "build" / "lower-bounds"
UNIT_TESTS = ("test_codec.py", "test_config.py")
TEST_TOOLS = ("pytest", "pytest-asyncio", "pytest-timeout", "hypothesis")  # at the dev extra's ranges
ROUND_TRIP = "headers and ids round-trip"
# google-api-core warns (FutureWarning) on import once Python 3.11 is within a year of its end of life (2027-10);
# 2.44 only within 90 days. A notice about the interpreter, not a defect of the adapter at its lower bound.
IGNORED_WARNINGS = ("ignore:You are using a Python version:FutureWarning",)
STEP_TIMEOUT = 300  # seconds for any one install, test run or round trip
# uv reads its own settings; the machine's pip settings name the index (and its certificate) everything uses
_UV_FROM_PIP = {
    "PIP_INDEX_URL": "UV_INDEX_URL",
    "PIP_EXTRA_INDEX_URL": "UV_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS": "UV_FIND_LINKS",
    "PIP_CERT": "SSL_CERT_FILE",
}


@dataclass
class Outcome:
    adapter: str
    lines: list[str] = field(default_factory=list)
    failed: bool = False
    seconds: float = 0.0

    def fail(self, line: str) -> None:
        self.failed = True
        self.lines.append(f"FAIL {line}")


def lower_bound(req: Requirement) -> Version | None:
    """The lowest version ``req`` allows (``>=``, ``~=``, ``==`` or ``==X.*``), or None when it sets none."""
    bounds = [Version(s.version.removesuffix(".*")) for s in req.specifier if s.operator in (">=", "~=", "==")]
    return max(bounds) if bounds else None


def _release(v: Version) -> tuple[int, ...]:
    return (*v.release, 0, 0)[: max(3, len(v.release))]


def _uv_env() -> dict[str, str]:
    env = dict(os.environ)
    for pip_name, uv_name in _UV_FROM_PIP.items():
        if env.get(pip_name) and not env.get(uv_name):
            env[uv_name] = env[pip_name]
    return env


def _run(out: Outcome, what: str, cmd: list[str], env: dict[str, str] | None = None) -> str | None:
    """Run ``cmd``; its output, or None (the failure and the output's tail recorded in ``out``)."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        out.fail(f"{what}: no result in {STEP_TIMEOUT}s")
        return None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        out.fail(f"{what} (exit {done.returncode}):\n    " + "\n    ".join(tail))
        return None
    return done.stdout


def _dev_specs() -> dict[str, str]:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return {Requirement(spec).name: spec for spec in dev}


def check_adapter(adapter: str, broker_url: str | None) -> Outcome:
    """Install ``adapter`` at its lower bounds in a fresh venv, check the versions, run its unit tests there, and
    (given a URL) one round trip through its broker."""
    out, started = Outcome(adapter), time.monotonic()
    try:
        _check(out, adapter, broker_url)
    finally:
        out.seconds = time.monotonic() - started
    return out


def _check(out: Outcome, adapter: str, broker_url: str | None) -> None:
    home = ROOT / "adapters" / adapter
    deps = [Requirement(d) for d in tomllib.loads((home / "pyproject.toml").read_text())["project"]["dependencies"]]
    venv = VENVS / adapter
    shutil.rmtree(venv, ignore_errors=True)
    python = str(venv / "bin" / "python")
    uv, env = [sys.executable, "-m", "uv"], _uv_env()
    if _run(out, "uv venv", [*uv, "venv", "-q", "--python", sys.executable, str(venv)], env) is None:
        return
    install = [*uv, "pip", "install", "-q", "--python", python]
    if _run(out, "install at lowest-direct", [*install, "--resolution", "lowest-direct", ".", str(home)], env) is None:
        return
    tools = _dev_specs()
    # The test tools at their newest, after the adapter: uv keeps what is installed when it satisfies them
    if _run(out, "install the test tools", [*install, *(tools[t] for t in TEST_TOOLS)], env) is None:
        return
    names = [d.name for d in deps]
    listed = _run(out, "read the versions", [python, "-c", _VERSIONS, *names])
    if listed is None:
        return
    installed = json.loads(listed)
    for req in deps:
        bound, got = lower_bound(req), Version(installed[req.name])
        if bound is not None and _release(got) != _release(bound):
            out.fail(f"{req}: lowest-direct installed {got}, not the lower bound {bound} (is {bound} on the index?)")
    out.lines.append("at " + ", ".join(f"{n}=={installed[n]}" for n in names))
    tests = [str(home / "tests" / t) for t in UNIT_TESTS if (home / "tests" / t).exists()]
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib", *tests]
    pytest += [f"-W{w}" for w in IGNORED_WARNINGS]
    result = _run(out, "unit tests", pytest)
    if result is not None:
        out.lines.append("unit tests: " + (result.strip().splitlines() or ["?"])[-1])
    if broker_url is not None:
        contract = [str(venv / "bin" / "msgbus"), "contract", broker_url, "--quick", "--only", ROUND_TRIP]
        if _run(out, f"round trip ({ROUND_TRIP})", contract) is not None:
            out.lines.append(f"round trip through the broker: {ROUND_TRIP} passed")


# Run by the venv's python: the installed version of each distribution named on the command line, as JSON
_VERSIONS = """import json, sys
from importlib.metadata import version
print(json.dumps({n: version(n) for n in sys.argv[1:]}))"""


def broker_urls(adapters: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """Each adapter's broker URL at defaults (None without a broker), and the brokers required but missing."""
    from integration.brokers import BrokerUnavailable, resolve
    from integration.contract_urls import at_defaults

    urls: dict[str, str | None] = {}
    missing = []
    for adapter in adapters:
        try:
            urls[adapter] = at_defaults(resolve(adapter))
        except BrokerUnavailable as exc:
            urls[adapter] = None
            print(f"lower-bounds: {adapter}: round trip skipped: {exc}", flush=True)
            if exc.required:
                missing.append(f"{adapter}: {exc.reason} (required by MSGBUS_REQUIRE_BACKENDS)")
    return urls, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="*", help="adapter names (default: every adapter under adapters/)")
    parser.add_argument("--jobs", type=int, default=3, help="adapters checked at once (default 3)")
    parser.add_argument("--no-broker", action="store_true", help="skip the round trips through the brokers")
    args = parser.parse_args()
    adapters = args.adapters or sorted(p.parent.name for p in ROOT.glob("adapters/*/pyproject.toml"))
    started = time.monotonic()
    sys.path.insert(0, str(ROOT))
    urls, missing = ({a: None for a in adapters}, []) if args.no_broker else broker_urls(adapters)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = []
        for outcome in pool.map(lambda a: check_adapter(a, urls[a]), adapters):
            outcomes.append(outcome)
            status = "FAIL" if outcome.failed else "ok"
            print(f"lower-bounds: {outcome.adapter}: {status} ({outcome.seconds:.0f}s)", flush=True)
            for line in outcome.lines:
                print(f"  {line}", flush=True)
    for line in missing:
        print(f"lower-bounds: FAIL {line}", flush=True)
    failed = [o.adapter for o in outcomes if o.failed] + [m.split(":")[0] for m in missing]
    summary = f"{len(adapters) - len(set(failed))} of {len(adapters)} adapters pass at their lower bounds"
    print(f"lower-bounds: {summary} in {time.monotonic() - started:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
