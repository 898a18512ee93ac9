"""SQS contender: raw aiobotocore (SendMessage / SendMessageBatch by 10, long-poll ReceiveMessage by 10,
DeleteMessageBatch). kombu's SQS transport is a blocking one for Celery's worker; FastStream has no SQS
broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.metadata
import itertools
import json
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from msgbus._bench import Contender, OnBody

BATCH = 10  # SQS's limit per SendMessageBatch / ReceiveMessage / DeleteMessageBatch
WAIT = 1  # long-poll seconds: what msgbus's receive loop asks for (its 0.25 s poll, rounded up)
_LOCAL = ("127.0.0.1", "localhost")


def client_kwargs(url: str) -> dict[str, Any]:
    """aiobotocore ``create_client`` arguments for an ``sqs://REGION?endpoint_url=...&access_key_id=...`` URL."""
    parts = urlsplit(url)
    options = {k: v[0] for k, v in parse_qs(parts.query).items()}
    kwargs: dict[str, Any] = {"region_name": parts.hostname or "us-east-1"}
    if "endpoint_url" in options:
        kwargs["endpoint_url"] = options["endpoint_url"]
    if "access_key_id" in options:
        kwargs["aws_access_key_id"] = options["access_key_id"]
        kwargs["aws_secret_access_key"] = options.get("secret_access_key")
    return kwargs


class Aiobotocore(Contender):
    """aiobotocore with the connection pool msgbus uses (64): ``send_message`` per single send; a batch is
    its ``SendMessageBatch`` calls of 10 sent at once; a consumer runs ``prefetch // 10`` long-poll loops
    (the same credit msgbus gets), each receiving up to 10, handling them and deleting them with one
    ``DeleteMessageBatch``. SQS bodies are text, so binary bodies go base64 as msgbus sends them; each
    message carries an id and a timestamp in one string attribute, as msgbus's do."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.kwargs = client_kwargs(url)
        self.label = f"aiobotocore {importlib.metadata.version('aiobotocore')} (base64 bodies)"
        self._stack: AsyncExitStack | None = None
        self._sqs: Any = None
        self._urls: dict[str, str] = {}
        self._ids = itertools.count()

    def versions(self) -> dict[str, str]:
        return {lib: importlib.metadata.version(lib) for lib in ("aiobotocore", "botocore")}

    async def open(self) -> None:
        self._stack = AsyncExitStack()
        config = AioConfig(max_pool_connections=64)
        self._sqs = await self._stack.enter_async_context(
            get_session().create_client("sqs", config=config, **self.kwargs)
        )

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()

    async def server_version(self) -> str | None:
        endpoint = urlsplit(self.kwargs.get("endpoint_url", ""))
        if endpoint.hostname not in _LOCAL:
            return None
        try:  # the local endpoint is moto's server (integration/_moto.py), run with this interpreter
            return f"moto {importlib.metadata.version('moto')} server (integration/_moto.py)"
        except importlib.metadata.PackageNotFoundError:
            return None

    async def _url(self, queue: str) -> str:
        url = self._urls.get(queue)
        if url is None:
            url = self._urls[queue] = (await self._sqs.create_queue(QueueName=queue))["QueueUrl"]
        return url

    def _entry(self, body: bytes) -> dict[str, Any]:
        meta = json.dumps({"id": str(next(self._ids)), "ts": time.time()})
        return {
            "MessageBody": base64.b64encode(body).decode("ascii"),
            "MessageAttributes": {"meta": {"DataType": "String", "StringValue": meta}},
        }

    async def send(self, queue: str, body: bytes) -> None:
        await self._sqs.send_message(QueueUrl=await self._url(queue), **self._entry(body))

    async def _send10(self, url: str, bodies: Sequence[bytes]) -> None:
        entries = [{"Id": str(i), **self._entry(body)} for i, body in enumerate(bodies)]
        response = await self._sqs.send_message_batch(QueueUrl=url, Entries=entries)
        if response.get("Failed"):
            raise RuntimeError(f"SendMessageBatch failed: {response['Failed'][0]}")

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        url = await self._url(queue)
        await asyncio.gather(*(self._send10(url, bodies[i : i + BATCH]) for i in range(0, len(bodies), BATCH)))

    async def _poll(self, url: str, on_body: OnBody, stop: asyncio.Event) -> None:
        while not stop.is_set():
            response = await self._sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=BATCH,
                WaitTimeSeconds=WAIT,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
            messages = response.get("Messages") or []
            if not messages:
                continue
            for m in messages:
                on_body(base64.b64decode(m["Body"]))
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            await self._sqs.delete_message_batch(QueueUrl=url, Entries=entries)

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        url = await self._url(queue)
        pollers = max(1, self.prefetch(concurrency) // BATCH)
        await asyncio.gather(*(self._poll(url, on_body, stop) for _ in range(pollers)))

    async def cleanup(self, queue: str) -> None:
        """Delete ``queue`` and the dead-letter queue msgbus gives a queue of that name."""
        for name in (queue, f"{queue}--dlq"):
            with contextlib.suppress(self._sqs.exceptions.QueueDoesNotExist):
                url = (await self._sqs.get_queue_url(QueueName=name))["QueueUrl"]
                await self._sqs.delete_queue(QueueUrl=url)
        self._urls.pop(queue, None)
