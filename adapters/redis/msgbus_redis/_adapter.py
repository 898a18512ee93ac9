"""The Redis Streams adapter: queues and topics are streams, subscriptions are consumer groups.

See ``docs/adapters/redis.md`` for the mapping, trimming and durability rules this module implements.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript

from msgbus.adapter import (
    Adapter,
    BusURL,
    Capabilities,
    Delivery,
    Endpoint,
    OptionReader,
    Receiver,
    Record,
    dead_letter_record,
)
from msgbus.errors import ClosedError, ConfigError, DecodeError, MessageTooLarge, PublishError, TopologyError

from . import _scripts
from ._codec import BODY, decode, encode, flatten
from ._config import Persistence, RedisOptions, read_options
from ._errors import is_nogroup, translated
from ._keys import GroupSpec, Route, route

__all__ = ["RedisAdapter", "StreamEntry", "create"]

log = logging.getLogger("msgbus.redis")

_MOVE_BATCH = 500  # most delayed entries one housekeeping round moves per sorted set


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """``Delivery.raw`` on this backend: where the entry lives and its fields as Redis returned them."""

    stream: str
    entry_id: str
    fields: Mapping[bytes, bytes]


def create(url: BusURL, options: OptionReader) -> RedisAdapter:
    """Entry point for ``redis://`` and ``rediss://`` URLs; does no I/O."""
    return RedisAdapter(url, read_options(url, options))


def _capabilities(options: RedisOptions, persistence: Persistence) -> Capabilities:
    return Capabilities(
        ordering="none",  # competing consumers, nack re-adds and reclaims all reorder
        delayed_delivery=True,
        max_delay=None,
        delayed_nack=True,
        native_dead_letter=False,  # Redis has no dead-letter notion; a Lua script moves the entry
        max_message_size=options.max_message_size,
        persistence="none" if persistence == "auto" else persistence,
        cross_process=True,
        lock_extension=True,
        restartable=True,
        lock_duration=options.visibility_timeout,
        exactly_once=False,
        counts_deliveries=True,  # the group's pending-entry delivery count, carried across nack re-adds
    )


class _Scripts:
    """The Lua scripts registered on one client (EVALSHA, reloaded by redis-py after a restart)."""

    def __init__(self, client: Redis) -> None:
        self.send_delayed: AsyncScript = client.register_script(_scripts.SEND_DELAYED)
        self.settle: AsyncScript = client.register_script(_scripts.SETTLE)
        self.extend: AsyncScript = client.register_script(_scripts.EXTEND)
        self.maintain: AsyncScript = client.register_script(_scripts.MAINTAIN)
        self.ensure_stream: AsyncScript = client.register_script(_scripts.ENSURE_STREAM)
        self.forget_consumer: AsyncScript = client.register_script(_scripts.FORGET_CONSUMER)


class RedisAdapter(Adapter):
    """One connection pool to one Redis server (database ``/n`` of the URL). Task-safe."""

    def __init__(self, url: BusURL, options: RedisOptions) -> None:
        self.url = url
        self._options = options
        self.capabilities = _capabilities(options, options.persistence)
        self._client: Redis | None = None
        self._scripts: _Scripts | None = None
        self._routes: dict[Endpoint, Route] = {}
        self._receivers: set[RedisReceiver] = set()
        self._secrets = (options.password,)

    def __repr__(self) -> str:
        return f"RedisAdapter({self.url.redacted!r})"

    # -- connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and ping; with ``persistence=auto`` read the server's AOF settings to declare it."""
        if self._client is not None:
            return
        o = self._options
        client = Redis(
            host=o.host,
            port=o.port,
            db=o.db,
            username=o.username,
            password=o.password,
            ssl=o.tls,
            ssl_ca_certs=o.ssl_ca_certs,
            ssl_certfile=o.ssl_certfile,
            ssl_keyfile=o.ssl_keyfile,
            ssl_check_hostname=o.ssl_check_hostname,
            socket_timeout=o.socket_timeout,
            socket_connect_timeout=o.connect_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), o.retries),
            decode_responses=False,
            protocol=2,  # reply shapes this module parses (RESP3 nests XREADGROUP replies differently)
        )
        try:
            with translated("connect", secrets=self._secrets):
                await client.ping()
                if o.persistence == "auto":
                    persistence = await _detect_persistence(client)
                    self.capabilities = _capabilities(o, persistence)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = _Scripts(client)

    async def close(self) -> None:
        """Close every receiver, then the connection pool. Idempotent."""
        for receiver in list(self._receivers):
            await receiver.close()
        client, self._client, self._scripts = self._client, None, None
        if client is not None:
            await client.aclose()

    def _connected(self) -> tuple[Redis, _Scripts]:
        if self._client is None or self._scripts is None:
            raise ClosedError(f"{self!r} is not open")
        return self._client, self._scripts

    def _route(self, endpoint: Endpoint) -> Route:
        found = self._routes.get(endpoint)
        if found is None:
            found = self._routes[endpoint] = route(self._options.prefix, endpoint)
        return found

    # -- topology -----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Redis PING."""
        client, _ = self._connected()
        with translated("ping", secrets=self._secrets):
            await client.ping()

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """From XINFO GROUPS of the streams it reads: undelivered (``lag``) plus delayed entries, pending, consumers;
        and the dead-letter stream's length."""
        r = self._route(endpoint)
        client, _ = self._connected()
        depth = in_flight = consumers = 0
        with translated(f"stats of {endpoint}", secrets=self._secrets):
            for stream in r.streams:
                for group in await client.xinfo_groups(stream):
                    if group["name"] == r.group.encode():
                        depth += group.get("lag") or 0
                        in_flight += group["pending"]
                        consumers = max(consumers, group["consumers"])
            for delayed, _stream in r.movers:
                depth += await client.zcard(delayed)
            dead = await client.xlen(r.dead_letter_stream)
        return {"depth": depth, "in_flight": in_flight, "dead_letters": dead, "consumers": consumers}

    async def declare(self, endpoint: Endpoint, *, create: bool = True) -> None:
        """Create the streams and groups of ``endpoint`` (and its dead-letter stream); idempotent.

        A queue's group starts at id 0, so messages sent before any consumer exists are kept. A
        subscription's group starts at the topic's current end: it gets what is published afterwards.
        """
        r = self._route(endpoint)
        client, scripts = self._connected()
        with translated(f"declare {endpoint}", secrets=self._secrets):
            if not create:
                await self._verify(client, r)
                return
            if r.shared is not None:
                await scripts.ensure_stream(keys=[r.shared])
            await self._create_groups(r.groups)

    async def _create_groups(self, groups: Sequence[GroupSpec], *, recover: bool = False) -> None:
        """XGROUP CREATE ... MKSTREAM for each group, ignoring existing ones.

        ``recover`` (a group vanished: Redis restarted without persistence or someone deleted it)
        starts every group at id 0, so entries written since the loss are not skipped.
        """
        client, _ = self._connected()
        pipe = client.pipeline(transaction=False)
        for g in groups:
            pipe.xgroup_create(g.stream, g.group, id="0" if recover else g.start, mkstream=True)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and not str(result).startswith("BUSYGROUP"):
                raise result
        if recover:
            log.warning("re-created missing consumer groups %s", ", ".join(f"{g.stream}/{g.group}" for g in groups))

    async def _verify(self, client: Redis, r: Route) -> None:
        if r.shared is not None and not await client.exists(r.shared):
            raise TopologyError(f"{r.endpoint} does not exist (topology=verify)")
        for g in r.groups:
            try:
                infos = await client.xinfo_groups(g.stream)
            except rx.ResponseError as exc:
                raise TopologyError(f"{r.endpoint} does not exist (topology=verify): no stream {g.stream}") from exc
            if not any(_text(info.get("name")) == g.group for info in infos):
                raise TopologyError(f"{r.endpoint} does not exist (topology=verify): no group {g.group}")

    # -- sending ------------------------------------------------------------------------------------

    async def send(self, endpoint: Endpoint, records: Sequence[Record], delay: float | None = None) -> None:
        """XADD each record (one pipelined round trip), or park them in the delayed sorted set.

        Returns once Redis has answered every XADD/ZADD (and, with ``wait_replicas``, once that many
        replicas have them). How durable that is depends on the server's AOF settings (see the docs).
        """
        r = self._route(endpoint)
        limit = self.capabilities.max_message_size
        if limit is not None:
            for record in records:
                size = record.size()
                if size > limit:
                    raise MessageTooLarge(size, limit)
        if not records:
            return
        client, scripts = self._connected()
        with translated(f"send to {endpoint}", publish=True, secrets=self._secrets):
            if delay is not None and delay > 0:
                args: list[bytes | str | int] = [math.ceil(delay * 1000)]
                for record in records:
                    fields = flatten(encode(record))
                    args += [len(fields), secrets.token_hex(8), *fields]
                await scripts.send_delayed(keys=[r.send_delayed], args=args)
            elif len(records) == 1:
                await client.xadd(r.send_stream, encode(records[0]))  # type: ignore[arg-type]
            else:
                pipe = client.pipeline(transaction=False)
                for record in records:
                    pipe.xadd(r.send_stream, encode(record))  # type: ignore[arg-type]
                await pipe.execute()
            if self._options.wait_replicas:
                await self._wait_replicas(client)

    async def _wait_replicas(self, client: Redis) -> None:
        want = self._options.wait_replicas
        got = await client.wait(want, max(1, round(self._options.wait_timeout * 1000)))
        if got < want:
            raise PublishError(f"only {got} of {want} redis replicas confirmed the write (wait_replicas)")

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> RedisReceiver:
        """A receiver with its own consumer name in the endpoint's group."""
        r = self._route(endpoint)
        if not r.receivable:
            raise ConfigError(f"cannot receive from {endpoint}: name a subscription of the topic")
        self._connected()
        receiver = RedisReceiver(self, r, prefetch)
        self._receivers.add(receiver)
        return receiver


async def _detect_persistence(client: Redis) -> Persistence:
    """'disk' with AOF + fsync always, 'process-crash' with AOF otherwise, else 'none'.

    Redis that forbids CONFIG (many managed services) gives 'none': set ``persistence=`` explicitly.
    """
    try:
        config = {_text(k): _text(v) for k, v in (await client.config_get("append*")).items()}
    except rx.ResponseError:
        return "none"
    if config.get("appendonly") != "yes":
        return "none"
    return "disk" if config.get("appendfsync") == "always" else "process-crash"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisReceiver(Receiver):
    """Reads one queue, subscription or dead-letter stream with XREADGROUP as one named consumer.

    Every ``poll_interval`` a receive also does housekeeping in one Lua call: moves due delayed
    entries into their streams, reclaims entries idle longer than ``visibility_timeout`` (their
    consumer died), and trims the topic stream below what its slowest group still needs.
    """

    def __init__(self, adapter: RedisAdapter, r: Route, prefetch: int) -> None:
        self._adapter = adapter
        self._options = adapter._options
        self._route = r
        self._source = replace(r.endpoint, dead_letter=False)
        self._prefetch = max(1, prefetch)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._unsettled = 0
        self._settled = asyncio.Event()
        self._next_housekeeping = 0.0
        self._next_trim = 0.0
        self._turn = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisReceiver({self._route.endpoint}, consumer={self._consumer!r})"

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for deliveries; never more than ``prefetch`` unsettled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                raise ClosedError(f"{self!r} is closed")
            room = min(max_messages, self._prefetch - self._unsettled)
            now = loop.time()
            if room <= 0:
                if now >= deadline:
                    return []
                self._settled.clear()
                try:
                    await asyncio.wait_for(self._settled.wait(), deadline - now)
                except TimeoutError:
                    return []
                continue
            if now >= self._next_housekeeping:
                got = await self._housekeeping(room)
                if got:
                    return got
                now = loop.time()
            block_ms = int((min(deadline, self._next_housekeeping) - now) * 1000)
            got = await self._read(room, block_ms if block_ms >= 1 else None)
            if got or loop.time() >= deadline:
                return got

    async def _read(self, room: int, block_ms: int | None) -> list[Delivery]:
        r = self._route
        streams = r.streams
        if room < len(streams):  # XREADGROUP's COUNT is per stream: read one stream in turn
            streams = (streams[self._turn % len(streams)],)
            self._turn += 1
        client, _ = self._adapter._connected()
        with translated(f"receive from {r.endpoint}", secrets=self._adapter._secrets):
            try:
                reply: Any = await client.xreadgroup(
                    r.group, self._consumer, dict.fromkeys(streams, ">"), count=room // len(streams), block=block_ms
                )
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._adapter._create_groups(r.groups, recover=True)
                return []
        entries = [(stream.decode(), eid, fields, 1) for stream, items in reply or () for eid, fields in items]
        return await self._deliveries(entries)

    async def _housekeeping(self, room: int) -> list[Delivery]:
        r = self._route
        _, scripts = self._adapter._connected()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next_housekeeping = now + self._options.poll_interval
        periodic = now >= self._next_trim  # trimming and pruning, every trim_interval
        if periodic:
            self._next_trim = now + self._options.trim_interval
        trim = periodic and r.shared is not None and r.shared in r.streams
        reclaim_from = r.streams[self._turn % len(r.streams)]
        self._turn += 1
        keys = [key for pair in r.movers for key in pair] + [reclaim_from, r.shared or reclaim_from]
        args: list[str | int] = [
            len(r.movers),
            _MOVE_BATCH,
            r.group,
            self._consumer,
            max(1, round(self._options.visibility_timeout * 1000)),
            room,
            "1" if trim else "0",
            max(1, round(self._options.idle_consumer_timeout * 1000)) if periodic else 0,
        ]
        with translated(f"receive from {r.endpoint}", secrets=self._adapter._secrets):
            try:
                result: Any = await scripts.maintain(keys=keys, args=args)
                moved, claimed, _ = result
            except rx.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                await self._adapter._create_groups(r.groups, recover=True)
                return []
        if moved >= _MOVE_BATCH:
            self._next_housekeeping = now  # more are due: move them on the next call
        entries = [(reclaim_from, eid, _pairs(flat), int(count)) for eid, count, flat in claimed]
        return await self._deliveries(entries)

    async def _deliveries(self, entries: Sequence[tuple[str, bytes, Mapping[bytes, bytes], int]]) -> list[Delivery]:
        """Entry ids stay bytes for the acks (redis-py then sends them as they are) and are ``str`` in ``raw``."""
        out: list[Delivery] = []
        for stream, rid, fields, deliveries in entries:
            raw = StreamEntry(stream, rid.decode(), fields)
            try:
                record, before = decode(fields)
            except DecodeError as exc:
                # Not a msgbus entry (or damaged): handed on with its problem, the core dead-letters it.
                body = bytes(fields.get(BODY, b""))
                problem = f"malformed stream entry {raw.entry_id}: {exc}"
                out.append(RedisDelivery(self, Record(body=body, id=raw.entry_id), deliveries, raw, rid, problem))
                continue
            out.append(RedisDelivery(self, record, before + deliveries, raw, rid))
        self._unsettled += len(out)
        return out

    # -- settling (called by RedisDelivery) ---------------------------------------------------------

    def _release(self, count: int) -> None:
        self._unsettled = max(0, self._unsettled - count)
        self._settled.set()

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """XACK (and XDEL from single-group streams) every delivery in one MULTI/EXEC round trip."""
        mine = [d for d in deliveries if isinstance(d, RedisDelivery)]
        by_stream: dict[str, list[bytes]] = {}
        for d in mine:
            by_stream.setdefault(d.entry.stream, []).append(d.rid)
        if not by_stream:
            return
        client, _ = self._adapter._connected()
        pipe = client.pipeline(transaction=True)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self._route.group, *ids)
            if stream in self._route.deletable:
                pipe.xdel(stream, *ids)
        # Settled by the handler: their room is free now, so a read can go out while the ack is on its way
        # (an ack that fails leaves them pending, and reclaimed after ``visibility_timeout``, as before).
        self._release(len(mine))
        with translated(f"ack on {self._route.endpoint}", secrets=self._adapter._secrets):
            try:
                await pipe.execute()
            except rx.ResponseError as exc:
                if not is_nogroup(exc):  # the group is gone, and with it anything to ack
                    raise

    async def _settle(
        self, d: RedisDelivery, target: str, delayed: str, delay: float | None, fields: dict[bytes, bytes]
    ) -> None:
        _, scripts = self._adapter._connected()
        delay_ms = 0 if delay is None or delay <= 0 else math.ceil(delay * 1000)
        deletable = "1" if d.entry.stream in self._route.deletable else "0"
        args: list[bytes | str | int] = [self._route.group, d.rid, deletable, delay_ms, self._consumer]
        args += flatten(fields)
        try:
            with translated(f"settle on {self._route.endpoint}", secrets=self._adapter._secrets):
                try:
                    await scripts.settle(keys=[d.entry.stream, target, delayed], args=args)
                except rx.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
        finally:
            self._release(1)

    async def _nack(self, d: RedisDelivery, delay: float | None) -> None:
        r = self._route
        await self._settle(d, r.retry_stream, r.retry_delayed, delay, encode(d.record, attempts=d.attempt))
        if delay is not None and delay > 0:
            # Wake up in time to move it back even if nothing else is going on.
            loop = asyncio.get_running_loop()
            self._next_housekeeping = min(self._next_housekeeping, loop.time() + delay)

    async def _dead_letter(self, d: RedisDelivery, reason: str) -> None:
        r = self._route
        record = dead_letter_record(d.record, reason, d.attempt, self._source)
        await self._settle(d, r.dead_letter_stream, r.retry_delayed, None, encode(record))

    async def _extend(self, d: RedisDelivery) -> None:
        _, scripts = self._adapter._connected()
        with translated(f"extend lock on {self._route.endpoint}", secrets=self._adapter._secrets):
            extended = await scripts.extend(keys=[d.entry.stream], args=[self._route.group, d.rid, self._consumer])
        if not extended:
            log.debug("msgbus: %s on %s is no longer ours; not extended", d.entry.entry_id, self._route.endpoint)

    async def close(self) -> None:
        """Stop receiving; unsettled entries return to others after ``visibility_timeout``. Idempotent.

        The consumer name is removed from its group only when it holds no pending entry (removing
        it would drop those entries from the group's pending list, losing them).
        """
        if self._closed:
            return
        self._closed = True
        self._adapter._receivers.discard(self)
        self._settled.set()
        client = self._adapter._client
        scripts = self._adapter._scripts
        if client is None or scripts is None:
            return
        try:
            await scripts.forget_consumer(keys=list(self._route.streams), args=[self._route.group, self._consumer])
        except (rx.RedisError, OSError) as exc:  # best effort: a leftover idle consumer name is harmless
            log.debug("could not remove consumer %s: %s", self._consumer, type(exc).__name__)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisDelivery(Delivery):
    """A stream entry pending in the group under this receiver's consumer name."""

    __slots__ = ("_receiver", "entry", "rid")

    def __init__(
        self,
        receiver: RedisReceiver,
        record: Record,
        attempt: int,
        entry: StreamEntry,
        rid: bytes,
        problem: str | None = None,
    ) -> None:
        super().__init__(record, attempt, entry, problem)
        self._receiver = receiver
        self.entry = entry
        self.rid = rid  # ``entry.entry_id`` as Redis sent it

    async def ack(self) -> None:
        """XACK (+ XDEL on single-group streams) in one transaction."""
        await self._receiver.ack_many([self])

    async def nack(self, delay: float | None = None) -> None:
        """Atomically re-add a copy (attempt count carried) now or via the delayed set, then XACK this one."""
        await self._receiver._nack(self, delay)

    async def dead_letter(self, reason: str) -> None:
        """Atomically add it to the dead-letter stream with the reason headers, then XACK it here."""
        await self._receiver._dead_letter(self, reason)

    async def extend(self, seconds: float) -> None:
        """XCLAIM to self, only while it is still ours: it stays ours for another ``visibility_timeout``.

        Redis cannot set an idle time in the future, so ``seconds`` beyond the visibility timeout is
        not honoured; the runtime extends again before ``lock_duration`` runs out.
        """
        await self._receiver._extend(self)
