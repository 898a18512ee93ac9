"""examples/fastapi_service end to end on memory:// (its own test, run from here so `make test` runs it)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_service"


async def test_the_fastapi_example_service_on_memory(msgbus_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    example = importlib.import_module("test_orders")
    await example.exercise(msgbus_url, monkeypatch)
