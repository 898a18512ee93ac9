"""The msgbus contract suite: proves a backend keeps every promise, against any bus URL.

Run it from the command line (``msgbus contract URL [--quick] [--only NAME]``), from code
(``await run_contract(url)`` -> ``Report``), or from pytest by subclassing ``ContractSuite``
(imported lazily, so this package works without pytest). See docs/contract.md.
Helpers for a user's own tests (``wait_for_messages``, ``assert_sent``, ...) go with the pytest plugin
(``msgbus.testing.plugin``, loaded by pytest on its own); see docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._catalog import CHECKS
from ._context import ContractContext, ContractFailure, ContractSkip, Tally
from ._expect import assert_dead_lettered, assert_received, assert_sent, wait_for_messages
from ._registry import Check
from ._runner import CheckResult, Report, run_check, run_contract

if TYPE_CHECKING:
    from ._pytest import ContractSuite

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "ContractContext",
    "ContractFailure",
    "ContractSkip",
    "ContractSuite",
    "Report",
    "Tally",
    "assert_dead_lettered",
    "assert_received",
    "assert_sent",
    "run_check",
    "run_contract",
    "wait_for_messages",
]


def __getattr__(name: str) -> Any:
    if name == "ContractSuite":  # the only piece that needs pytest
        from ._pytest import ContractSuite

        return ContractSuite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
