"""Per-key order inside one receiver: the shared code every ordering adapter uses to keep a key's messages one
at a time when the broker hands one consumer several of them at once (an SQS FIFO batch, a single-active-consumer
queue, a stream partition).

The broker keeps a key's order *between* consumers (it hands a key's messages to one consumer at a time); a
``KeyHold`` keeps it *within* the consumer: of what the receiver fetched, a key's next delivery is handed to the
core only once the one before it is settled. The core's ``run(concurrency=N)`` then runs any number of keys at once
and each key in one worker at a time, with no ordering code of its own. Bookkeeping only: no I/O and no tasks; the
receiver does the broker calls its answers ask for.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from ._waits import wait_set


class _Keyed(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def key(self) -> str | None: ...


class _Delivery(Protocol):
    """What the hold reads of a delivery (``msgbus.adapter.Delivery``): its record's key and id."""

    @property
    def record(self) -> _Keyed: ...


D = TypeVar("D", bound=_Delivery)


class KeyHold(Generic[D]):
    """Holds a key's later deliveries in one receiver until the earlier one is settled. Task-safe in one event loop.

    The receiver calls:

    - ``admit(fetched)`` in ``receive``, in the broker's order: returns what may go to the core now (unkeyed
      deliveries, and the first of each key not already out) and holds the rest behind their key;
    - ``settled(d)`` once ``d`` is acked or dead-lettered for good: the next held delivery of its key becomes
      ready, and the next ``receive`` returns it first (``ready``);
    - ``released(d)`` when ``d`` goes back to the broker instead (nack, a failed ack, a lock lost): returns the
      deliveries held behind it, in order, which the receiver must give back to the broker too, so the broker
      redelivers the key from ``d`` in order; the key is free again;
    - ``drain()`` when it stops (``Receiver.release``, ``close``): everything held or ready, in fetch order, to
      give back. Deliveries already out stay with the core, which settles them as usual.

    Settling is recognised by identity and is idempotent: only the delivery that is out for a key moves it on. A
    message the broker delivers again (same record id) replaces its earlier delivery: the broker took that one back
    (its lock expired, an ``async for`` caller never settled it), so the earlier handle is stale and never settles.
    """

    def __init__(self) -> None:
        self._out: dict[str, D] = {}  # key -> its delivery with the core (handed out, or ready to be)
        self._held: dict[str, deque[D]] = {}  # key -> its later deliveries, in fetch order
        self._ready: deque[D] = deque()  # unblocked by ``settled``, not returned by ``receive`` yet
        self._count = 0  # held + ready
        self._changed: asyncio.Event | None = None  # set when something becomes ready

    def __len__(self) -> int:
        """Deliveries fetched and not handed out yet (held or ready): the receiver's read-ahead to bound."""
        return self._count

    def admit(self, fetched: Iterable[D]) -> list[D]:
        """Of ``fetched`` (in broker order), those to hand out now; the others are held behind their key."""
        out: list[D] = []
        for d in fetched:
            key = d.record.key
            if key is None:
                out.append(d)
            elif key not in self._out or self._out[key].record.id == d.record.id:
                self._out[key] = d  # new, or the one out delivered again
                out.append(d)
            else:
                waiting = self._held.setdefault(key, deque())
                again = [i for i, w in enumerate(waiting) if w.record.id == d.record.id]
                if again:
                    waiting[again[0]] = d  # a held one delivered again: keep its place, the fresh handle
                else:
                    waiting.append(d)
                    self._count += 1
        return out

    def ready(self, n: int) -> list[D]:
        """Up to ``n`` deliveries whose turn came (``settled``), oldest first, to return from ``receive``."""
        out: list[D] = []
        while self._ready and len(out) < n:
            out.append(self._ready.popleft())
        self._count -= len(out)
        return out

    def settled(self, delivery: D) -> None:
        """``delivery`` was acked or dead-lettered: the next delivery of its key (if held) becomes ready."""
        key = delivery.record.key
        if key is None or self._out.get(key) is not delivery:
            return
        waiting = self._held.get(key)
        if not waiting:
            del self._out[key]
            self._held.pop(key, None)
            return
        following = waiting.popleft()
        if not waiting:
            del self._held[key]
        self._out[key] = following
        self._ready.append(following)
        if self._changed is not None:
            self._changed.set()

    def released(self, delivery: D) -> list[D]:
        """``delivery`` goes back to the broker: the deliveries held behind it, in order, to give back with it."""
        key = delivery.record.key
        if key is None or self._out.get(key) is not delivery:
            return []
        del self._out[key]
        behind = list(self._held.pop(key, ()))
        self._count -= len(behind)
        return behind

    def behind(self, delivery: D) -> list[D]:
        """The deliveries held behind ``delivery`` (to extend their locks with its own)."""
        key = delivery.record.key
        if key is None or self._out.get(key) is not delivery:
            return []
        return list(self._held.get(key, ()))

    def drain(self) -> list[D]:
        """Everything held or ready, to give back to the broker; keys still out keep their place until settled."""
        out = list(self._ready)
        for d in self._ready:
            key = d.record.key
            assert key is not None
            if self._out.get(key) is d:
                del self._out[key]
        self._ready.clear()
        for waiting in self._held.values():
            out.extend(waiting)
        self._held.clear()
        self._count = 0
        return out

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until a delivery is ready; whether one is."""
        if self._ready:
            return True
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        await wait_set(self._changed, timeout)
        return bool(self._ready)
