"""Waiting with a bound without losing a cancel: ``asyncio.timeout``, never ``asyncio.wait_for``.

On Python 3.11, ``asyncio.wait_for`` returns normally when what it waits on finished just as its task was
cancelled, and the cancel is gone (fixed in 3.12). A receive loop, a relay or a consume loop waiting that way
missed the cancel of stop(), close() or a timeout around it and went on waiting. ``tests/test_api.py`` keeps
``asyncio.wait_for`` out of the library and the adapters.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (``None``: no bound); whether it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
