"""The ``ordering`` option (``none`` | ``per_key``): ordering chosen by configuration, refused at ``connect`` by a
backend that cannot keep it, and what ``require(bus, "ordering")`` then sees."""

from __future__ import annotations

import dataclasses

import pytest

import msgbus
from msgbus import _memory
from msgbus.adapter import Adapter, BusURL, OptionReader
from msgbus.errors import CapabilityMissing, ConfigError


@pytest.mark.parametrize("url", ["memory://", "sqlite:///bus.db"])
def test_an_ordering_backend_takes_per_key_and_declares_none_when_told(
    url: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    assert msgbus.connect(url, ordering="per_key").capabilities.ordering == "per_key"
    msgbus.require(msgbus.connect(url, ordering="per_key"), "ordering")
    unordered = msgbus.connect(url, ordering="none")
    assert unordered.capabilities.ordering == "none"
    with pytest.raises(CapabilityMissing, match="ordering"):
        msgbus.require(unordered, "ordering")


def test_a_backend_that_cannot_order_refuses_per_key_at_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every shipped backend can order since issue 19 (NATS was the example here): a memory adapter that declares
    # no ordering stands in for a backend that cannot keep it.
    real = _memory.create

    def unordered(url: BusURL, options: OptionReader) -> Adapter:
        adapter = real(url, options)
        adapter.capabilities = dataclasses.replace(adapter.capabilities, ordering="none")
        return adapter

    monkeypatch.setattr(_memory, "create", unordered)
    with pytest.raises(CapabilityMissing, match=r"memory:// cannot keep per-key order"):
        msgbus.connect("memory://?ordering=per_key")
    assert msgbus.connect("memory://?ordering=none").capabilities.ordering == "none"


def test_an_unknown_ordering_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="none, per_key"):
        msgbus.connect("memory://?ordering=strict")


def test_sqs_ordering_per_key_means_fifo_queues() -> None:
    pytest.importorskip("msgbus_sqs")
    creds = "access_key_id=a&secret_access_key=b"
    bus = msgbus.connect(f"sqs://us-east-1?ordering=per_key&{creds}")
    assert bus.capabilities.ordering == "per_key"
    assert msgbus.connect(f"sqs://us-east-1?fifo=true&{creds}").capabilities.ordering == "per_key"
    assert msgbus.connect(f"sqs://us-east-1?fifo=true&ordering=none&{creds}").capabilities.ordering == "none"
    assert msgbus.connect(f"sqs://us-east-1?{creds}").capabilities.ordering == "none"
    with pytest.raises(ConfigError, match="FIFO"):
        msgbus.connect(f"sqs://us-east-1?fifo=false&ordering=per_key&{creds}")


def test_pubsub_takes_per_key_as_well_as_true() -> None:
    pytest.importorskip("msgbus_pubsub")
    for value, declared in (("per_key", "per_key"), ("true", "per_key"), ("none", "none"), ("false", "none")):
        assert msgbus.connect(f"pubsub://my-project?ordering={value}").capabilities.ordering == declared
