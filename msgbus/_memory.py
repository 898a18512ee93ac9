"""The ``memory://`` backend: an in-process broker with the same delivery semantics as a real one.

``memory://`` is the default namespace and ``memory://<name>`` a separate one; every adapter in the
process that names the same namespace shares its queues, topics and subscriptions. Nothing survives
the process. Options: ``visibility_timeout`` (seconds a received message stays leased, default 30),
``max_message_size`` (bytes, default 1 MiB) and ``dedup_window`` (seconds a send repeating a message id is
dropped, at most the last ``DEDUP_REMEMBERED`` ids per queue; default 0: off, as on most brokers).

Design notes. All state of a namespace is guarded by one ``threading.Lock`` (the sync facade runs
the core on another thread's loop). No asyncio object lives in the shared state longer than one
``receive`` call: a waiting receiver registers a waiter bound to its own loop, and is woken when a
message becomes ready or when the earliest delay/lease deadline it computed passes. Delays and
lease expiries are applied lazily on the next ``receive`` (no timers, no tasks per message). Ready
messages are ordered by send sequence: fresh sends go to a deque (already in order), redeliveries
to a heap keyed by their original sequence, and ``receive`` takes the smaller head of the two.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

from ._url import BusURL, OptionReader
from .adapter import (
    Adapter,
    Capabilities,
    Delivery,
    Endpoint,
    Receiver,
    Record,
    dead_letter_record,
    dedup_key,
    deleted_queue,
)
from .errors import ClosedError, ConfigError, MessageTooLarge, TopologyError

__all__ = ["MemoryAdapter", "create", "reset"]

_READY, _DELAYED, _BLOCKED, _LEASED, _GONE = range(5)
_ACK, _NACK, _DEAD_LETTER, _RELEASE = range(4)
_FOREVER = float("inf")
DEDUP_REMEMBERED = 100_000  # send ids a queue remembers for deduplication; older ones are forgotten first


class _Message:
    """One stored copy of a record in one queue, subscription or dead-letter destination."""

    __slots__ = ("attempt", "given_back", "key", "lease_deadline", "record", "seq", "state", "visible_at")

    def __init__(self, record: Record, seq: int, key: str | None) -> None:
        self.record = record
        self.seq = seq  # send order within its store
        self.key = key  # None when unkeyed or when the store does not order by key
        self.attempt = 0  # leases so far: the token of the current one
        self.given_back = 0  # leases a stopping consumer gave back unhandled: not deliveries (``release_many``)
        self.state = _READY
        self.visible_at = 0.0
        self.lease_deadline = 0.0


class _Waiter:
    """A receiver blocked in ``receive``: a future on the receiver's own loop, woken at most once."""

    __slots__ = ("fut", "loop", "wake_at", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_at: float) -> None:
        self.loop = loop
        self.fut: asyncio.Future[None] = loop.create_future()
        self.wake_at = wake_at  # monotonic time at which it wakes by itself
        self.woken = False

    def wake(self) -> None:
        """Wake the waiter from any thread; a waiter whose loop is gone is ignored."""
        if self.woken:
            return
        self.woken = True
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            _resolve(self.fut)
        elif not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(_resolve, self.fut)
            except RuntimeError:  # the loop closed in between
                pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Namespace:
    """Everything one ``memory://<name>`` holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, _Store] = {}
        self.topics: dict[str, dict[str, _Store]] = {}  # topic -> subscription -> store


# A lease entry covers every message leased by one take (or one extend) with the same deadline.
_LeaseEntry = tuple[float, int, list[_Message]]


class _Store:
    """Messages of one queue, subscription or dead-letter destination. Callers hold ``ns.lock``.

    A message's lease is identified by its ``attempt``: a settle carrying an older attempt is stale.
    Lease entries are not removed on settle; they are skipped when they come due, and compacted
    once stale references outnumber live leases, so memory stays proportional to what is held.
    """

    def __init__(self, ns: _Namespace, *, ordered: bool, with_dead_letters: bool) -> None:
        self.ns = ns
        self.ordered = ordered
        self.dead_letters = _Store(ns, ordered=False, with_dead_letters=False) if with_dead_letters else None
        self.count = 0  # messages present, in any state
        self.leased = 0
        self._seq = 0
        self._ready: deque[_Message] = deque()  # in sequence order
        self._ready_heap: list[tuple[int, _Message]] = []  # redelivered, by original sequence
        self._delayed: list[tuple[float, int, _Message]] = []
        self._leases: deque[_LeaseEntry] = deque()  # in deadline order
        self._lease_heap: list[_LeaseEntry] = []  # deadlines that arrived out of order
        self._lease_refs = 0  # message references held by lease entries, live or stale
        self._lease_no = itertools.count()
        self._keys: dict[str, deque[_Message]] = {}  # key -> its present messages, in send order
        self._sent: dict[str, float] = {}  # dedup_key -> until when a send repeating it is dropped
        self._sent_order: deque[tuple[float, str]] = deque()  # the same, oldest first
        self.waiters: set[_Waiter] = set()

    # -- adding ---------------------------------------------------------------------------------

    def add(self, records: Sequence[Record], visible_at: float, now: float, dedup: float = 0.0) -> None:
        """Store records in send order (visible from ``visible_at``; 0 means now); with ``dedup`` seconds, not those
        repeating a send of the last ``dedup`` seconds (``dedup_key``)."""
        if dedup:
            records = self._unseen(records, now, dedup)
        ready_append = self._ready.append
        ordered = self.ordered
        seq = self._seq
        for r in records:
            key = r.key if ordered else None
            msg = _Message(r, seq, key)
            seq += 1
            if key is None and not visible_at:
                ready_append(msg)  # a fresh sequence number is the largest: the deque stays sorted
            else:
                self._add_slow(msg, visible_at, now)
        self.count += seq - self._seq
        self._seq = seq

    def _unseen(self, records: Sequence[Record], now: float, window: float) -> list[Record]:
        """The records whose ``dedup_key`` was not sent within its window, remembered from now on for ``window``."""
        sent, order = self._sent, self._sent_order
        while order and (order[0][0] <= now or len(order) > DEDUP_REMEMBERED):
            until, key = order.popleft()
            if sent.get(key) == until:
                del sent[key]
        out: list[Record] = []
        for r in records:
            key = dedup_key(r)
            if sent.get(key, 0.0) > now:
                continue
            sent[key] = now + window
            order.append((now + window, key))
            out.append(r)
        return out

    def _add_slow(self, msg: _Message, visible_at: float, now: float) -> None:
        if msg.key is not None:
            same_key = self._keys.get(msg.key)
            if same_key:
                same_key.append(msg)
                msg.state = _BLOCKED  # until every earlier message with its key is gone
                msg.visible_at = visible_at
                return
            self._keys[msg.key] = deque((msg,))
        self._make_eligible(msg, visible_at, now)

    def _make_eligible(self, msg: _Message, visible_at: float, now: float) -> None:
        """Route a message that is neither leased nor blocked to ready or delayed."""
        msg.visible_at = visible_at
        if visible_at > now:
            msg.state = _DELAYED
            heapq.heappush(self._delayed, (visible_at, msg.seq, msg))
            self._due_added(visible_at)
        else:
            self._push_ready(msg)

    def _push_ready(self, msg: _Message) -> None:
        msg.state = _READY
        if not self._ready or msg.seq > self._ready[-1].seq:
            self._ready.append(msg)
        else:
            heapq.heappush(self._ready_heap, (msg.seq, msg))

    def _due_added(self, due: float) -> None:
        """A deadline was added: waiters sleeping past it must wake to re-plan."""
        for w in self.waiters:
            if w.wake_at > due:
                w.wake()

    def notify(self) -> None:
        """Wake every waiter when something is ready; they race for it and re-wait if they lose."""
        if self.waiters and (self._ready or self._ready_heap):
            for w in self.waiters:
                w.wake()

    # -- taking ---------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Apply delays and lease expiries that are due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            self._push_ready(heapq.heappop(delayed)[2])
        leases = self._leases
        while leases and leases[0][0] <= now:
            self._expire(leases.popleft()[2], now)
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            self._expire(heapq.heappop(heap)[2], now)

    def _expire(self, msgs: list[_Message], now: float) -> None:
        self._lease_refs -= len(msgs)
        for msg in msgs:
            # Settled, re-leased later or extended messages are not due: their state or deadline says so.
            if msg.state == _LEASED and msg.lease_deadline <= now:
                self.leased -= 1
                self._push_ready(msg)

    def take(self, n: int, now: float, lease: float) -> list[_Message]:
        """Lease up to ``n`` ready messages in sequence order."""
        self._advance(now)
        out: list[_Message] = []
        ready, heap = self._ready, self._ready_heap
        deadline = now + lease
        if not heap:
            pop = ready.popleft
            for _ in range(min(n, len(ready))):
                msg = pop()
                msg.state = _LEASED
                msg.attempt += 1
                msg.lease_deadline = deadline
                out.append(msg)
        else:
            while len(out) < n and (ready or heap):
                fresh_first = ready and not (heap and heap[0][0] < ready[0].seq)
                msg = ready.popleft() if fresh_first else heapq.heappop(heap)[1]
                msg.state = _LEASED
                msg.attempt += 1
                msg.lease_deadline = deadline
                out.append(msg)
        if out:
            self.leased += len(out)
            self._push_lease(deadline, out)
        return out

    def _push_lease(self, deadline: float, msgs: list[_Message]) -> None:
        entry = (deadline, next(self._lease_no), msgs)
        if not self._leases or deadline >= self._leases[-1][0]:
            self._leases.append(entry)
        else:
            heapq.heappush(self._lease_heap, entry)
        self._lease_refs += len(msgs)
        if self.waiters:
            self._due_added(deadline)

    def compact(self) -> None:
        """Drop stale lease references once they outnumber live leases (amortised O(1) per settle)."""
        if self._lease_refs <= 2 * self.leased + 1024:
            return

        def live(entries: Iterable[_LeaseEntry]) -> Iterator[_LeaseEntry]:
            for deadline, no, msgs in entries:
                keep = [m for m in msgs if m.state == _LEASED and m.lease_deadline == deadline]
                if keep:
                    yield deadline, no, keep

        self._leases = deque(live(self._leases))
        self._lease_heap = list(live(self._lease_heap))
        heapq.heapify(self._lease_heap)
        self._lease_refs = sum(len(e[2]) for e in self._leases) + sum(len(e[2]) for e in self._lease_heap)

    def next_due(self) -> float:
        """The earliest time a delay or lease may make something ready (``inf`` when none)."""
        due = _FOREVER
        if self._delayed:
            due = self._delayed[0][0]
        if self._leases:
            due = min(due, self._leases[0][0])
        if self._lease_heap:
            due = min(due, self._lease_heap[0][0])
        return due

    # -- settling (the caller checked that the lease is live and counted it off ``leased``) -----

    def extend(self, msg: _Message, seconds: float, now: float) -> None:
        msg.lease_deadline = now + seconds
        self._push_lease(msg.lease_deadline, [msg])

    def release(self, msg: _Message, visible_at: float, now: float) -> None:
        """Nack: deliverable again at ``visible_at``, keeping its place in the order."""
        self._make_eligible(msg, visible_at, now)

    def remove(self, msg: _Message, now: float) -> None:
        """Ack or dead-letter: gone for good; the next message with its key is unblocked."""
        msg.state = _GONE
        self.count -= 1
        if msg.key is not None:
            same_key = self._keys[msg.key]
            same_key.popleft()  # only the head of a key is ever leased
            if same_key:
                nxt = same_key[0]
                self._make_eligible(nxt, nxt.visible_at, now)
            else:
                del self._keys[msg.key]


class _MemoryDelivery(Delivery):
    """A leased message; settling checks the lease (its attempt), so a stale handle changes nothing."""

    __slots__ = ("_lease", "_msg", "_receiver", "_settled")

    def __init__(self, receiver: _MemoryReceiver, msg: _Message) -> None:
        # Base __init__ inlined: this runs once per received message.
        self.record = msg.record
        self._lease = msg.attempt
        self.attempt = msg.attempt - msg.given_back
        self.raw = self.problem = None
        self._receiver = receiver
        self._msg = msg
        self._settled = False

    async def ack(self) -> None:
        self._receiver.settle((self,), _ACK, 0.0, "")

    async def nack(self, delay: float | None = None) -> None:
        self._receiver.settle((self,), _NACK, delay or 0.0, "")

    async def dead_letter(self, reason: str) -> None:
        self._receiver.settle((self,), _DEAD_LETTER, 0.0, reason)

    async def extend(self, seconds: float) -> None:
        """Keep the message leased for ``seconds`` from now (ignored when the lease was lost)."""
        store = self._receiver.store
        msg = self._msg
        with store.ns.lock:
            if not self._settled and msg.state == _LEASED and msg.attempt == self._lease:
                store.extend(msg, seconds, time.monotonic())


class _MemoryReceiver(Receiver):
    """Leases messages from one store, as many as asked for (the consumer's inbox keeps the prefetch limit)."""

    def __init__(self, adapter: MemoryAdapter, store: _Store, endpoint: Endpoint) -> None:
        self.store = store
        self._adapter = adapter
        self._endpoint = endpoint
        self._closed = False
        self._waiter: _Waiter | None = None  # set while receive() sleeps

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for a ready message; lease up to ``max_messages``.

        Returns ``[]`` on timeout or when the receiver is closed meanwhile. Not task-safe: one
        ``receive`` at a time per receiver.
        """
        if self._closed:
            raise ClosedError(f"receiver for {self._endpoint} is closed")
        loop = asyncio.get_running_loop()
        store, lock, lease = self.store, self.store.ns.lock, self._adapter.visibility_timeout
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._closed:
            if max_messages <= 0:
                return []
            with lock:
                now = time.monotonic()
                taken = store.take(max_messages, now, lease)
                if taken:
                    store.notify()  # leftovers for other waiters
                    return [_MemoryDelivery(self, msg) for msg in taken]
                if now >= deadline:
                    return []
                wake_at = min(deadline, store.next_due())
                waiter = _Waiter(loop, wake_at)
                store.waiters.add(waiter)
            self._waiter = waiter
            timer = loop.call_later(wake_at - now, _resolve, waiter.fut) if wake_at != _FOREVER else None
            try:
                await waiter.fut
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
                with lock:
                    store.waiters.discard(waiter)
        return []

    def settle(self, deliveries: Sequence[_MemoryDelivery], action: int, delay: float, reason: str) -> None:
        """Apply one settlement to deliveries of this receiver; stale or repeated ones are no-ops."""
        store = self.store
        with store.ns.lock:
            now = time.monotonic()
            for d in deliveries:
                if d._settled:
                    continue
                d._settled = True
                msg = d._msg
                if msg.state != _LEASED or msg.attempt != d._lease:
                    continue  # the lease expired and the message moved on
                store.leased -= 1
                if action == _ACK:
                    if msg.key is None:
                        msg.state = _GONE
                        store.count -= 1
                    else:
                        store.remove(msg, now)
                elif action == _NACK:
                    store.release(msg, now + delay, now)
                elif action == _RELEASE:
                    msg.given_back += 1
                    store.release(msg, now, now)
                else:
                    store.remove(msg, now)
                    target = store.dead_letters
                    if target is None:  # already a dead-letter destination: back to its end
                        store.add((msg.record,), 0.0, now)
                    else:
                        target.add((dead_letter_record(msg.record, reason, d.attempt, self._endpoint),), 0.0, now)
                        target.notify()
            store.compact()
            store.notify()

    def _mine(self, deliveries: Sequence[Delivery]) -> tuple[list[_MemoryDelivery], list[Delivery]]:
        """``deliveries`` split into this receiver's and the others."""
        mine: list[_MemoryDelivery] = []
        others: list[Delivery] = []
        for d in deliveries:
            if isinstance(d, _MemoryDelivery) and d._receiver is self:
                mine.append(d)
            else:
                others.append(d)
        return mine, others

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack a batch under one lock acquisition."""
        mine, others = self._mine(deliveries)
        for d in others:
            await d.ack()
        self.settle(mine, _ACK, 0.0, "")

    async def release_many(self, deliveries: Sequence[Delivery]) -> None:
        """A stopping consumer's buffer, back under one lock acquisition and uncounted: the lease given back is
        not a delivery, so the next one reports the attempt the message had."""
        mine, others = self._mine(deliveries)
        self.settle(mine, _RELEASE, 0.0, "")
        await super().release_many(others)

    async def close(self) -> None:
        """Stop receiving; unsettled deliveries keep their leases until they expire. Idempotent."""
        self._closed = True
        if self._waiter is not None:
            self._waiter.wake()
        self._adapter._receivers.discard(self)


class MemoryAdapter(Adapter):
    """An adapter over one in-process namespace. Every method is task-safe and thread-safe."""

    # A lease is a function call with no round trip to save: a larger credit only keeps messages from
    # competing consumers in the same process.
    credit = 32

    coalesce_sends = False  # send never waits: there is nothing to share

    def __init__(
        self,
        url: BusURL,
        namespace: _Namespace,
        visibility_timeout: float,
        max_message_size: int,
        dedup_window: float = 0.0,
    ) -> None:
        self.url = url
        self.visibility_timeout = visibility_timeout
        self.max_message_size = max_message_size
        self.dedup_window = dedup_window
        self.capabilities = Capabilities(
            ordering="per_key",
            delayed_delivery=True,
            max_delay=None,
            delayed_nack=True,
            native_dead_letter=True,
            max_message_size=max_message_size,
            persistence="none",
            cross_process=False,
            lock_extension=True,
            lock_duration=visibility_timeout,
            restartable=False,
            counts_deliveries=True,  # every lease counts, expired or released
            dedup_window=dedup_window or None,
        )
        self._ns = namespace
        self._closed = False
        self._receivers: set[_MemoryReceiver] = set()

    def __repr__(self) -> str:
        return f"MemoryAdapter({self.url.redacted!r})"

    async def open(self) -> None:
        """Nothing to connect to; reopening a closed adapter is allowed."""
        self._closed = False

    async def close(self) -> None:
        """Close every receiver of this adapter; the namespace and its messages stay. Idempotent."""
        self._closed = True
        for r in list(self._receivers):
            await r.close()

    async def ping(self) -> None:
        """In-process: the backend answers whenever the adapter is open."""
        self._check_open()

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """Counted in the store: waiting, leased, dead letters, and this process's receivers of it."""
        with self._ns.lock:
            store = self._find(endpoint, create=False, receiving=True)
            assert store is not None and store.dead_letters is not None
            receivers = sum(1 for r in self._receivers if r.store is store)
            return {
                "depth": store.count - store.leased,
                "in_flight": store.leased,
                "dead_letters": store.dead_letters.count,
                "consumers": receivers,
            }

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create (or with ``create=False`` verify) the queue, topic or subscription; idempotent."""
        with self._ns.lock:
            self._find(endpoint, create=create, receiving=False)

    async def delete(self, endpoint: Endpoint) -> None:
        """Forget the queue and its dead letters; receivers still reading it see no more messages. Idempotent."""
        name = deleted_queue(endpoint)
        self._check_open()
        with self._ns.lock:
            self._ns.queues.pop(name, None)

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """Store every record (all or none) at a queue, topic, subscription or dead-letter destination.

        Publishing to a topic copies each record into every current subscription (none: dropped).
        A queue or topic that does not exist yet is created.
        """
        self._check_open()
        limit = self.max_message_size
        for r in records:
            size = r.size()
            if size > limit:
                raise MessageTooLarge(size, limit)
        with self._ns.lock:
            now = time.monotonic()
            visible_at = now + delay if delay and delay > 0 else 0.0
            for store in self._targets(endpoint):
                store.add(records, visible_at, now, self.dedup_window)
                store.notify()

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> Receiver:
        """Receive from a queue, a subscription, or a dead-letter destination (created if missing)."""
        self._check_open()
        with self._ns.lock:
            store = self._find(endpoint, create=True, receiving=True)
        assert store is not None
        r = _MemoryReceiver(self, store, endpoint)
        self._receivers.add(r)
        return r

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")

    def _targets(self, endpoint: Endpoint) -> list[_Store]:
        """The stores a send reaches: a topic fans out to all its subscriptions."""
        if endpoint.kind == "topic" and endpoint.subscription is None:
            if endpoint.dead_letter:
                raise ConfigError(f"{endpoint}: a topic has no dead-letter destination, its subscriptions do")
            return list(self._ns.topics.setdefault(endpoint.name, {}).values())
        store = self._find(endpoint, create=True, receiving=True)
        assert store is not None
        return [store]

    def _find(self, endpoint: Endpoint, *, create: bool, receiving: bool) -> _Store | None:
        """The store an endpoint names, creating it (and its topic) when allowed. Caller holds the lock."""
        ns = self._ns
        if endpoint.kind == "queue":
            if endpoint.subscription is not None:
                raise ConfigError(f"queue {endpoint.name!r} cannot have a subscription")
            store = ns.queues.get(endpoint.name)
            if store is None:
                if not create:
                    raise TopologyError(f"{endpoint} does not exist (topology=verify)")
                store = ns.queues[endpoint.name] = _Store(ns, ordered=True, with_dead_letters=True)
        elif endpoint.kind == "topic":
            subs = ns.topics.get(endpoint.name)
            if subs is None:
                if not create:
                    raise TopologyError(f"topic:{endpoint.name} does not exist (topology=verify)")
                subs = ns.topics[endpoint.name] = {}
            if endpoint.subscription is None:
                if receiving or endpoint.dead_letter:
                    raise ConfigError(f"{endpoint}: receiving from a topic needs a subscription")
                return None
            store = subs.get(endpoint.subscription)
            if store is None:
                if not create:
                    raise TopologyError(f"{endpoint} does not exist (topology=verify)")
                store = subs[endpoint.subscription] = _Store(ns, ordered=True, with_dead_letters=True)
        else:
            raise ConfigError(f"unknown endpoint kind {endpoint.kind!r}")
        if endpoint.dead_letter:
            assert store.dead_letters is not None
            return store.dead_letters
        return store


_namespaces: dict[str, _Namespace] = {}
_registry_lock = threading.Lock()


def _namespace(name: str) -> _Namespace:
    with _registry_lock:
        ns = _namespaces.get(name)
        if ns is None:
            ns = _namespaces[name] = _Namespace()
        return ns


def reset(namespace: str | None = None) -> None:
    """Forget one namespace (``""`` is the default) or, with no argument, all of them.

    Adapters created earlier keep their (now private) namespace; new ones start empty.
    """
    with _registry_lock:
        if namespace is None:
            _namespaces.clear()
        else:
            _namespaces.pop(namespace, None)


def create(url: BusURL, options: OptionReader) -> Adapter:
    """Entry point for ``memory://[namespace]``; reads its options (see the module docstring)."""
    if url.path not in ("", "/"):
        raise ConfigError(f"{url.redacted!r}: memory:// takes no path; name a namespace as memory://<name>")
    if url.port is not None or url.username is not None or url.password is not None:
        raise ConfigError("memory:// takes only a namespace name, e.g. memory://tests")
    visibility_timeout = options.float("visibility_timeout", 30.0, min=0.001)
    max_message_size = options.int("max_message_size", 1_048_576, min=1)
    dedup_window = options.float("dedup_window", 0.0, min=0.0)
    return MemoryAdapter(url, _namespace(url.host or ""), visibility_timeout, max_message_size, dedup_window)
