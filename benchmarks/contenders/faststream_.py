"""What every FastStream contender shares: serving one subscriber until the workload says stop."""

from __future__ import annotations

import asyncio
from typing import Any

from msgbus._bench import OnBody


async def serve(subscriber: Any, on_body: OnBody, stop: asyncio.Event) -> None:
    """Register a handler that counts each body on ``subscriber``, run it until ``stop``, then stop it."""

    async def handle(body: bytes) -> None:
        on_body(body)

    subscriber(handle)
    await subscriber.start()
    await stop.wait()
    await subscriber.stop()
