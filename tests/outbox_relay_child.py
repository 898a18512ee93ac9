"""A relay process for tests/test_outbox.py, killed at random: ``python outbox_relay_child.py SRC DST [--broken]``.

``--broken`` is the mutation the kill test must catch: rows leave the outbox *before* the bus has them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from msgbus._bus import Bus
from msgbus.outbox import Relay, _Source


class BrokenRelay(Relay):
    async def _send(self, source: _Source, bus: Bus, group: Sequence[tuple[int, str, bytes, bytes]]) -> list[int]:
        await source.remove([row[0] for row in group])  # deleted first: a kill now loses the group
        await asyncio.sleep(0.05)
        return await super()._send(source, bus, group)


def main() -> None:
    source, target, *flags = sys.argv[1:]
    relay = (BrokenRelay if "--broken" in flags else Relay)(source, target, batch=20, poll_interval=0.05)
    asyncio.run(relay.run())


if __name__ == "__main__":
    main()
