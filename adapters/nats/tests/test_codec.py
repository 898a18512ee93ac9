"""Record <-> NATS headers, and names -> streams and subjects, without a broker."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Endpoint, Record
from msgbus.errors import DecodeError, InvalidMessage, MessageTooLarge
from msgbus_nats._codec import check_size, decode, encode, parse_header_block, wire_size
from msgbus_nats._names import MAX_NAME, escape, route
from msgbus_nats._receiver import ack_metadata

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
records = st.builds(
    Record,
    body=st.binary(max_size=200),
    id=text,
    headers=st.dictionaries(text.filter(bool), text, max_size=6),
    key=st.none() | text,
    correlation_id=st.none() | text,
    content_type=st.none() | text,
    timestamp=st.floats(allow_nan=False),
)
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def wire(headers: dict[str, str]) -> dict[str, str]:
    """What a NATS client hands back: it strips values (nats-py does) and parses the header block."""
    block = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return parse_header_block(block.encode())


@given(records)
def test_every_record_round_trips_exactly_through_the_wire(record: Record) -> None:
    headers = encode(record)
    for name, value in headers.items():  # what NATS can carry: token names, printable ASCII without outer space
        assert TOKEN.fullmatch(name), name
        assert value == value.strip() and all(" " <= c <= "~" for c in value), value
    assert decode(wire(headers), record.body, "fallback", 0.0) == record


def test_plain_headers_stay_readable_for_other_nats_clients() -> None:
    record = Record(body=b"x", id="m1", headers={"trace": "abc-1", "Mixed-Case": "MiXeD"}, content_type="text/plain")
    headers = encode(record)
    assert headers["trace"] == "abc-1" and headers["Mixed-Case"] == "MiXeD"
    assert headers["Nats-Msg-Id"] == "m1" and headers["Content-Type"] == "text/plain"
    assert "Msgbus-Encoded" not in headers


@pytest.mark.parametrize(
    "name",
    ["Nats-Expected-Stream", "nats-msg-id", "Msgbus-Encoded", "MSGBUS-KEY", "content-type", "a b", "ünï", "%41"],
)
def test_names_the_server_or_msgbus_would_read_are_encoded(name: str) -> None:
    record = Record(body=b"", id="m", headers={name: "v"})
    headers = encode(record)
    assert headers.get(name) != "v"  # never sent under its own name
    assert all("%" in n for n in headers["Msgbus-Encoded"].split(","))
    assert decode(wire(headers), b"", "f", 0.0).headers == {name: "v"}


@pytest.mark.parametrize("value", ["", "  padded  ", "50%", "a\r\nInjected: yes", "ünï ✓", "\t"])
def test_values_a_header_line_cannot_carry_round_trip(value: str) -> None:
    record = Record(body=b"", id=value or "id", headers={"h": value}, key=value, correlation_id=value)
    headers = encode(record)
    assert "\r" not in "".join(headers.values()) and "\n" not in "".join(headers.values())
    assert decode(wire(headers), b"", "f", 0.0) == record


def test_lone_surrogates_are_invalid_messages() -> None:
    with pytest.raises(InvalidMessage):
        encode(Record(body=b"", id="m", headers={"h": "\ud800"}))


def test_a_foreign_message_gets_the_fallback_id_and_the_server_timestamp() -> None:
    assert decode(None, b"raw", "nats-s-7", 12.5) == Record(b"raw", "nats-s-7", {}, None, None, None, 12.5)
    assert decode({"Nats-Msg-Id": "given", "x": "1"}, b"", "f", 1.0) == Record(b"", "given", {"x": "1"}, timestamp=1.0)


@pytest.mark.parametrize(
    "headers",
    [{"Msgbus-Ts": "soon"}, {"Msgbus-Encoded": "%FF", "%FF": "v"}, {"Msgbus-Key": "%C3"}],
)
def test_malformed_msgbus_headers_are_decode_errors(headers: dict[str, str]) -> None:
    with pytest.raises(DecodeError):
        decode(headers, b"", "f", 0.0)


def test_wire_size_counts_the_header_block_like_the_server() -> None:
    headers = {"Nats-Msg-Id": "m1", "a": "b"}
    block = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    assert wire_size(headers, b"12345") == len(block) + 5
    check_size(headers, b"12345", len(block) + 5)
    with pytest.raises(MessageTooLarge) as info:
        check_size(headers, b"12345", len(block) + 4)
    assert (info.value.size, info.value.limit) == (len(block) + 5, len(block) + 4)


def test_ack_subjects_give_deliveries_sequence_and_time() -> None:
    assert ack_metadata("$JS.ACK.S.C.3.17.9.1700000000000000000.0") == (3, 17, 1.7e9)
    assert ack_metadata("$JS.ACK.dom.acchash.S.C.2.5.4.1700000000500000000.1.rnd") == (2, 5, 1.7000000005e9)
    with pytest.raises(ValueError):
        ack_metadata("_INBOX.abc")


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", fullmatch=True)


@given(names, names)
def test_names_map_injectively_to_valid_streams_and_subject_tokens(a: str, b: str) -> None:
    ra, rb = route("msgbus", Endpoint("queue", a)), route("msgbus", Endpoint("queue", b))
    for r in (ra, rb):
        assert not set(r.stream) & set(".*> \t/\\") and len(r.stream) <= MAX_NAME
        assert r.subject.split(".")[:2] == ["msgbus", "q"] and len(r.subject.split(".")) == 3
    assert (ra.stream == rb.stream) == (a == b)
    assert (ra.subject == rb.subject) == (a == b)


def test_dots_and_underscores_do_not_collide() -> None:
    streams = {route("p", Endpoint("queue", n)).stream for n in ("a.b", "a_b", "a_db", "a__b", "a-b")}
    assert len(streams) == 5
    assert escape("a.b_c") == "a_db__c"


def test_subscriptions_queues_and_their_dead_letters_never_share_a_stream() -> None:
    endpoints = [
        Endpoint("queue", "x"),
        Endpoint("queue", "x", dead_letter=True),
        Endpoint("topic", "x"),
        Endpoint("topic", "x", "s"),
        Endpoint("topic", "x", "s", dead_letter=True),
        Endpoint("topic", "x_s_y", "z", dead_letter=True),
        Endpoint("topic", "x", "y_s_z", dead_letter=True),
    ]
    routes = [route("msgbus", e) for e in endpoints]
    assert routes[2].stream == routes[3].stream  # a subscription reads its topic's stream
    assert routes[1].stream == routes[0].dead_stream and routes[4].stream == routes[3].dead_stream
    assert len({r.dead_stream for r in routes[3:]}) == 3
    assert routes[3].consumer == "s" and routes[0].consumer == routes[1].consumer == "msgbus"
    assert routes[3].advisory_subjects == ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.msgbus_t_x.s"]
    assert routes[4].advisory_subjects == routes[3].advisory_subjects


def test_long_names_are_bounded_and_still_distinct() -> None:
    a, b = "q" * 199 + "a", "q" * 199 + "b"
    ra, rb = route("msgbus", Endpoint("topic", a, a, True)), route("msgbus", Endpoint("topic", a, b, True))
    assert len(ra.stream) <= MAX_NAME and ra.stream != rb.stream


def test_a_redriven_record_keeps_its_id_under_a_nats_msg_id_of_its_own() -> None:
    """JetStream drops a second Nats-Msg-Id within its window: a redriven dead letter must not be that duplicate."""
    first = Record(b"x", "id-1", {"h": "1"}, timestamp=1.0)
    redriven = Record(b"x", "id-1", {"h": "1", "x-msgbus-dead-letter-history": '[{"reason":"r"}]'}, timestamp=1.0)
    again = Record(b"x", "id-1", {"h": "1", "x-msgbus-dead-letter-history": '[{"reason":"r"},{"reason":"s"}]'})
    ids = [encode(r)["Nats-Msg-Id"] for r in (first, redriven, again)]
    assert len(set(ids)) == 3 and encode(redriven)["Nats-Msg-Id"] == ids[1]  # same history, same dedup id
    assert decode(encode(redriven), b"x", "fallback", 0.0).id == "id-1"
    assert "Msgbus-Id" not in decode(encode(redriven), b"x", "fallback", 0.0).headers


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "contentType", "content_type"])
def test_other_code_s_content_type_header_is_read(name: str) -> None:
    """Written by other code (no Msgbus-Ts): the content type under any common spelling; the stream sequence id."""
    r = decode({name: "application/json", "origin": "raw"}, b"{}", "nats-S-7", 5.0)
    assert (r.id, r.content_type, r.timestamp) == ("nats-S-7", "application/json", 5.0)
    assert r.headers.get("origin") == "raw"
