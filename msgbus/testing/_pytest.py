"""pytest face of the contract suite: subclass ``ContractSuite``, set a URL, get one test per promise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from ._catalog import CHECKS
from ._registry import Check
from ._runner import run_check

__all__ = ["ContractSuite"]


class ContractSuite:
    """Base class of an adapter's contract test; pytest collects its ``Test*`` subclasses.

    The URL comes from, in order: a ``contract_url`` fixture the subclass defines (e.g. from a provisioning
    helper), ``get_url()`` overridden as a classmethod, or the ``url`` class attribute. Define
    ``async def restart_broker(self) -> None`` to enable the reconnect check. ``quick = True`` (or the
    environment variable ``MSGBUS_CONTRACT_QUICK=1``) scales volumes down.
    """

    url: ClassVar[str | None] = None
    quick: ClassVar[bool] = False
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

    def run_contract_check(self, check: Check, url: str) -> None:
        """Run ``check`` in a fresh event loop; a skip becomes ``pytest.skip``, a failure ``pytest.fail``."""
        hook = self.restart_broker
        result = asyncio.run(run_check(check, url, quick=self._quick(), restart_broker=hook))
        if result.status == "skip":
            pytest.skip(f"{check.name}: {result.detail}")
        if result.status == "fail":
            pytest.fail(f"{check.name}: {result.detail}", pytrace=False)


def _make_test(check: Check) -> Callable[[ContractSuite, str], None]:
    def test(self: ContractSuite, contract_url: str) -> None:
        self.run_contract_check(check, contract_url)

    test.__name__ = test.__qualname__ = f"test_{check.slug}"
    test.__doc__ = check.doc
    return test


def _install(cls: Any) -> None:
    for check in CHECKS:
        setattr(cls, f"test_{check.slug}", _make_test(check))


_install(ContractSuite)
