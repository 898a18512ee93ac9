"""The Redis Streams adapter: queues and topics are streams, subscriptions are consumer groups.

See ``docs/adapters/redis.md`` for the mapping, trimming and durability rules this module implements.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from msgbus.adapter import (
    Adapter,
    BusURL,
    Capabilities,
    Endpoint,
    OptionReader,
    Record,
    deleted_queue,
)
from msgbus.errors import ClosedError, ConfigError, MessageTooLarge, PublishError, TopologyError

from ._codec import encode, flatten
from ._config import Persistence, RedisOptions, read_options
from ._errors import translated
from ._names import GroupSpec, Route, delayed_key, lease_key, route
from ._ordered import OrderedReceiver
from ._receiver import RedisReceiver
from ._scripts import Scripts

__all__ = ["RedisAdapter", "create"]

log = logging.getLogger("msgbus.redis")


def create(url: BusURL, options: OptionReader) -> RedisAdapter:
    """Entry point for ``redis://`` and ``rediss://`` URLs; does no I/O."""
    return RedisAdapter(url, read_options(url, options))


def _capabilities(options: RedisOptions, persistence: Persistence) -> Capabilities:
    return Capabilities(
        # Without the option competing consumers, nack re-adds and reclaims all reorder; with it keyed messages are in
        # leased partition streams, one reader each (``_ordered``).
        ordering=options.ordering,
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


class RedisAdapter(Adapter):
    """One connection pool to one Redis server (database ``/n`` of the URL). Task-safe."""

    # A stream read: one XREADGROUP COUNT 512 fetches 512 entries in a round trip (harness, C=16, 1 KiB: 65k
    # msgs/s at 512, 27k at 32). run() extends the claim of the entries it holds in its buffer, so a deep
    # buffer is not reclaimed by other consumers after visibility_timeout.
    credit = 512

    def __init__(self, url: BusURL, options: RedisOptions) -> None:
        self.url = url
        self.options = options
        self.capabilities = _capabilities(options, options.persistence)
        self._client: Redis | None = None
        self._scripts: Scripts | None = None
        self._routes: dict[Endpoint, Route] = {}
        self._receivers: set[RedisReceiver] = set()
        self.secrets: tuple[str | None, ...] = (options.password,)

    def __repr__(self) -> str:
        return f"RedisAdapter({self.url.redacted!r})"

    # -- connection ---------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and ping; with ``persistence=auto`` read the server's AOF settings to declare it."""
        if self._client is not None:
            return
        o = self.options
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
        # XREADGROUP's reply as Redis sends it: each entry's fields stay the flat list the receivers decode in place
        # (redis-py would make a dict of each, which msgbus's own entries do not need).
        client.set_response_callback("XREADGROUP", _as_sent)
        try:
            with translated("connect", secrets=self.secrets):
                await client.ping()
                if o.persistence == "auto":
                    persistence = await _detect_persistence(client)
                    self.capabilities = _capabilities(o, persistence)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._scripts = Scripts(client)

    async def close(self) -> None:
        """Close every receiver, then the connection pool. Idempotent."""
        for receiver in list(self._receivers):
            await receiver.close()
        client, self._client, self._scripts = self._client, None, None
        if client is not None:
            await client.aclose()

    def connected(self) -> tuple[Redis, Scripts]:
        if self._client is None or self._scripts is None:
            raise ClosedError(f"{self!r} is not open")
        return self._client, self._scripts

    def _route(self, endpoint: Endpoint) -> Route:
        found = self._routes.get(endpoint)
        if found is None:
            partitions = self.options.partitions if self.options.ordering == "per_key" else 0
            found = self._routes[endpoint] = route(self.options.prefix, endpoint, partitions)
        return found

    # -- topology -----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Redis PING."""
        client, _ = self.connected()
        with translated("ping", secrets=self.secrets):
            await client.ping()

    async def stats(self, endpoint: Endpoint) -> Mapping[str, float]:
        """From XINFO GROUPS of the streams it reads: undelivered (``lag``) plus delayed entries, pending, consumers;
        and the dead-letter stream's length."""
        r = self._route(endpoint)
        client, _ = self.connected()
        depth = in_flight = consumers = 0
        with translated(f"stats of {endpoint}", secrets=self.secrets):
            for stream in (*r.streams, *r.partitions):
                try:
                    groups = await client.xinfo_groups(stream)
                except rx.ResponseError as exc:
                    raise TopologyError(f"{endpoint} does not exist: no stream {stream}") from exc
                for group in groups:
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
        client, scripts = self.connected()
        with translated(f"declare {endpoint}", secrets=self.secrets):
            if not create:
                await self._verify(client, r)
                return
            if r.shared is not None:
                await scripts.ensure_stream(keys=[r.shared])
            await self.create_groups(r.groups)

    async def delete(self, endpoint: Endpoint) -> None:
        """DEL exactly the queue's keys (its stream, its dead-letter stream and their delayed sorted sets, groups
        included), never a pattern; deleting a missing queue deletes nothing."""
        live = self._route(Endpoint("queue", deleted_queue(endpoint)))
        dead = self._route(Endpoint("queue", endpoint.name, dead_letter=True))
        client, _ = self.connected()
        partitioned = [*live.partitions, *(delayed_key(p) for p in live.partitions)]
        partitioned += [lease_key(p, live.group) for p in live.partitions] + ([live.members] if live.members else [])
        with translated(f"delete {endpoint}", secrets=self.secrets):
            await client.delete(live.send_stream, live.send_delayed, dead.send_stream, dead.send_delayed, *partitioned)

    async def create_groups(self, groups: Sequence[GroupSpec], *, recover: bool = False) -> None:
        """XGROUP CREATE ... MKSTREAM for each group, ignoring existing ones.

        ``recover`` (a group vanished: Redis restarted without persistence or someone deleted it)
        starts every group at id 0, so entries written since the loss are not skipped.
        """
        client, _ = self.connected()
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
        client, scripts = self.connected()
        body = self.options.body_fields
        with translated(f"send to {endpoint}", publish=True, secrets=self.secrets):
            if delay is not None and delay > 0:
                by_set: dict[str, list[bytes | str | int]] = {}
                for record in records:
                    fields = flatten(encode(record, 0, body))
                    stream = _stream_of(r, record)
                    target = r.send_delayed if stream == r.send_stream else delayed_key(stream)
                    by_set.setdefault(target, [math.ceil(delay * 1000)]).extend(
                        [len(fields), secrets.token_hex(8), *fields]
                    )
                for target, args in by_set.items():
                    await scripts.send_delayed(keys=[target], args=args)
            elif len(records) == 1:
                await client.xadd(_stream_of(r, records[0]), encode(records[0], 0, body))  # type: ignore[arg-type]
            else:
                pipe = client.pipeline(transaction=False)  # one connection, in order: a partition's in send order
                for record in records:
                    pipe.xadd(_stream_of(r, record), encode(record, 0, body))  # type: ignore[arg-type]
                await pipe.execute()
            if self.options.wait_replicas:
                await self._wait_replicas(client)

    async def _wait_replicas(self, client: Redis) -> None:
        want = self.options.wait_replicas
        got = await client.wait(want, max(1, round(self.options.wait_timeout * 1000)))
        if got < want:
            raise PublishError(f"only {got} of {want} redis replicas confirmed the write (wait_replicas)")

    # -- receiving ----------------------------------------------------------------------------------

    async def receiver(self, endpoint: Endpoint, prefetch: int) -> RedisReceiver:
        """A receiver with its own consumer name in the endpoint's group."""
        r = self._route(endpoint)
        if not r.receivable:
            raise ConfigError(f"cannot receive from {endpoint}: name a subscription of the topic")
        self.connected()
        receiver = OrderedReceiver(self, r) if r.partitions else RedisReceiver(self, r)
        self._receivers.add(receiver)
        return receiver

    def forget(self, receiver: RedisReceiver) -> None:
        """``receiver`` closed: the adapter no longer closes it."""
        self._receivers.discard(receiver)


def _stream_of(r: Route, record: Record) -> str:
    """Where ``record`` goes: a keyed one to its key's partition under ``ordering=per_key``, else the send stream."""
    return r.partition_of(record.key) if r.partitions and record.key is not None else r.send_stream


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


def _as_sent(response: Any, **_options: Any) -> Any:
    """A reply unparsed (a redis-py response callback)."""
    return response
