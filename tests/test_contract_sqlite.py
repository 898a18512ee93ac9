"""The shipped contract suite against sqlite:// on a temporary database file (see docs/contract.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgbus.testing import ContractSuite


class TestSqliteContract(ContractSuite):
    @pytest.fixture
    def contract_url(self, tmp_path: Path) -> str:
        # A fresh file per test; a short lease so the lock-expiry checks take seconds, not minutes.
        return f"sqlite:///{tmp_path}/contract.db?visibility_timeout=1"
