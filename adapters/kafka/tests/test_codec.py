"""Record <-> Kafka record, names, and commit notes: pure functions, no broker."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from msgbus.adapter import Endpoint, Record
from msgbus_kafka import _codec, _names

texts = st.text(min_size=0, max_size=30)


@given(
    body=st.binary(max_size=200),
    headers=st.dictionaries(texts.filter(lambda k: not k.startswith("x-msgbus-")), texts, max_size=5),
    key=st.none() | texts,
    correlation=st.none() | texts,
    content_type=st.none() | texts,
    timestamp=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_record_round_trips(
    body: bytes,
    headers: dict[str, str],
    key: str | None,
    correlation: str | None,
    content_type: str | None,
    timestamp: float,
) -> None:
    record = Record(body, "id-1", headers, key, correlation, content_type, timestamp)
    kr = _codec.encode(record)
    got = _codec.decode(kr.value, kr.key, kr.headers, kr.timestamp_ms or 0, "fallback")
    assert got == replace(record, timestamp=(kr.timestamp_ms or 0) / 1000)  # Kafka keeps milliseconds
    assert abs(got.timestamp - timestamp) < 0.001


def test_fields_go_to_native_places() -> None:
    record = Record(b"{}", "m-1", {"origin": "x"}, "k", "c-1", "application/json", 1.5)
    kr = _codec.encode(record)
    assert (kr.key, kr.timestamp_ms, kr.value) == (b"k", 1500, b"{}")
    want = [("message-id", b"m-1"), ("correlation-id", b"c-1"), ("content-type", b"application/json")]
    assert kr.headers == [*want, ("origin", b"x")]
    assert not [n for n, _ in kr.headers if n.startswith("x-msgbus-")]


def test_a_user_header_under_a_native_name_keeps_both() -> None:
    """A CloudEvent without data: its datacontenttype header beside msgbus's own content type."""
    headers = {"content-type": "application/json", "message-id": "theirs", "ce_id": "e"}
    record = Record(b"", "m-1", headers, None, "c", "application/octet-stream", 2.0)
    kr = _codec.encode(record)
    assert ("x-msgbus-content-type", b"application/octet-stream") in kr.headers
    assert _codec.decode(kr.value, kr.key, kr.headers, kr.timestamp_ms or 0, "f") == record


def test_other_code_s_record_reads_by_convention() -> None:
    for name in ("content-type", "Content-Type", "contentType", "content_type"):
        record = _codec.decode(b"{}", b"k", [(name, b"application/json"), ("origin", b"raw")], 2_000, "t-0-9")
        assert (record.id, record.content_type, record.key, record.timestamp) == ("t-0-9", "application/json", "k", 2.0)
        assert record.headers.get("origin") == "raw"


def test_records_written_before_issue_18_still_read() -> None:
    old = [
        ("h", b"v"),
        ("x-msgbus-id", b"old-1"),
        ("x-msgbus-timestamp", b"1700000000.123456"),
        ("x-msgbus-correlation-id", b"c-9"),
        ("x-msgbus-content-type", b"text/plain; charset=utf-8"),
    ]
    record = _codec.decode(b"hi", b"k", old, 1_700_000_000_123, "t-0-1")
    assert record == Record(b"hi", "old-1", {"h": "v"}, "k", "c-9", "text/plain; charset=utf-8", 1700000000.123456)


def test_foreign_record_gets_a_stable_id_and_kafka_timestamp() -> None:
    record = _codec.decode(b"x", b"\xff", [("h", b"\xfe")], 1_500, "t-0-7")
    assert (record.id, record.timestamp, record.key, record.headers) == ("t-0-7", 1.5, "\ufffd", {"h": "\ufffd"})


def test_names() -> None:
    q, t = Endpoint("queue", "orders"), Endpoint("topic", "placed", "billing")
    assert (_names.topic_of(q), _names.group_of(q, "msgbus")) == ("orders", "msgbus.q.orders")
    assert (_names.topic_of(t), _names.group_of(t, "p")) == ("placed", "p.s.placed.billing")
    dq = Endpoint("queue", "orders", dead_letter=True)
    dt = Endpoint("topic", "placed", "billing", dead_letter=True)
    assert (_names.topic_of(dq), _names.topic_of(dt)) == ("orders.dlq", "placed.billing.dlq")
    assert _names.group_of(dq, "msgbus") == "msgbus.dlq.orders.dlq"
    long = Endpoint("topic", "t" * 200, "s" * 200, dead_letter=True)
    assert len(_names.topic_of(long)) <= 249 and _names.valid_topic(_names.topic_of(long))


@given(
    settled=st.sets(st.integers(0, 10_000), max_size=200),
    attempts=st.dictionaries(st.integers(0, 10_000), st.integers(1, 50), max_size=50),
)
def test_notes_round_trip(settled: set[int], attempts: dict[int, int]) -> None:
    notes = _codec.decode_notes(_codec.encode_notes(settled, attempts, limit=100_000))
    assert (set(notes.settled), dict(notes.attempts)) == (settled, attempts)


def test_attempts_are_written_as_runs_and_read_back_in_either_form() -> None:
    attempts = dict.fromkeys(range(40, 552), 1) | {552: 3, 553: 1, 600: 2}
    text = _codec.encode_notes({10, 11, 12}, attempts)
    assert text == "msgbus1|s:10-12|a:40-551=1,552=3,553=1,600=2"  # 512 records handed out once: one entry
    assert dict(_codec.decode_notes(text).attempts) == attempts
    assert dict(_codec.decode_notes("msgbus1|s:|a:7=2,8=2").attempts) == {7: 2, 8: 2}  # one entry per offset


def test_notes_stay_within_the_limit_dropping_attempts_first() -> None:
    text = _codec.encode_notes(set(range(0, 4000, 2)), {1: 2, 3: 4}, limit=300)
    assert len(text) <= 300
    notes = _codec.decode_notes(text)
    assert not notes.attempts and notes.settled and min(notes.settled) == 0


def test_foreign_metadata_means_no_notes() -> None:
    for text in (None, "", "someone else's", "msgbus1|s:x|a:"):
        assert _codec.decode_notes(text) == _codec.PartitionNotes()


def test_claimed_offsets_read_back_as_one_attempt_unless_counted_higher() -> None:
    """Pre-notes (``ahead``) are one run; a count an earlier owner left for one of them wins when read back."""
    text = _codec.encode_notes({3}, {5: 1, 12: 3}, ahead=range(10, 20))
    notes = _codec.decode_notes(text)
    assert text.endswith("|a:10-19=1,5=1,12=3")
    assert dict(notes.attempts) == {5: 1, **dict.fromkeys(range(10, 20), 1), 12: 3}
    assert notes.settled == {3}


def test_a_damaged_old_timestamp_header_leaves_kafka_s_time() -> None:
    """Not a time (text, NaN, past year 9999): the record's own timestamp, so the message stays deliverable."""
    for bad in (b"not-a-time", b"nan", b"1e300", b"-1"):
        assert _codec.decode(b"", None, [("x-msgbus-timestamp", bad)], 2_000, "t-0-1").timestamp == 2.0
