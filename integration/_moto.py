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
3. **State survives a restart, even a SIGKILL, as on SQS.** moto keeps everything in memory. Here the SQS
   and SNS backends are pickled to ``FILE`` (a snapshot) at start and on SIGTERM/SIGINT; every message
   stored, received (its receive count: redrive depends on it), deleted or purged is appended to a journal
   beside it (``FILE.journal``) before the reply; and after every request that changes topology (queues,
   topics, subscriptions, attributes) the backends *without their messages* are pickled to ``FILE.topology``
   before the reply. Its cost follows the number of queues, not of the messages they hold (a full snapshot
   per new queue took a second and more under the request lock once a run had left tens of MB of messages,
   and stalled every client meanwhile). At start the topology is loaded, each queue that the snapshot knew
   gets its messages back from it, and the journal is replayed over that. Visibility is not kept: a message in
   flight when the server stopped is visible again, with its receive count.
"""

from __future__ import annotations

import argparse
import base64
import copyreg
import io
import itertools
import json
import logging
import os
import pickle
import re
import signal
import threading
import time
import uuid
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
from moto.sqs.models import Message, Queue, SQSBackend, sqs_backends
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
    if _journal is not None and len(kept) < len(queue._messages):
        keep = {id(m) for m in kept}
        _journal.write("del", queue, ids=[m.id for m in queue._messages if id(m) not in keep])
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


# -- durability -----------------------------------------------------------------------------------------
# Requests that change only messages (journaled by the hooks below) or nothing; any other request changes
# topology and is followed by a snapshot. SQS speaks JSON (X-Amz-Target), SNS the query protocol (Action=).
_MESSAGE_ACTIONS = frozenset(
    [
        "SendMessage",
        "SendMessageBatch",
        "ReceiveMessage",
        "DeleteMessage",
        "DeleteMessageBatch",
        "ChangeMessageVisibility",
        "ChangeMessageVisibilityBatch",
        "PurgeQueue",
        "Publish",
        "PublishBatch",
    ]
)
_READ_ACTIONS = ("Get", "List")


class Journal:
    """Message changes as JSON lines, one ``os.write`` each: in the kernel before the reply is sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.replaying = False

    def write(self, op: str, queue: Queue, **fields: Any) -> None:
        if not self.replaying:
            entry = {"op": op, "a": queue.account_id, "r": queue.region, "q": queue.name, **fields}
            os.write(self._fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def restart(self, epoch: str) -> None:
        """Empty the journal and name the snapshot it follows."""
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"op": "epoch", "id": epoch}).encode() + b"\n")


_journal: Journal | None = None


def _journaled_add(method: Any) -> Any:
    def add(self: Queue, message: Message) -> None:
        method(self, message)
        if _journal is not None and self._messages and self._messages[-1] is message:  # not a FIFO duplicate
            _journal.write("add", self, m=base64.b64encode(pickle.dumps(message)).decode())

    return add


def _journaled_delete(method: Any) -> Any:
    def delete(self: Queue, receipt_handle: str) -> None:
        gone = [m.id for m in self._messages if m.had_receipt_handle(receipt_handle)]
        method(self, receipt_handle)
        if _journal is not None and gone:
            _journal.write("del", self, ids=gone)

    return delete


def _journaled_receive(method: Any) -> Any:
    def receive(self: SQSBackend, queue_name: str, *args: Any, **kwargs: Any) -> list[Any]:
        found: list[Any] = method(self, queue_name, *args, **kwargs)
        if _journal is not None and found:
            _journal.write("recv", self.get_queue(queue_name), ids=[m.id for m in found])
        return found

    return receive


def _journaled_purge(method: Any) -> Any:
    def purge(self: SQSBackend, queue_name: str) -> None:
        method(self, queue_name)
        if _journal is not None:
            _journal.write("purge", self.get_queue(queue_name))

    return purge


Queue.add_message = _journaled_add(Queue.add_message)  # type: ignore[method-assign]
Queue.delete_message = _journaled_delete(Queue.delete_message)  # type: ignore[method-assign]
SQSBackend.receive_message = _journaled_receive(SQSBackend.receive_message)  # type: ignore[method-assign]
SQSBackend.purge_queue = _journaled_purge(SQSBackend.purge_queue)  # type: ignore[method-assign]


def _action(environ: dict[str, Any]) -> str:
    """The request's action (reading, then restoring, a form body for the query protocol)."""
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return str(target).rsplit(".", 1)[-1]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    query = environ.get("QUERY_STRING", "").encode()
    found = re.search(rb"(?:^|&)Action=([A-Za-z]+)", body) or re.search(rb"(?:^|&)Action=([A-Za-z]+)", query)
    return found.group(1).decode() if found else ""


def serialised(app: Any, state: Path | None = None) -> Any:
    """The WSGI ``app`` with every request handled under the lock; after a topology change the topology beside
    ``state`` is saved before the reply is sent."""

    def handle(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        global _generation
        with _LOCK:
            _generation = next(_requests)
            action = _action(environ) if state is not None else ""
            body = list(app(environ, start_response))
            if state is not None and action not in _MESSAGE_ACTIONS and not action.startswith(_READ_ACTIONS):
                save_topology(state)
            return body

    return handle


# What a queue holds of messages: left out of the topology file, taken from the snapshot when loading.
_MESSAGE_FIELDS = ("_messages", "_pending_messages", "deleted_messages")
_original_queue_init = Queue.__init__


def _queue_init(self: Queue, *args: Any, **kwargs: Any) -> None:
    _original_queue_init(self, *args, **kwargs)
    vars(self)["msgbus_uid"] = uuid.uuid4().hex  # tells a queue deleted and created again under its name apart


Queue.__init__ = _queue_init  # type: ignore[method-assign]


def _queues(backends: Any) -> dict[tuple[str, str, str, str], Queue]:
    """Every SQS queue of ``backends`` by (account, region, name, uid); a queue without a uid gets one."""
    out = {}
    for account, regions in backends.items():
        for region, backend in regions.items():
            for queue in backend.queues.values():
                if not hasattr(queue, "msgbus_uid"):
                    queue.msgbus_uid = uuid.uuid4().hex
                out[(account, region, queue.name, queue.msgbus_uid)] = queue
    return out


def load(path: Path) -> str | None:
    """Put the saved SQS and SNS state (if any) into moto's live backends: the topology saved last, each queue
    with the messages the snapshot has of it. Returns the snapshot's epoch (the journal that follows it)."""
    if not path.exists():
        return None
    with path.open("rb") as f:
        saved = pickle.load(f)
    topology = path.with_suffix(".topology")
    if topology.exists():
        with topology.open("rb") as f:
            shape = pickle.load(f)
        if shape.get("epoch") == saved.get("epoch"):  # else older than the snapshot, which has it all
            held = _queues(saved["sqs"])
            for key, queue in _queues(shape["sqs"]).items():
                if (old := held.get(key)) is not None:
                    for field in _MESSAGE_FIELDS:
                        setattr(queue, field, getattr(old, field))
            saved = shape
    for live, name in ((sqs_backends, "sqs"), (sns_backends, "sns")):
        live.clear()
        live.update(saved[name])
    _queues(sqs_backends)
    epoch = saved.get("epoch")
    return str(epoch) if epoch is not None else None


def replay(path: Path, epoch: str | None) -> int:
    """Apply the journal beside snapshot ``path`` if it follows that snapshot; returns the entries applied."""
    journal = path.with_suffix(".journal")
    if not journal.exists():
        return 0
    lines = journal.read_text().splitlines()
    if not lines or json.loads(lines[0]) != {"op": "epoch", "id": epoch}:
        return 0  # a journal from before the snapshot: already in it
    applied = 0
    for line in lines[1:]:
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill was never answered for
        queue = sqs_backends[e["a"]][e["r"]].queues.get(e["q"])
        if queue is None:
            continue
        if e["op"] == "add":
            message = pickle.loads(base64.b64decode(e["m"]))
            for source in sqs_backends[e["a"]][e["r"]].queues.values():  # a redrive moved it from its source
                if source.dead_letter_queue is queue:
                    source._messages = [m for m in source._messages if m.id != message.id]
            queue._messages.append(message)
        elif e["op"] == "recv":
            for message in queue._messages:
                if message.id in e["ids"]:
                    message.approximate_receive_count += 1
        elif e["op"] == "del":
            queue._messages = [m for m in queue._messages if m.id not in e["ids"]]
        elif e["op"] == "purge":
            queue._messages = []
        applied += 1
    return applied


_epoch: str | None = None  # the snapshot's, which the journal and the topology file follow


def _write(path: Path, state: dict[str, Any]) -> None:
    """Pickle ``state`` to ``path`` atomically: a crash mid-write leaves the previous file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save(path: Path) -> None:
    """Write the SQS and SNS state (a snapshot), then start an empty journal that follows it."""
    global _epoch
    _epoch = uuid.uuid4().hex
    _forget_notifications()
    _write(path, {"sqs": sqs_backends, "sns": sns_backends, "epoch": _epoch})
    path.with_suffix(".topology").unlink(missing_ok=True)
    if _journal is not None:
        _journal.restart(_epoch)


def _forget_notifications() -> None:
    """moto's SNS topics keep every notification they sent (for moto's own inspection API, unused here)."""
    for regions in sns_backends.values():
        for backend in regions.values():
            for topic in backend.topics.values():
                topic.sent_notifications.clear()


def save_topology(path: Path) -> None:
    """Write the SQS and SNS state without the queues' messages beside snapshot ``path`` (under the lock)."""
    _forget_notifications()
    queues = list(_queues(sqs_backends).values())
    kept = [{field: getattr(q, field) for field in _MESSAGE_FIELDS} for q in queues]
    try:
        for queue in queues:
            queue._messages, queue._pending_messages, queue.deleted_messages = [], set(), set()
        _write(path.with_suffix(".topology"), {"sqs": sqs_backends, "sns": sns_backends, "epoch": _epoch})
    finally:
        for queue, fields in zip(queues, kept, strict=True):
            for field, value in fields.items():
                setattr(queue, field, value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    parser.add_argument("--state", type=Path, required=True, help="snapshot file; a journal goes beside it")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in broker.log
    global _journal
    applied = replay(args.state, load(args.state))
    _journal = Journal(args.state.with_suffix(".journal"))
    save(args.state)  # compacted: the snapshot now holds what the journal said
    logging.getLogger("msgbus.moto").warning("state loaded, %d journal entries replayed", applied)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        args.host, args.port, serialised(app, args.state), threaded=True, request_handler=MotoRequestHandler
    )
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
