"""examples/fastapi_service end to end on a real Redis: the same test as on memory://, only the URL differs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from integration.brokers import endpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_service"


async def test_the_fastapi_example_service_on_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    url = endpoint("redis").url  # skips with the reason when no Redis runs (fails where CI requires it)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    example = importlib.import_module("test_orders")
    await example.exercise(url, monkeypatch)
