"""The contract, in order: one entry per promise, with required capabilities and total deadline."""

from __future__ import annotations

from ._checks_batches import check_run_batch
from ._checks_cloudevents import check_cloudevents_round_trip
from ._checks_consumers import (
    check_cancelled_subscription,
    check_competing_consumers,
    check_fan_out,
    check_graceful_shutdown,
    check_held_message_invisible,
    check_lock_extension,
    check_per_key_ordering,
)
from ._checks_crash import check_acks_survive_crash, check_poison_kills_consumer
from ._checks_dedup import check_send_dedup
from ._checks_delivery import (
    check_ack_removes,
    check_at_least_once_after_crash,
    check_durable_send,
    check_nack_redelivers,
    check_reject_dead_letters,
    check_retries_then_dead_letter,
    check_send_survives_sender_crash,
)
from ._checks_messages import (
    check_bad_input,
    check_batches,
    check_delayed_delivery,
    check_headers_round_trip,
    check_undecodable_dead_lettered,
)
from ._checks_reconnect import check_reconnect
from ._checks_redrive import check_redrive_once, check_redrive_subscription
from ._checks_reply import check_request_gets_its_reply
from ._checks_settling import check_bulk_settling, check_stop_releases, check_unacked_come_back
from ._checks_tracing import check_trace_context_survives
from ._registry import Check

__all__ = ["CHECKS"]

CHECKS: tuple[Check, ...] = (
    Check("durable send", check_durable_send, deadline=90, lock_waits=2),
    Check("at-least-once after consumer crash", check_at_least_once_after_crash, deadline=60, lock_waits=4),
    Check("ack removes", check_ack_removes, deadline=60, lock_waits=2),
    Check("nack redelivers", check_nack_redelivers, deadline=60, lock_waits=2),
    Check("reject dead-letters with reason", check_reject_dead_letters, deadline=60, lock_waits=2),
    Check("retries then dead-letter", check_retries_then_dead_letter, deadline=60, lock_waits=3),
    Check("competing consumers", check_competing_consumers, deadline=120, lock_waits=2),
    Check("held message invisible to others", check_held_message_invisible, deadline=30, lock_waits=2),
    Check("lock extended for long handlers", check_lock_extension, ("lock_extension",), deadline=30, lock_waits=5),
    Check("fan-out", check_fan_out, deadline=90, lock_waits=2),
    Check("cancelled subscription stops receiving", check_cancelled_subscription, deadline=60, lock_waits=3),
    Check("per-key ordering", check_per_key_ordering, ("ordering",), deadline=90, lock_waits=2),
    Check("headers and ids round-trip", check_headers_round_trip, deadline=30),
    Check("batches", check_batches, deadline=60, lock_waits=2),
    Check("delayed delivery", check_delayed_delivery, ("delayed_delivery",), deadline=30),
    Check("graceful shutdown", check_graceful_shutdown, deadline=60, lock_waits=3),
    Check("undecodable payloads dead-lettered", check_undecodable_dead_lettered, deadline=60, lock_waits=2),
    Check("bad input raises typed errors", check_bad_input, deadline=30),
    Check(
        "poison that kills its consumer",
        check_poison_kills_consumer,
        ("cross_process", "counts_deliveries"),
        deadline=120,
        lock_waits=8,
    ),
    Check("acks survive a crash", check_acks_survive_crash, ("cross_process",), deadline=90, lock_waits=3),
    Check("a send that returned survives the sender's crash", check_send_survives_sender_crash, deadline=60),
    Check("only the unacked come back after close or crash", check_unacked_come_back, deadline=90, lock_waits=5),
    Check("stop() hands back unstarted messages", check_stop_releases, deadline=60, lock_waits=2),
    Check("bulk acks and immediate nacks under run()", check_bulk_settling, deadline=90, lock_waits=2),
    Check("trace context survives the trip", check_trace_context_survives, deadline=60, lock_waits=3),
    Check("reconnect after broker restart", check_reconnect, ("restartable", "persistence"), deadline=180, alone=True),
    Check("redrive returns every dead letter once", check_redrive_once, deadline=90, lock_waits=3),
    Check("CloudEvents round-trip", check_cloudevents_round_trip, deadline=60),
    Check("a request gets exactly its reply", check_request_gets_its_reply, deadline=90, lock_waits=2),
    Check(
        "redrive returns a subscription's dead letters to it alone",
        check_redrive_subscription,
        deadline=90,
        lock_waits=3,
    ),
    Check("run_batch settles each message of a batch as told", check_run_batch, deadline=90, lock_waits=2),
    Check("a send retried with the same id is delivered once", check_send_dedup, ("dedup_window",), deadline=60),
)
