"""moto's server as the tests' SQS/SNS endpoint, made fit for the contract suite.

``python -m integration._moto -H HOST -p PORT --state FILE`` runs moto's own WSGI app (the same one
``python -m moto.server`` runs) with these changes (each a deviation of moto's from AWS or a cost):

1. **One request at a time.** moto's backends are not thread-safe (``Queue.delete_message`` rebuilds the
   message list without a lock, so concurrent deletes from competing consumers resurrect messages), yet
   its server answers each request on its own thread. Every request here runs under one lock, released
   while a long poll (``ReceiveMessage`` with ``WaitTimeSeconds``) waits for messages. moto's SQS clock
   is also read through ``time.time()`` instead of datetime (it reads it for every queued message on
   every request).
2. **FIFO long polls as on AWS.** moto's long poll decides which message groups are in flight once, before
   it waits, so it could hand out a group's next message while another consumer holds the first; and it
   spins while the only visible messages are held back by their groups. Here each look at the queue is a
   fresh one, and a waiting poll sleeps until the queue changes or a message's visibility/delay ends
   (see "long polls" below).
3. **State survives a graceful restart.** moto keeps everything in memory. On SIGTERM/SIGINT the SQS and
   SNS backends (queues, messages with their visibility, topics, subscriptions) are pickled to ``FILE``,
   and loaded from it at start. A kill (SIGKILL) loses everything since the last graceful stop, as moto
   itself would.
"""

from __future__ import annotations

import argparse
import copyreg
import itertools
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.sns.models import sns_backends
from moto.sqs import models as sqs_models
from moto.sqs.models import Queue, SQSBackend, sqs_backends
from werkzeug.serving import make_server

_LOCK = threading.Lock()

# moto's models hold threading locks, which pickle refuses: save them as fresh, unlocked ones.
copyreg.pickle(type(threading.Lock()), lambda _lock: (threading.Lock, ()))
copyreg.pickle(type(threading.RLock()), lambda _lock: (threading.RLock, ()))
copyreg.pickle(threading.Condition, lambda _cond: (threading.Condition, ()))

_original_millis = sqs_models.unix_time_millis  # type: ignore[attr-defined]


def _fast_millis(dt: Any = None) -> float:
    """moto asks the time twice per queued message on every send and receive; via datetime that costs
    ~12 us each, which makes a 2000-message queue take seconds per request. The same value, faster."""
    return time.time() * 1000.0 if dt is None else float(_original_millis(dt))


sqs_models.unix_time_millis = _fast_millis  # type: ignore[attr-defined]

# moto recomputes a queue's attributes (three O(messages) counts) several times per message sent or
# received; within one (serialised) request they cannot meaningfully change, so compute them once.
_requests = itertools.count(int(time.time() * 1000))  # never matches a generation saved in a snapshot
_generation = next(_requests)
_original_attributes = Queue.attributes


def _attributes_once_per_request(self: Queue) -> dict[str, Any]:
    cached = self.__dict__.get("_msgbus_attributes")
    if cached is None or cached[0] != _generation:
        cached = self.__dict__["_msgbus_attributes"] = (_generation, _original_attributes.fget(self))  # type: ignore[attr-defined]
    return dict(cached[1])


Queue.attributes = property(_attributes_once_per_request)  # type: ignore[assignment,method-assign]


def _delete_message_batch(
    self: SQSBackend, queue_name: str, receipts: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """moto's DeleteMessageBatch scans and rebuilds the whole queue per entry; this does one pass per batch
    with the same outcome: entries whose handle belongs to a message (or one already deleted) succeed."""
    queue = self.get_queue(queue_name)
    wanted = {r["ReceiptHandle"]: r["Id"] for r in receipts}
    done = {h for h in wanted if h in queue.deleted_messages}
    kept = []
    for message in queue._messages:
        hits = [h for h in message.all_receipt_handles if h in wanted]
        if hits:
            queue.pending_messages.discard(message)
            queue.deleted_messages.update(message.all_receipt_handles)  # type: ignore[arg-type]
            done.update(hits)
        else:
            kept.append(message)
    queue._messages = kept
    _notify(queue)
    success = [i for h, i in wanted.items() if h in done]
    errors = [
        {
            "Id": i,
            "SenderFault": True,
            "Code": "ReceiptHandleIsInvalid",
            "Message": f'The input receipt handle "{h}" is not a valid receipt handle.',
        }
        for h, i in wanted.items()
        if h not in done
    ]
    return success, errors


SQSBackend.delete_message_batch = _delete_message_batch  # type: ignore[method-assign]


def _retained(self: SQSBackend, queue_name: str, message: Any) -> bool:
    """moto checks each received message's retention through GetQueueAttributes (three O(messages) counts
    per receive); the same test, reading the one attribute."""
    retention = int(self.get_queue(queue_name).message_retention_period)  # type: ignore[attr-defined]
    return bool(retention + message.sent_timestamp / 1000 > time.time())


SQSBackend.is_message_valid_based_on_retention_period = _retained  # type: ignore[method-assign]


# -- long polls -----------------------------------------------------------------------------------------
# moto's ReceiveMessage takes its snapshot of a FIFO queue's in-flight message groups once per call, then
# long-polls: messages another consumer receives meanwhile are not in it, so when the poll wakes it hands out
# the NEXT message of a group whose first one is in flight (AWS never does). And its wait is
# ``Condition.wait_for(lambda: queue.messages)``, which returns at once while a visible message is only held
# back by its group: such a long poll spins for its whole WaitTimeSeconds. Both happen in plain
# ``moto.server`` too. Here a long poll is moto's receive without a wait (a fresh snapshot, under the request
# lock), repeated after something changed the queue or a message's visibility or delay ran out, and the
# wait in between releases the request lock, so other clients' requests proceed.
_original_receive = SQSBackend.receive_message
_changed: dict[str, threading.Condition] = {}  # queue ARN -> woken when that queue changes; shares _LOCK


def _condition(queue: Queue) -> threading.Condition:
    return _changed.setdefault(queue.queue_arn, threading.Condition(_LOCK))


def _notify(queue: Queue) -> None:
    """Wake the long polls waiting on ``queue`` (called under the request lock)."""
    if queue.queue_arn in _changed and _LOCK.locked():
        _changed[queue.queue_arn].notify_all()


def _seconds_to_next_due(queue: Queue, limit: float) -> float:
    """Seconds until the next message of ``queue`` becomes visible or ends its delay (at most ``limit``)."""
    now = time.time() * 1000.0
    due = [t for m in queue._messages for t in (m.visible_at, m.delayed_until) if t and t > now]
    return min(limit, (min(due) - now) / 1000.0 + 0.002) if due else limit


def _receive_message(
    self: SQSBackend,
    queue_name: str,
    count: int,
    wait_seconds_timeout: int,
    visibility_timeout: int,
    message_attribute_names: list[str] | None = None,
) -> list[Any]:
    """moto's ReceiveMessage with a long poll that re-reads the in-flight groups and sleeps while it waits."""
    global _generation
    queue = self.get_queue(queue_name)
    deadline = time.monotonic() + (wait_seconds_timeout or 0)
    while True:
        found: list[Any] = _original_receive(self, queue_name, count, 0, visibility_timeout, message_attribute_names)
        left = deadline - time.monotonic()
        if found or left <= 0:
            return found
        _condition(queue).wait(_seconds_to_next_due(queue, left))  # releases the request lock meanwhile
        _generation = next(_requests)  # other requests ran meanwhile: queue attributes cached before are stale


def _notifying(method: Any) -> Any:
    """``Queue.method`` that wakes the queue's long polls afterwards (a message added, deleted or released)."""

    def wrapper(self: Queue, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            _notify(self)

    return wrapper


def _change_message_visibility(self: SQSBackend, queue_name: str, receipt_handle: str, visibility_timeout: int) -> None:
    """moto's ChangeMessageVisibility; a message made visible now (a nack) wakes the queue's long polls."""
    try:
        _original_change_visibility(self, queue_name, receipt_handle, visibility_timeout)
    finally:
        _notify(self.get_queue(queue_name))


_original_change_visibility = SQSBackend.change_message_visibility
SQSBackend.receive_message = _receive_message  # type: ignore[method-assign]
SQSBackend.change_message_visibility = _change_message_visibility  # type: ignore[method-assign]
Queue.add_message = _notifying(Queue.add_message)  # type: ignore[method-assign]
Queue.delete_message = _notifying(Queue.delete_message)  # type: ignore[method-assign]


def serialised(app: Any) -> Any:
    """The WSGI ``app`` with every request handled under the lock."""

    def handle(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        global _generation
        with _LOCK:
            _generation = next(_requests)
            return list(app(environ, start_response))

    return handle


def load(path: Path) -> None:
    """Put the saved SQS and SNS state (if any) into moto's live backends."""
    if not path.exists():
        return
    with path.open("rb") as f:
        saved = pickle.load(f)
    for live, name in ((sqs_backends, "sqs"), (sns_backends, "sns")):
        live.clear()
        live.update(saved[name])


def save(path: Path) -> None:
    """Write the SQS and SNS state atomically (a crash mid-write leaves the previous snapshot)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump({"sqs": sqs_backends, "sns": sns_backends}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    parser.add_argument("--state", type=Path, required=True, help="snapshot file, loaded at start, saved at stop")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in broker.log
    load(args.state)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(args.host, args.port, serialised(app), threaded=True, request_handler=MotoRequestHandler)
    server.daemon_threads = True  # type: ignore[attr-defined]

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() blocks serve_forever's thread

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    with _LOCK:
        save(args.state)


if __name__ == "__main__":
    main()
