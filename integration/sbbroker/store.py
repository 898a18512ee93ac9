"""The broker's state: entities, their messages, locks and schedules. No AMQP I/O here.

A *queue entity* owns one message queue; a *topic* owns one per subscription and copies each message
into every subscription (plain fan-out, no rules). Every message queue has a ``$DeadLetterQueue``.
An entity first named by a sender is *undetermined*: it keeps messages like a queue until a receiver
decides its kind (a subscription receiver makes it a topic and drops them, as a topic without
subscriptions would have).

Durability, as the service keeps it: every change a client is answered for (an entity or subscription made,
a message stored or scheduled, completed, dead-lettered, deferred, or its delivery count raised) is appended
to a journal (``Journal``) before the broker replies, straight to the kernel, so a killed broker loses
nothing it acknowledged. At start the last snapshot is loaded and the journal replayed over it; a graceful
stop writes a fresh snapshot and empties the journal. Locks are not kept: a message locked when the broker
stopped is available again, with the delivery count it had.

Duplicate detection (an entity's RequiresDuplicateDetection, set from the broker's configuration when the entity
is created, as the emulator's ``Config.json`` sets it): a message whose message id the entity saw within its
history window is accepted and dropped. On a partitioned entity the id counts per partition key (the session id,
else the message id, when there is none), as on the service. The history is journaled like the messages.
"""

from __future__ import annotations

import base64
import fnmatch
import heapq
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MAX_DELIVERY_COUNT = 10  # Service Bus' default MaxDeliveryCount
MAX_MESSAGE_ID = 128  # characters: the service's limit on MessageId


@dataclass
class Stored:
    """One message in one message queue."""

    seq: int
    raw: bytes
    enqueued: float
    delivery_count: int = 0
    deferred: bool = False
    dead_letter: dict[str, str] = field(default_factory=dict)  # DeadLetterReason, ... (application properties)
    token: uuid.UUID | None = None  # set while locked
    locked_until: float = 0.0
    holder: Any = None  # the link that holds the lock
    session: str | None = None  # the message's session id (AMQP group-id), read from ``raw``


@dataclass
class SessionLock:
    """Who holds a session (the sender link of a session receiver) and until when."""

    holder: Any
    until: float


class MessageQueue:
    """A queue, a subscription, or a dead-letter sub-queue: messages in sequence order, with locks.

    A message queue that requires sessions (``sessions``, decided by its first receiver, as the entity's
    RequiresSession would be) keeps one ready heap per session id instead of one for all, and session locks:
    a session is received from by one receiver at a time, in sequence order.
    """

    def __init__(self, path: str, *, dead_letter: bool = False) -> None:
        self.path = path
        self.messages: dict[int, Stored] = {}
        self.ready: list[int] = []  # heap of sequence numbers available to receivers
        self.consumers: list[Any] = []  # sender links of receivers, served round robin
        self.dlq = None if dead_letter else MessageQueue(path + "/$DeadLetterQueue", dead_letter=True)
        self.sessions: bool | None = False if dead_letter else None  # None: no receiver has decided yet
        self.by_session: dict[str, list[int]] = {}  # session id -> heap of its ready sequence numbers
        self.session_locks: dict[str, SessionLock] = {}
        self.session_state: dict[str, bytes] = {}  # get/set-session-state (not journaled)

    def add(self, msg: Stored) -> None:
        self.messages[msg.seq] = msg
        self.push(msg.seq)

    def push(self, seq: int) -> None:
        """Make message ``seq`` available again (in its session's heap on a session queue)."""
        if self.sessions:
            heapq.heappush(self.by_session.setdefault(self.messages[seq].session or "", []), seq)
        else:
            heapq.heappush(self.ready, seq)

    def require_sessions(self, on: bool) -> None:
        """Decide whether receivers need sessions; messages stored before move to their sessions' heaps."""
        self.sessions = on
        if on:
            ready, self.ready = self.ready, []
            for seq in ready:
                if seq in self.messages:
                    self.push(seq)

    def pop_ready(self, session: str | None = None) -> Stored | None:
        """The next available message (of ``session``, on a session queue)."""
        heap = self.by_session.get(session or "", []) if self.sessions else self.ready
        while heap:
            msg = self.messages.get(heapq.heappop(heap))
            if msg is not None and msg.token is None and not msg.deferred:
                return msg
        return None

    def free_session(self, now: float) -> str | None:
        """The unlocked session whose next message is oldest, if any has one (next-available session)."""
        best: tuple[int, str] | None = None
        for sid, heap in self.by_session.items():
            lock = self.session_locks.get(sid)
            if lock is not None and lock.until > now:
                continue
            while heap and not self._available(heap[0]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best[0]):
                best = (heap[0], sid)
        return None if best is None else best[1]

    def _available(self, seq: int) -> bool:
        msg = self.messages.get(seq)
        return msg is not None and msg.token is None and not msg.deferred


@dataclass
class Entity:
    """A queue or topic (or a name only senders have used so far)."""

    name: str
    kind: Literal["queue", "topic", "undetermined"]
    queue: MessageQueue | None = None  # queue / undetermined
    subscriptions: dict[str, MessageQueue] = field(default_factory=dict)
    scheduled: list[tuple[float, int, bytes]] = field(default_factory=list)  # heap (due, seq, raw)
    dedup_window: float = 0.0  # seconds of duplicate detection history (0: RequiresDuplicateDetection off)
    partitioned: bool = False  # EnablePartitioning: duplicate detection is per partition key
    seen: dict[str, float] = field(default_factory=dict)  # duplicate detection key -> first sent, oldest first


class Journal:
    """Append-only JSON lines, one ``os.write`` per change: in the kernel before the client's answer is sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, entry: dict[str, Any]) -> None:
        os.write(self._fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def truncate(self) -> None:
        """Empty the journal (its content is in a snapshot now)."""
        os.ftruncate(self._fd, 0)

    def close(self) -> None:
        os.close(self._fd)


def _group_id(raw: bytes) -> str | None:
    from .codec import group_id  # the store itself decodes nothing else

    return group_id(raw)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _dedup_key(raw: bytes, partitioned: bool) -> str | None:
    """What duplicate detection compares: the message id (on a partitioned entity with its partition key, which
    is the session id, else the id itself); None for a message without an id. ``ValueError`` for an id the
    service refuses (empty, over 128 characters)."""
    from .codec import group_id, message_annotations, message_id

    mid = message_id(raw)
    if mid is None:
        return None
    if not 0 < len(mid) <= MAX_MESSAGE_ID:
        raise ValueError(f"the MessageId must have 1 to {MAX_MESSAGE_ID} characters, got {len(mid)}")
    if not partitioned:
        return mid
    partition = message_annotations(raw).get("x-opt-partition-key") or group_id(raw) or mid
    return f"{partition}\n{mid}"


class Store:
    """Every entity, the sequence counter and the lock table; snapshots itself as JSON and journals changes."""

    def __init__(
        self,
        lock_duration: float,
        *,
        duplicate_detection: dict[str, float] | None = None,
        partitioned: tuple[str, ...] = (),
    ) -> None:
        self.lock_duration = lock_duration
        self.duplicate_detection = duplicate_detection or {}  # entity name pattern (fnmatch) -> window seconds
        self.partitioned = partitioned  # entity name patterns of partitioned entities
        self.entities: dict[str, Entity] = {}
        self.locks: dict[uuid.UUID, tuple[MessageQueue, Stored]] = {}
        self.locking: set[MessageQueue] = set()  # queues with session locks (checked for expiry every tick)
        self.seq = 0
        self.journal: Journal | None = None
        self.replayed = 0  # journal entries replayed at the last open()

    def _log(self, op: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.write({"op": op, **fields})

    # --- addressing ---

    def entity(self, name: str, kind: Literal["queue", "topic"] | None) -> Entity:
        """The entity ``name``, created on demand; ``kind`` (from a receiver) settles an undetermined one.

        Raises LookupError when the entity exists with the other kind.
        """
        ent = self.entities.get(name)
        if ent is None:
            ent = self._create(name, kind or "undetermined")
            self._log("entity", name=name, kind=ent.kind)
        elif kind is not None and ent.kind == "undetermined":
            self._settle(ent, kind)
            self._log("entity", name=name, kind=kind)
        elif kind is not None and ent.kind != kind:
            raise LookupError(f"'{name}' is a {ent.kind}, not a {kind}")
        return ent

    def _create(self, name: str, kind: Literal["queue", "topic", "undetermined"]) -> Entity:
        ent = Entity(name, kind)
        if kind != "topic":
            ent.queue = MessageQueue(name)
        self._configure(ent)
        self.entities[name] = ent
        return ent

    def _configure(self, ent: Entity) -> None:
        """The entity properties the broker's configuration gives names like this one (the first pattern wins)."""
        windows = [w for pattern, w in self.duplicate_detection.items() if fnmatch.fnmatchcase(ent.name, pattern)]
        ent.dedup_window = windows[0] if windows else 0.0
        ent.partitioned = any(fnmatch.fnmatchcase(ent.name, pattern) for pattern in self.partitioned)

    @staticmethod
    def _settle(ent: Entity, kind: Literal["queue", "topic"]) -> None:
        ent.kind = kind
        if kind == "topic":
            ent.queue = None  # published before any subscription existed: nobody gets those

    def _subscription(self, ent: Entity, name: str) -> MessageQueue:
        mq = ent.subscriptions[name] = MessageQueue(f"{ent.name}/Subscriptions/{name}")
        return mq

    def message_queue(self, path: str) -> MessageQueue:
        """The message queue for a receiver path: ``q``, ``t/Subscriptions/s``, either ``/$DeadLetterQueue``."""
        parts = path.strip("/").split("/")
        dead = parts[-1].lower() == "$deadletterqueue"
        if dead:
            parts = parts[:-1]
        if len(parts) == 3 and parts[1].lower() == "subscriptions":
            ent = self.entity(parts[0], "topic")
            mq = ent.subscriptions.get(parts[2])
            if mq is None:
                mq = self._subscription(ent, parts[2])
                self._log("sub", topic=ent.name, name=parts[2])
        elif len(parts) == 1 and parts[0]:
            mq = self.entity(parts[0], "queue").queue
            assert mq is not None
        else:
            raise LookupError(f"no such entity path '{path}'")
        if dead:
            assert mq.dlq is not None
            return mq.dlq
        return mq

    # --- messages ---

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def enqueue(self, ent: Entity, raw: bytes, seq: int | None = None) -> list[MessageQueue]:
        """Store ``raw`` in the entity's queue or in every subscription; returns the queues that got it."""
        seq = seq if seq is not None else self.next_seq()
        now = time.time()
        targets = list(ent.subscriptions.values()) if ent.kind == "topic" else [ent.queue] if ent.queue else []
        if targets:
            self._log("enq", paths=[mq.path for mq in targets], seq=seq, raw=_b64(raw), at=now)
        session = _group_id(raw)
        for mq in targets:
            mq.add(Stored(seq, raw, now, session=session))
        return targets

    def check_ids(self, ent: Entity, batch: list[bytes]) -> None:
        """``ValueError`` when a message of ``batch`` has an id duplicate detection refuses (the whole send fails)."""
        if ent.dedup_window:
            for raw in batch:
                _dedup_key(raw, ent.partitioned)

    def duplicate(self, ent: Entity, raw: bytes) -> bool:
        """Whether ``raw`` repeats a message id ``ent`` saw within its duplicate detection window: the service
        accepts such a send and drops the message. Otherwise the id is remembered from now (journaled); a repeat
        does not extend the window. Ids must have passed ``check_ids``."""
        if not ent.dedup_window:
            return False
        key = _dedup_key(raw, ent.partitioned)
        if key is None:
            return False
        now = time.time()
        while ent.seen:  # oldest first: forget what fell out of the window
            first, at = next(iter(ent.seen.items()))
            if at + ent.dedup_window > now:
                break
            del ent.seen[first]
        if key in ent.seen:
            return True
        self._log("seen", name=ent.name, key=key, at=now)
        ent.seen[key] = now
        return False

    def schedule(self, ent: Entity, raw: bytes, due: float) -> int:
        seq = self.next_seq()
        self._log("sched", name=ent.name, seq=seq, raw=_b64(raw), due=due)
        heapq.heappush(ent.scheduled, (due, seq, raw))
        return seq

    def cancel(self, ent: Entity, seqs: set[int]) -> None:
        self._log("unsched", name=ent.name, seqs=sorted(seqs))
        ent.scheduled = [item for item in ent.scheduled if item[1] not in seqs]
        heapq.heapify(ent.scheduled)

    def due(self, now: float) -> list[MessageQueue]:
        """Move scheduled messages whose time has come into their queues; returns the queues touched."""
        touched: list[MessageQueue] = []
        for ent in self.entities.values():
            while ent.scheduled and ent.scheduled[0][0] <= now:
                _, seq, raw = heapq.heappop(ent.scheduled)
                touched += self.enqueue(ent, raw, seq)
                self._log("unsched", name=ent.name, seqs=[seq])
        return touched

    def lock(self, mq: MessageQueue, msg: Stored, holder: Any) -> uuid.UUID:
        msg.token = uuid.uuid4()
        msg.locked_until = time.time() + self.lock_duration
        msg.holder = holder
        self.locks[msg.token] = (mq, msg)
        return msg.token

    def locked(self, token: uuid.UUID) -> tuple[MessageQueue, Stored] | None:
        """The message ``token`` locks, if that lock is still held."""
        return self.locks.get(token)

    def unlock(self, token: uuid.UUID) -> tuple[MessageQueue, Stored] | None:
        found = self.locks.pop(token, None)
        if found is not None:
            found[1].token = None
            found[1].holder = None
        return found

    def complete(self, token: uuid.UUID) -> bool:
        found = self.unlock(token)
        if found is not None:
            self.remove(*found)
        return found is not None

    def remove(self, mq: MessageQueue, msg: Stored) -> None:
        """The message is settled for good (completed, or handed out in receive-and-delete mode)."""
        self._log("done", path=mq.path, seq=msg.seq)
        del mq.messages[msg.seq]

    def release(self, token: uuid.UUID, *, count: bool) -> MessageQueue | None:
        """Make a locked message available again (``count``: as a failed delivery, abandon/expiry)."""
        found = self.unlock(token)
        if found is None:
            return None
        mq, msg = found
        if count:
            msg.delivery_count += 1
            self._log("count", path=mq.path, seq=msg.seq, count=msg.delivery_count)
            if msg.delivery_count >= MAX_DELIVERY_COUNT and mq.dlq is not None:
                self._dead_letter(
                    mq, msg, "MaxDeliveryCountExceeded", "Message could not be consumed after 10 attempts"
                )
                return mq.dlq
        mq.push(msg.seq)
        return mq

    def defer(self, token: uuid.UUID) -> bool:
        found = self.unlock(token)
        if found is not None:
            self._log("defer", path=found[0].path, seq=found[1].seq)
            found[1].deferred = True
        return found is not None

    def dead_letter(self, token: uuid.UUID, reason: str, description: str) -> MessageQueue | None:
        found = self.unlock(token)
        if found is None:
            return None
        mq, msg = found
        if mq.dlq is None:  # dead-lettering from a dead-letter queue completes the message
            self.remove(mq, msg)
            return None
        self._dead_letter(mq, msg, reason, description)
        return mq.dlq

    def _dead_letter(self, mq: MessageQueue, msg: Stored, reason: str, description: str) -> None:
        self._log("dead", path=mq.path, seq=msg.seq, reason=reason, description=description)
        self._move_to_dlq(mq, msg, reason, description)

    @staticmethod
    def _move_to_dlq(mq: MessageQueue, msg: Stored, reason: str, description: str) -> None:
        del mq.messages[msg.seq]
        assert mq.dlq is not None
        dead = Stored(msg.seq, msg.raw, msg.enqueued, msg.delivery_count, session=msg.session)
        dead.dead_letter = {"DeadLetterReason": reason, "DeadLetterErrorDescription": description}
        mq.dlq.add(dead)

    def expired(self, now: float) -> list[MessageQueue]:
        """Release every lock that ran out (a failed delivery: the count goes up); returns the queues touched.
        A message of a session is locked by its session's lock (``expired_sessions``)."""
        late = [t for t, (mq, msg) in self.locks.items() if msg.locked_until <= now and not mq.sessions]
        return [mq for t in late if (mq := self.release(t, count=True)) is not None]

    # --- sessions ---

    def require_sessions(self, mq: MessageQueue, on: bool) -> None:
        """Decide (once, journaled) whether ``mq`` requires sessions."""
        self._log("sessions", path=mq.path, on=on)
        mq.require_sessions(on)

    def lock_session(self, mq: MessageQueue, session: str, holder: Any) -> float:
        """Lock ``session`` for ``holder``; returns when the lock runs out."""
        until = time.time() + self.lock_duration
        mq.session_locks[session] = SessionLock(holder, until)
        self.locking.add(mq)
        return until

    def renew_session(self, mq: MessageQueue, session: str) -> float | None:
        """Extend a held session lock (and the locks of the messages it holds); None when it is not held."""
        lock = mq.session_locks.get(session)
        now = time.time()
        if lock is None or lock.until <= now:
            return None
        lock.until = now + self.lock_duration
        for owner, msg in self.locks.values():
            if owner is mq and msg.session == session:
                msg.locked_until = lock.until
        return lock.until

    def unlock_session(self, mq: MessageQueue, session: str) -> list[MessageQueue]:
        """Drop the session's lock; the messages it held are available again, each as a failed delivery.
        Returns the queues touched (``mq``, and its dead-letter queue for a message over the delivery limit)."""
        mq.session_locks.pop(session, None)
        if not mq.session_locks:
            self.locking.discard(mq)
        held = [t for t, (owner, msg) in self.locks.items() if owner is mq and msg.session == session]
        return [mq, *(q for t in held if (q := self.release(t, count=True)) is not None)]

    def expired_sessions(self, now: float) -> list[tuple[MessageQueue, str, Any]]:
        """The session locks that ran out: ``(queue, session, holder)``, still in place (``unlock_session``)."""
        return [
            (mq, sid, lock.holder)
            for mq in list(self.locking)
            for sid, lock in mq.session_locks.items()
            if lock.until <= now
        ]

    def queues(self) -> list[MessageQueue]:
        out: list[MessageQueue] = []
        for ent in self.entities.values():
            for mq in ([ent.queue] if ent.queue else []) + list(ent.subscriptions.values()):
                out += [mq, mq.dlq] if mq.dlq else [mq]
        return out

    # --- persistence: a snapshot, and the journal of changes since ---

    def open(self, path: Path) -> None:
        """Load the snapshot at ``path``, replay the journal beside it, compact both, and journal from now on."""
        journal = path.with_suffix(".journal")
        epoch = self.load(path)
        replayed = 0
        if journal.exists():
            lines = journal.read_text().splitlines()
            # A journal whose first line names another epoch is already in the snapshot (a stop wrote both).
            if lines and json.loads(lines[0]) == {"op": "epoch", "id": epoch}:
                for line in lines[1:]:
                    if line.strip():  # a line cut short by a kill was never answered for
                        try:
                            entry = json.loads(line)
                        except ValueError:
                            continue
                        self._replay(entry)
                        replayed += 1
        self.journal = Journal(journal)
        self.save(path)
        self.replayed = replayed

    def _find(self, path: str) -> MessageQueue:
        """The message queue at ``path`` (made by an earlier journal entry)."""
        parts = path.split("/")
        dead = parts[-1] == "$DeadLetterQueue"
        ent = self.entities[parts[0]]
        mq = ent.subscriptions[parts[2]] if len(parts) - dead == 3 else ent.queue
        assert mq is not None
        if dead:
            assert mq.dlq is not None
            return mq.dlq
        return mq

    def _replay(self, e: dict[str, Any]) -> None:
        op = e["op"]
        if op == "entity":
            ent = self.entities.get(e["name"])
            if ent is None:
                self._create(e["name"], e["kind"])
            elif ent.kind == "undetermined" and e["kind"] != "undetermined":
                self._settle(ent, e["kind"])
        elif op == "sub":
            ent = self.entities[e["topic"]]
            if e["name"] not in ent.subscriptions:
                self._subscription(ent, e["name"])
        elif op == "enq":
            raw = base64.b64decode(e["raw"])
            for path in e["paths"]:
                self._find(path).add(Stored(e["seq"], raw, e["at"], session=_group_id(raw)))
            self.seq = max(self.seq, e["seq"])
        elif op == "sched":
            heapq.heappush(self.entities[e["name"]].scheduled, (e["due"], e["seq"], base64.b64decode(e["raw"])))
            self.seq = max(self.seq, e["seq"])
        elif op == "unsched":
            self.cancel(self.entities[e["name"]], set(e["seqs"]))
        elif op == "seen":
            seen = self.entities[e["name"]].seen
            seen.pop(e["key"], None)  # remembered again after it expired: keep the oldest-first order
            seen[e["key"]] = e["at"]
        elif op == "sessions":
            self._find(e["path"]).require_sessions(e["on"])
        else:
            mq = self._find(e["path"])
            msg = mq.messages.get(e["seq"])
            if msg is None:
                return
            if op == "done":
                del mq.messages[msg.seq]
            elif op == "count":
                msg.delivery_count = e["count"]
            elif op == "defer":
                msg.deferred = True
            elif op == "dead":
                self._move_to_dlq(mq, msg, e["reason"], e["description"])

    def save(self, path: Path) -> None:
        """Write a snapshot (atomically) and start an empty journal in a new epoch."""

        def dump(mq: MessageQueue) -> list[dict[str, Any]]:
            return [
                {
                    "seq": m.seq,
                    "raw": _b64(m.raw),
                    "enq": m.enqueued,
                    "count": m.delivery_count,
                    "deferred": m.deferred,
                    "dl": m.dead_letter,
                }
                for m in sorted(mq.messages.values(), key=lambda m: m.seq)
            ]

        epoch = uuid.uuid4().hex
        state: dict[str, Any] = {"seq": self.seq, "epoch": epoch, "entities": []}
        for ent in self.entities.values():
            queues = {"": ent.queue} if ent.queue else {}
            queues.update(ent.subscriptions)
            state["entities"].append(
                {
                    "name": ent.name,
                    "kind": ent.kind,
                    "queues": {
                        k: {"live": dump(mq), "dead": dump(mq.dlq) if mq.dlq else [], "sessions": mq.sessions}
                        for k, mq in queues.items()
                    },
                    "scheduled": [[d, s, _b64(r)] for d, s, r in ent.scheduled],
                    "seen": list(ent.seen.items()),
                }
            )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)
        if self.journal is not None:
            self.journal.truncate()
            self.journal.write({"op": "epoch", "id": epoch})

    def load(self, path: Path) -> str | None:
        """Load the snapshot at ``path`` (if any); returns its epoch, which names the journal that follows it."""
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        self.seq = state["seq"]
        for e in state["entities"]:
            ent = Entity(e["name"], e["kind"])
            self._configure(ent)
            ent.seen = {key: at for key, at in e.get("seen", [])}
            self.entities[ent.name] = ent
            for key, q in e["queues"].items():
                mq = MessageQueue(f"{ent.name}/Subscriptions/{key}" if key else ent.name)
                if key:
                    ent.subscriptions[key] = mq
                else:
                    ent.queue = mq
                mq.sessions = q.get("sessions")
                for target, items in ((mq, q["live"]), (mq.dlq, q["dead"])):
                    assert target is not None
                    for m in items:
                        raw = base64.b64decode(m["raw"])
                        msg = Stored(m["seq"], raw, m["enq"], m["count"], m["deferred"], m["dl"])
                        msg.session = _group_id(raw)
                        target.messages[msg.seq] = msg
                        if not msg.deferred:
                            target.push(msg.seq)
            ent.scheduled = [(d, s, base64.b64decode(r)) for d, s, r in e["scheduled"]]
            heapq.heapify(ent.scheduled)
        epoch = state.get("epoch")
        return str(epoch) if epoch is not None else None
