"""Every long command draws one kind of progress bar (tqdm, ``msgbus._progress``) on a terminal, and none without."""

from __future__ import annotations

import io
import uuid

import pytest

from msgbus import _demo
from msgbus.testing._cli import main as contract_main


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, as a shell's would."""

    def isatty(self) -> bool:
        return True


async def test_the_demo_draws_a_bar_of_settled_orders_on_a_terminal() -> None:
    out = Terminal()
    result = await _demo.run(f"memory://progress-{uuid.uuid4().hex[:8]}", orders=40, out=out, live=True)
    assert result.lost == 0
    shown = out.getvalue()
    assert "orders: 100%|" in shown and "40/40" in shown, shown[-400:]
    assert f"processed {result.processed}" in shown


async def test_the_demo_prints_plain_lines_without_a_terminal() -> None:
    out = io.StringIO()
    await _demo.run(f"memory://progress-{uuid.uuid4().hex[:8]}", orders=40, out=out, live=False)
    assert "%|" not in out.getvalue() and "sent 40/40" in out.getvalue()


@pytest.mark.parametrize("terminal", [True, False])
def test_the_contract_draws_a_bar_of_checks_on_a_terminal(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    out = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.delenv("MSGBUS_CONTRACT_RESULTS", raising=False)  # a two-check run is no result for the matrix
    only = ["--only", "headers and ids round-trip", "--only", "batches"]
    assert contract_main(["memory://?visibility_timeout=0.5", "--quick", *only]) == 0
    shown = out.getvalue()
    assert "[ 2/2] batches: pass" in shown and "[ 1/2] headers and ids round-trip: pass" in shown
    assert ("contract: 100%|" in shown and "2/2" in shown and "0 failed" in shown) is terminal, shown[-600:]
