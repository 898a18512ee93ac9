"""A responder for tests/test_request_reply.py that dies between its reply and its ack.

``python reply_crash_child.py URL QUEUE``: under ``run()``, reply to the first request of ``QUEUE`` with
``{"by": "child", "attempt": n}``, print ``{"replied": id}`` and SIGKILL itself before the handler returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import msgbus


async def respond(url: str, queue: str) -> None:
    async def reply_then_die(msg: msgbus.Message[object]) -> None:
        await msg.reply({"by": "child", "attempt": msg.attempt})
        print(json.dumps({"replied": msg.id}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the reply is stored, the ack never goes out

    async with msgbus.connect(url) as bus:
        await bus.consumer(queue).run(reply_then_die)


if __name__ == "__main__":
    asyncio.run(respond(sys.argv[1], sys.argv[2]))
