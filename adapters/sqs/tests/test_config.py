"""URL options and name mapping, without AWS."""

from __future__ import annotations

import pytest

from msgbus._url import parse_url
from msgbus.adapter import Endpoint
from msgbus.errors import ConfigError
from msgbus_sqs import create
from msgbus_sqs._names import names_for, queue_name, topic_name


def _adapter(url: str):  # type: ignore[no-untyped-def]
    parsed = parse_url(url)
    reader = parsed.reader()
    adapter = create(parsed, reader)
    reader.finish()
    return adapter


def test_defaults_and_capabilities() -> None:
    a = _adapter("sqs://eu-west-1")
    caps = a.capabilities
    assert (caps.lock_duration, caps.max_delay, caps.ordering, caps.delayed_delivery) == (30.0, 900, "none", True)
    assert caps.max_message_size is not None and caps.max_message_size < 256 * 1024


def test_fifo_orders_per_key_deduplicates_and_has_no_delay() -> None:
    caps = _adapter("sqs://us-east-1?fifo=true&visibility_timeout=2").capabilities
    assert (caps.ordering, caps.delayed_delivery, caps.lock_duration) == ("per_key", False, 2.0)
    assert caps.dedup_window == 300
    unordered = _adapter("sqs://us-east-1?fifo=true&ordering=none").capabilities
    assert (unordered.ordering, unordered.dedup_window) == ("none", 300)


def test_credentials_never_show() -> None:
    a = _adapter("sqs://us-east-1?access_key_id=AKIDSECRET&secret_access_key=s3cr3t&endpoint_url=http://127.0.0.1:1")
    assert "s3cr3t" not in repr(a) and "s3cr3t" not in str(a.url)
    assert "AKIDSECRET" not in repr(a)


@pytest.mark.parametrize(
    "url",
    [
        "sqs://not_a_region",
        "sqs://us-east-1:443",
        "sqs://us-east-1/path",
        "sqs://user:pw@us-east-1",
        "sqs://us-east-1?access_key_id=a",
        "sqs://us-east-1?endpoint_url=127.0.0.1:4566",
        "sqs://us-east-1?visibility_timeout=0",
        "sqs://us-east-1?wait_time=21",
        "sqs://us-east-1?prefix=bad.prefix",
        "sqs://us-east-1?wait_time=20&read_timeout=10",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        _adapter(url)


def test_names_fit_sqs_and_stay_distinct() -> None:
    long = "a" * 200
    assert len(queue_name("", long, dead_letter=True, fifo=True)) <= 80
    assert queue_name("", "a.b", dead_letter=False, fifo=False) != queue_name("", "a_b", dead_letter=False, fifo=False)
    assert queue_name("", "orders", dead_letter=False, fifo=False) == "orders"
    assert topic_name("p-", "t", fifo=True) == "p-t.fifo"
    n = names_for(Endpoint("topic", "orders", "billing"), "", fifo=False)
    assert (n.queue, n.dead_letter_queue, n.topic) == ("orders--billing", "orders--billing--dlq", "orders")
    assert names_for(Endpoint("topic", "orders"), "", fifo=False).queue is None
