"""``msgbus.adapter.wait_set``: a bounded wait on an event that never loses a cancel (msgbus/_waits.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from msgbus.adapter import wait_set


async def _wait_for_set(event: asyncio.Event, timeout: float) -> bool:
    """The wait it replaced: ``asyncio.wait_for`` (what the mutant below must be caught being)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()


async def _cancel_as_it_is_set(wait: Callable[[asyncio.Event, float], Awaitable[bool]]) -> str:
    """A receive loop waits on its event; the event is set and the loop's task cancelled in the same turn of the
    event loop (a message arrives as stop() cancels). Returns how the loop ended."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while rounds < 2:
            rounds += 1
            event.clear()
            await wait(event, 3600)

    task = asyncio.create_task(loop())
    for _ in range(3):  # the waiter is parked on the event (wait_for parks one task deeper)
        await asyncio.sleep(0)
    event.set()
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    if not task.done():  # the loop went on waiting: the cancel was lost
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return f"lost (round {rounds})"
    return "cancelled" if task.cancelled() else "returned"


async def test_a_cancel_that_arrives_as_the_event_is_set_ends_the_wait() -> None:
    assert await _cancel_as_it_is_set(wait_set) == "cancelled"


async def test_the_race_is_real_with_asyncio_wait_for() -> None:
    """The same race through ``asyncio.wait_for``: on Python 3.11 the cancel is lost (3.12 fixed it)."""
    import sys

    outcome = await _cancel_as_it_is_set(_wait_for_set)
    assert outcome == "cancelled" if sys.version_info >= (3, 12) else outcome.startswith("lost")


@pytest.mark.parametrize(("set_it", "expected"), [(True, True), (False, False)])
async def test_it_says_whether_the_event_was_set(set_it: bool, expected: bool) -> None:
    event = asyncio.Event()
    if set_it:
        asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 0.5 if set_it else 0.01) is expected
    assert await wait_set(event, 0) is expected  # no wait: what it is now
