"""PostgreSQL contender: raw asyncpg doing the work-queue loop msgbus does, with nothing on top.

One table per queue (``bench_raw.q_<queue>``: body, id, timestamp, visibility and lease columns, as msgbus
keeps); sends are INSERTs (a batch is one INSERT of unnested arrays); a consumer leases ``prefetch`` rows with
``FOR UPDATE SKIP LOCKED``, hands them out, and deletes the batch with one statement. It polls an empty table
every 5 ms instead of LISTENing: no NOTIFY per send, the cheapest a hand-written loop gets.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from msgbus._bench import Contender, OnBody

SCHEMA = "bench_raw"


def plain_url(url: str) -> str:
    return url.split("?", 1)[0]


def table(queue: str) -> str:
    return f'{SCHEMA}."q_{re.sub(r"[^a-zA-Z0-9_]", "_", queue)}"'


class Asyncpg(Contender):
    """asyncpg, fastest idiomatic: a pool, INSERT / INSERT ... SELECT unnest, and a SKIP LOCKED lease loop."""

    name = "raw"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.label = f"asyncpg {importlib.metadata.version('asyncpg')} (SKIP LOCKED)"
        self._pool: Any = None
        self._ids = itertools.count()
        self._made: set[str] = set()

    def versions(self) -> dict[str, str]:
        return {"asyncpg": importlib.metadata.version("asyncpg")}

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(plain_url(self.url), min_size=1, max_size=10)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def server_version(self) -> str | None:
        version = await self._pool.fetchval("SHOW server_version")
        return f"PostgreSQL {version}"

    async def _table(self, queue: str) -> str:
        name = table(queue)
        if name not in self._made:
            await self._pool.execute(
                f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}; CREATE TABLE IF NOT EXISTS {name} ("
                " seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, visible_at timestamptz NOT NULL DEFAULT now(),"
                " lease bigint, attempts int NOT NULL DEFAULT 0, id text NOT NULL, ts float8 NOT NULL,"
                " body bytea NOT NULL)"
            )
            self._made.add(name)
        return name

    def _id(self) -> str:
        return f"{os.getpid()}-{next(self._ids)}"

    async def send(self, queue: str, body: bytes) -> None:
        name = await self._table(queue)
        await self._pool.execute(
            f"INSERT INTO {name} (id, ts, body) VALUES ($1, $2, $3)", self._id(), time.time(), body
        )

    async def send_batch(self, queue: str, bodies: Sequence[bytes]) -> None:
        name = await self._table(queue)
        now = time.time()
        await self._pool.execute(
            f"INSERT INTO {name} (id, ts, body) SELECT i, $2, b FROM unnest($1::text[], $3::bytea[]) AS u(i, b)",
            [self._id() for _ in bodies],
            now,
            list(bodies),
        )

    async def consume(self, queue: str, on_body: OnBody, concurrency: int, stop: asyncio.Event) -> None:
        name = await self._table(queue)
        lease = (
            f"WITH picked AS (SELECT seq FROM {name} WHERE visible_at <= now() ORDER BY seq LIMIT $1"
            " FOR UPDATE SKIP LOCKED)"
            f" UPDATE {name} AS m SET visible_at = now() + interval '30 seconds', lease = $2,"
            " attempts = m.attempts + 1 FROM picked WHERE m.seq = picked.seq RETURNING m.seq, m.body"
        )
        count = self.prefetch(concurrency)
        token = int.from_bytes(os.urandom(7), "big")
        async with self._pool.acquire() as conn:
            while not stop.is_set():
                rows = await conn.fetch(lease, count, token)
                if not rows:
                    await asyncio.sleep(0.005)
                    continue
                for row in rows:
                    on_body(row[1])
                await conn.execute(f"DELETE FROM {name} WHERE seq = ANY($1::bigint[])", [r[0] for r in rows])

    async def cleanup(self, queue: str) -> None:
        await self._pool.execute(f"DROP TABLE IF EXISTS {table(queue)}")
