"""A redrive that dies between sending a batch back and removing its dead letters, for tests/test_redrive.py.

``python redrive_crash_child.py URL QUEUE``: redrive QUEUE's dead letters; the moment the first batch's send back
returned (durable), print ``{"sent": [ids]}`` and exit with ``os._exit`` (no ack, no close), as a killed
operator process would.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence

import msgbus
from msgbus.adapter import Endpoint, Record


async def main(url: str, queue: str) -> None:
    bus = msgbus.connect(url)
    real_send = bus.adapter.send

    async def send_then_die(endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        await real_send(endpoint, records, delay)
        print(json.dumps({"sent": [r.id for r in records]}), flush=True)
        os._exit(0)

    bus.adapter.send = send_then_die  # type: ignore[method-assign]
    async with bus:
        await bus.redrive(queue)
    print(json.dumps({"error": "the redrive returned"}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
