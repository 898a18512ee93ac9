"""What a contract check gets: the bus under test, fresh names, volumes, hooks, and cleanup."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgbus
from msgbus import Bus, Capabilities

__all__ = ["ContractContext", "ContractFailure", "ContractSkip", "RestartHook", "Tally", "ensure", "examples", "fail"]

RestartHook = Callable[[], Awaitable[None]]


class ContractFailure(AssertionError):
    """A broken promise; the message says what was expected and what happened, with counts."""


class ContractSkip(Exception):
    """The check does not apply to this backend; the message is the reason (e.g. a capability name)."""


def fail(message: str) -> NoReturn:
    """Fail the running check with ``message``."""
    raise ContractFailure(message)


def ensure(condition: bool, message: str) -> None:
    """Fail the running check with ``message`` unless ``condition`` holds (not stripped by ``python -O``)."""
    if not condition:
        raise ContractFailure(message)


def examples(ids: Iterable[object], limit: int = 3) -> str:
    """A few of ``ids`` for a failure message."""
    items = sorted(str(i) for i in ids)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class Tally:
    """Deliveries counted by message id (duplicates included); a check can wait for a count to be reached.

    Not thread-safe; meant for one event loop, like the checks.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.order: list[str] = []
        self._changed = asyncio.Event()

    def add(self, msg_id: str) -> None:
        self.counts[msg_id] += 1
        self.order.append(msg_id)
        self._changed.set()

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return len(self.order)

    @property
    def dups(self) -> int:
        """Deliveries beyond the first of each id."""
        return self.total - self.distinct

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self.counts

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded only by the check's deadline) until ``condition()`` holds after some ``add``."""
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    async def wait_distinct(self, n: int) -> None:
        await self.wait_until(lambda: self.distinct >= n)

    def summary(self, sent: set[str] | list[str], *, what: str = "received") -> str:
        """``"N sent, N received, 0 lost, 0 dup, 0 unexpected"`` for the ids ``sent``."""
        expected = set(sent)
        lost = expected - set(self.counts)
        unexpected = set(self.counts) - expected
        return f"{len(expected)} sent, {self.distinct} {what}, {len(lost)} lost, {self.dups} dup" + (
            f", {len(unexpected)} unexpected" if unexpected else ""
        )

    def ensure_exact(self, sent: set[str] | list[str], label: str, *, allow_dups: bool = False) -> str:
        """Fail unless every id in ``sent`` arrived, nothing else did, and (unless allowed) none twice."""
        expected = set(sent)
        line = f"{label}: {self.summary(expected)}"
        lost = expected - set(self.counts)
        unexpected = set(self.counts) - expected
        dup_ids = [i for i, c in self.counts.items() if c > 1]
        problems = []
        if lost:
            problems.append(f"lost e.g. {examples(lost)}")
        if unexpected:
            problems.append(f"unexpected ids e.g. {examples(unexpected)}")
        if dup_ids and not allow_dups:
            problems.append(f"delivered twice e.g. {examples(dup_ids)}")
        ensure(not problems, f"{line} ({'; '.join(problems)})")
        return line


@dataclass(eq=False)
class ContractContext:
    """Everything one check run needs. Each check gets a fresh context and a fresh, opened ``bus``.

    ``quick`` scales volumes down (``scale``); ``name()`` gives unique queue/topic/subscription names so
    checks never see each other's messages; ``connect()`` opens more buses on the same URL (closed for you);
    ``background()`` starts tasks that are cancelled when the check ends; ``note()`` adds to the result detail.
    """

    url: str
    quick: bool = False
    restart_broker: RestartHook | None = None
    slug: str = "check"
    bus: Bus = field(init=False)
    notes: list[str] = field(default_factory=list)
    waiting: str | Callable[[], str] = "starting"  # what the check waits for (reported when the deadline passes)
    _buses: list[Bus] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def waiting_for(self) -> str:
        return self.waiting() if callable(self.waiting) else self.waiting

    @property
    def caps(self) -> Capabilities:
        return self.bus.capabilities

    def scale(self, full: int, quick: int) -> int:
        """A volume: ``full`` normally, ``quick`` in quick mode."""
        return quick if self.quick else full

    def name(self, role: str = "q") -> str:
        """A fresh name (letters, digits, '-') unique to this run, e.g. ``ct-ack-removes-q-1f2e3d4c5b``."""
        short = re.sub(r"[^a-z0-9]+", "-", self.slug.lower()).strip("-")[:24]
        return f"ct-{short}-{role}-{uuid.uuid4().hex[:10]}"

    def connect(self) -> Bus:
        """Another bus on the URL under test (not opened yet); closed when the check ends."""
        bus = msgbus.connect(self.url)
        self._buses.append(bus)
        return bus

    async def open_bus(self) -> Bus:
        bus = self.connect()
        await bus.open()
        return bus

    def background(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that is cancelled (if still running) when the check ends."""
        task = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.append(task)
        return task

    def failed_tasks(self) -> list[str]:
        """What ended the background tasks that died with an exception (a stuck check's likely cause)."""
        died = [t for t in self._tasks if t.done() and not t.cancelled() and t.exception() is not None]
        return [f"{t.get_name()}: {type(t.exception()).__name__}: {t.exception()}" for t in died]

    def on_cleanup(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._cleanups.append(fn)

    def note(self, text: str) -> None:
        """Add a line to the check's result detail (counts, what was measured)."""
        self.notes.append(text)

    @property
    def lock_duration(self) -> float | None:
        return self.caps.lock_duration

    @property
    def quiet(self) -> float:
        """A "nothing must arrive" window for things that would show up at once if they were wrong."""
        return 0.3 if self.quick else 0.6

    @property
    def lock_window(self) -> float:
        """A quiet window long enough that an unsettled message would have come back after its lock expired."""
        return self.quiet + 1.2 * (self.lock_duration or 0.0)

    def lock_window_after(self, since: float) -> float:
        """What is left of a ``lock_window`` that started at ``since`` (``time.monotonic()``), at least ``quiet``:
        a message last handled at ``since`` whose ack was lost is back before it ends."""
        return max(self.quiet, since + self.lock_window - time.monotonic())

    async def cleanup(self) -> None:
        """Cancel background tasks, run cleanup hooks, close every bus this check opened."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fn in reversed(self._cleanups):
            try:
                await fn()
            except Exception:
                pass
        for bus in self._buses:
            try:
                await bus.close()
            except Exception:
                pass
