"""The quick subset of the mutant catalogue on the real brokers: each mutant (a realistic bug in an adapter,
applied to a copy of the tree) must fail one of its contract checks. ``make mutants`` runs the whole catalogue."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from integration.brokers import Endpoint
from integration.contract_urls import tuned
from mutants import Mutant, load, run_mutant
from mutants.harness import EMBEDDED

QUICK = [(m, b) for m in load() if m.ci for b in m.backends if b not in EMBEDDED]


@pytest.mark.parametrize(("mutant", "backend"), QUICK, ids=[f"{b}: {m.name}" for m, b in QUICK])
def test_the_contract_kills_the_mutant(mutant: Mutant, backend: str, broker_url: Callable[[str], Endpoint]) -> None:
    outcome = run_mutant(mutant, backend, tuned(broker_url(backend)))
    assert outcome.status == "killed", f"{mutant.name} on {backend}: {outcome.status}: {outcome.detail}"
    print(f"{mutant.name} on {backend}: killed by {outcome.check} in {outcome.seconds}s: {outcome.detail[:300]}")
