"""Mutation testing of the contract suite: realistic bugs put into a copy of the tree, one at a time, each run
against the checks that must catch it (``python -m mutants``; see docs/contract.md, "Mutants")."""

from .harness import CATALOGUE, Mutant, Outcome, load, run_mutant

__all__ = ["CATALOGUE", "Mutant", "Outcome", "load", "run_mutant"]
