"""Render ``benchmarks/results/*.json`` into ``docs/benchmarks.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render(paths: list[Path]) -> str:
    results: list[dict[str, Any]] = [json.loads(p.read_text()) for p in paths]
    return "# Benchmarks\n\n" + "\n".join(r["broker"] for r in results) + "\n"
