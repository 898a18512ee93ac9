"""The mutant catalogue (mutants/catalogue.toml) stays current, and its quick subset on the embedded backends
is killed by the contract: each mutant is a realistic bug put into a copy of the tree (python -m mutants)."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.contract_urls import BACKENDS
from mutants import Mutant, load, run_mutant
from mutants.harness import EMBEDDED, ROOT, embedded_url

CATALOGUE = load()


def test_every_mutant_still_fits_the_code() -> None:
    """A change to mutated code must update its mutant: each one's text is in its file exactly once."""
    found = {m.name: (ROOT / m.file).read_text().count(m.find) for m in CATALOGUE}
    stale = [f"{name}: found {n} times in its file" for name, n in found.items() if n != 1]
    assert not stale, "mutants whose text to replace is gone or ambiguous:\n" + "\n".join(stale)
    unknown = {b for m in CATALOGUE for b in m.backends} - {*EMBEDDED, *BACKENDS}
    assert not unknown, f"mutants name unknown backends: {unknown}"


def test_a_mutant_is_applied_to_a_copy_never_to_the_tree(tmp_path: Path) -> None:
    mutant = next(m for m in CATALOGUE if m.file.startswith("msgbus/"))
    before = (ROOT / mutant.file).read_text()
    (tmp_path / mutant.file).parent.mkdir(parents=True)
    (tmp_path / mutant.file).write_text(before)
    mutant.apply(tmp_path)
    assert (tmp_path / mutant.file).read_text() == before.replace(mutant.find, mutant.replace)
    assert (ROOT / mutant.file).read_text() == before
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutant.apply(tmp_path)  # applied already: the text is gone


QUICK = [(m, b) for m in CATALOGUE if m.ci for b in m.backends if b in EMBEDDED]


@pytest.mark.parametrize(("mutant", "backend"), QUICK, ids=[f"{b}: {m.name}" for m, b in QUICK])
def test_the_contract_kills_the_mutant(mutant: Mutant, backend: str) -> None:
    outcome = run_mutant(mutant, backend, lambda root: embedded_url(backend, root))
    assert outcome.status == "killed", f"{mutant.name} on {backend}: {outcome.status}: {outcome.detail}"
    print(f"{mutant.name} on {backend}: killed by {outcome.check} in {outcome.seconds}s: {outcome.detail[:300]}")


def test_the_table_fills_only_its_section_of_the_doc(tmp_path: Path) -> None:
    from mutants.__main__ import BEGIN, END, publish, render
    from mutants.harness import Outcome

    doc = tmp_path / "contract.md"
    doc.write_text(f"# Contract\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    outcomes = [
        Outcome(
            "kafka: commit past an unacked record", "ack past a gap", "kafka", "killed", "only the unacked", "", 14
        ),
        Outcome("redis: x", "dropped header", "redis", "survived", "", "every check passed", 3),
    ]
    publish(doc, render(outcomes, "make mutants"))
    text = doc.read_text()
    assert text.startswith("# Contract\n\nintro\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "old table" not in text and "1 of 2 mutant runs killed" in text
    assert (
        "| ack past a gap | kafka: commit past an unacked record | `kafka` | killed (14s) | only the unacked |" in text
    )
