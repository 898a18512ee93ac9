"""pytest face of the contract suite: subclass ``ContractSuite``, set a URL, get one test per promise."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

import pytest

from ._catalog import CHECKS
from ._registry import Check
from ._runner import CheckResult, Report, run_check, run_contract

JOBS_ENV = "MSGBUS_CONTRACT_JOBS"

__all__ = ["ContractSuite"]


class ContractSuite:
    """Base class of an adapter's contract test; pytest collects its ``Test*`` subclasses.

    The URL comes from, in order: a ``contract_url`` fixture the subclass defines (e.g. from a provisioning
    helper), ``get_url()`` overridden as a classmethod, or the ``url`` class attribute. Define
    ``async def restart_broker(self) -> None`` to enable the reconnect check. ``quick = True`` (or the
    environment variable ``MSGBUS_CONTRACT_QUICK=1``) scales volumes down. ``jobs = N`` (or, when the class
    sets none, ``MSGBUS_CONTRACT_JOBS=N``) runs the selected checks N at a time in the background, as ``msgbus contract
    --jobs N`` does (a check that restarts the broker alone, after the others); each test reports its own
    check, and a rerun of a test runs its check again on its own.
    """

    url: ClassVar[str | None] = None
    quick: ClassVar[bool] = False
    jobs: ClassVar[int | None] = None
    restart_broker: Callable[..., Awaitable[None]] | None = None

    @classmethod
    def get_url(cls) -> str | None:
        """The URL under test (override for URLs computed at test time)."""
        return cls.url

    @pytest.fixture
    def contract_url(self) -> str:
        url = self.get_url()
        if not url:
            pytest.fail(f"{type(self).__name__}: set url, override get_url(), or define a contract_url fixture")
        return url

    def _quick(self) -> bool:
        return self.quick or os.environ.get("MSGBUS_CONTRACT_QUICK", "") not in ("", "0")

    def _jobs(self) -> int:
        if self.jobs is not None:  # the suite knows what its broker takes
            return max(1, self.jobs)
        raw = os.environ.get(JOBS_ENV, "")
        if not raw:
            return 1
        if not raw.isdigit() or int(raw) < 1:
            pytest.fail(f"{JOBS_ENV}={raw!r}: expected a whole number >= 1", pytrace=False)
        return int(raw)

    def run_contract_check(self, check: Check, url: str, selected: list[Check] | None = None) -> None:
        """Run ``check`` (or take its result from the background batch of ``selected`` checks, when jobs > 1);
        a skip becomes ``pytest.skip``, a failure ``pytest.fail``."""
        hook = self.restart_broker
        jobs = self._jobs()
        batch = _Batch.of(type(self), url, selected, jobs, self._quick(), hook) if selected and jobs > 1 else None
        result = batch.take(check) if batch is not None else None
        if result is None:  # alone, not in the batch, or a rerun (the batch result was taken)
            if batch is not None:  # a rerun: not beside the batch's last check, which may restart the broker
                batch.wait()
            result = asyncio.run(run_check(check, url, quick=self._quick(), restart_broker=hook))
        if result.status == "skip":
            pytest.skip(f"{check.name}: {result.detail}")
        if result.status == "fail":
            pytest.fail(f"{check.name}: {result.detail}", pytrace=False)


class _Batch:
    """The selected checks of one suite class and URL, run by ``run_contract`` ``jobs`` at a time in a thread of
    their own; each test takes its check's result as it ends."""

    _started: ClassVar[dict[tuple[type, str], _Batch]] = {}

    def __init__(self, checks: list[Check]) -> None:
        self._results: dict[str, CheckResult] = {}
        self._done = {c.name: threading.Event() for c in checks}

    @classmethod
    def of(
        cls,
        suite: type,
        url: str,
        checks: list[Check],
        jobs: int,
        quick: bool,
        hook: Callable[..., Awaitable[None]] | None,
    ) -> _Batch:
        key = (suite, url)
        if key not in cls._started:
            batch = cls._started[key] = cls(checks)
            only = [c.name for c in checks]
            job = run_contract(url, quick=quick, restart_broker=hook, only=only, jobs=jobs, on_result=batch._ended)
            threading.Thread(target=batch._run, args=(job,), name="msgbus-contract-batch", daemon=True).start()
        return cls._started[key]

    def _ended(self, result: CheckResult) -> None:
        self._results[result.promise] = result
        self._done[result.promise].set()

    def _run(self, job: Coroutine[Any, Any, Report]) -> None:
        try:
            asyncio.run(job)
        finally:  # a check without a result is run by its test itself
            for done in self._done.values():
                done.set()

    def wait(self) -> None:
        """Until every check of the batch ended (the one that restarts the broker runs last, alone)."""
        for done in self._done.values():
            done.wait()

    def take(self, check: Check) -> CheckResult | None:
        """``check``'s result once it ran (None if it is not in the batch or was taken before)."""
        done = self._done.get(check.name)
        if done is None:
            return None
        done.wait()
        return self._results.pop(check.name, None)


def _make_test(check: Check) -> Callable[[ContractSuite, str, pytest.FixtureRequest], None]:
    def test(self: ContractSuite, contract_url: str, request: pytest.FixtureRequest) -> None:
        selected = None
        if self._jobs() > 1:  # the batch runs what this run selected of the class, not the whole catalogue
            items = request.session.items
            mine = {item.name.split("[")[0] for item in items if getattr(item, "cls", None) is type(self)}
            selected = [c for c in CHECKS if f"test_{c.slug}" in mine]
        self.run_contract_check(check, contract_url, selected)

    test.__name__ = test.__qualname__ = f"test_{check.slug}"
    test.__doc__ = check.doc
    return test


def _install(cls: Any) -> None:
    for check in CHECKS:
        setattr(cls, f"test_{check.slug}", _make_test(check))


_install(ContractSuite)
