"""Key layout: which streams, groups and sorted sets hold an endpoint's messages.

All keys of one queue or topic share a hash tag (``{q:name}`` / ``{t:name}``) so the Lua scripts that
touch several of them stay within one Redis Cluster slot. Per-subscription keys put the kind before the
subscription name, so no two (topic, subscription) pairs can map to the same key.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Literal

from msgbus.adapter import Endpoint
from msgbus.errors import ConfigError

QUEUE_GROUP = "msgbus"  # the one consumer group of a queue stream and of every dead-letter stream


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A consumer group to create: ``start`` is ``0`` (keep earlier entries) or ``$`` (only newer ones)."""

    stream: str
    group: str
    start: Literal["0", "$"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one endpoint's messages live, for sending and for receiving."""

    endpoint: Endpoint
    send_stream: str  # XADD target of send()
    send_delayed: str  # sorted set of send(delay=...) entries, moved into send_stream when due
    streams: tuple[str, ...]  # streams a receiver reads with XREADGROUP, all with ``group``
    group: str
    deletable: frozenset[str]  # single-group streams: an acked entry is XDELed at once
    shared: str | None  # the fan-out (topic) stream: trimmed below the slowest group instead
    retry_stream: str  # nack() re-adds here (only this queue/subscription reads it)
    retry_delayed: str  # nack(delay=...) entries, moved into retry_stream when due
    dead_letter_stream: str
    movers: tuple[tuple[str, str], ...]  # (sorted set, stream) pairs a receiver keeps moving
    groups: tuple[GroupSpec, ...]  # what declare() creates
    receivable: bool
    # ordering=per_key: the partition streams keyed messages go to (by key hash), each read by one leaseholder
    # of ``group`` at a time (``lease_key``); empty otherwise and on dead-letter streams.
    partitions: tuple[str, ...] = ()
    members: str = ""  # sorted set: the group's live receivers (by last-seen time), to share the partitions

    def partition_of(self, key: str) -> str:
        """The partition stream of ``key``: crc32 of its UTF-8 bytes (lone surrogates escaped, never raising)."""
        return self.partitions[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self.partitions)]


def lease_key(partition: str, group: str) -> str:
    """The string key whose value names the receiver of ``group`` that alone reads ``partition`` now."""
    return f"{partition}:lease:{group}"


def delayed_key(stream: str) -> str:
    """The sorted set of delayed sends to partition ``stream``."""
    return f"{stream}:delayed"


def route(prefix: str, endpoint: Endpoint, partitions: int = 0) -> Route:
    """The key layout of ``endpoint`` under ``prefix`` (with ``partitions`` partition streams for keyed messages
    under ``ordering=per_key``); raises ``ConfigError`` for unusable names."""
    found = _route(prefix, endpoint)
    if not partitions or endpoint.dead_letter:
        return found
    base = found.shared or found.send_stream
    streams = tuple(f"{base}:p{i}" for i in range(partitions))
    group = found.group
    groups = found.groups
    if found.receivable:
        start: Literal["0", "$"] = "$" if found.shared is not None else "0"
        groups += tuple(GroupSpec(p, group, start) for p in streams)
    return replace(
        found,
        partitions=streams,
        members=f"{base}:members:{group}" if found.receivable else "",
        deletable=found.deletable | (frozenset(streams) if found.shared is None else frozenset()),
        movers=found.movers + tuple((delayed_key(p), p) for p in streams) if found.receivable else found.movers,
        groups=groups,
    )


def _route(prefix: str, endpoint: Endpoint) -> Route:
    _check_name("queue" if endpoint.kind == "queue" else "topic", endpoint.name)
    if endpoint.kind == "queue":
        return _queue(f"{prefix}:{{q:{endpoint.name}}}", endpoint)
    base = f"{prefix}:{{t:{endpoint.name}}}"
    if endpoint.subscription is None:
        if endpoint.dead_letter:
            raise ConfigError(f"{endpoint}: a topic's dead letters belong to a subscription; name one")
        return Route(
            endpoint=endpoint,
            send_stream=base,
            send_delayed=f"{base}:delayed",
            streams=(),
            group="",
            deletable=frozenset(),
            shared=base,
            retry_stream=base,
            retry_delayed=f"{base}:delayed",
            dead_letter_stream=base,
            movers=(),
            groups=(),
            receivable=False,
        )
    sub = endpoint.subscription
    _check_name("subscription", sub)
    dlq = f"{base}:dlq:{sub}"
    if endpoint.dead_letter:
        return _single(endpoint, dlq, f"{base}:dlq-delayed:{sub}", base_groups=_subscription_groups(base, sub, dlq))
    retry = f"{base}:retry:{sub}"
    return Route(
        endpoint=endpoint,
        send_stream=base,
        send_delayed=f"{base}:delayed",
        streams=(base, retry),
        group=sub,
        deletable=frozenset({retry}),
        shared=base,
        retry_stream=retry,
        retry_delayed=f"{base}:delayed:{sub}",
        dead_letter_stream=dlq,
        movers=((f"{base}:delayed", base), (f"{base}:delayed:{sub}", retry)),
        groups=_subscription_groups(base, sub, dlq),
        receivable=True,
    )


def _subscription_groups(base: str, sub: str, dlq: str) -> tuple[GroupSpec, ...]:
    # The topic group starts at "$": a subscription gets what is published after it exists.
    return (
        GroupSpec(base, sub, "$"),
        GroupSpec(f"{base}:retry:{sub}", sub, "0"),
        GroupSpec(dlq, QUEUE_GROUP, "0"),
    )


def _queue(base: str, endpoint: Endpoint) -> Route:
    dlq = f"{base}:dlq"
    groups = (GroupSpec(base, QUEUE_GROUP, "0"), GroupSpec(dlq, QUEUE_GROUP, "0"))
    if endpoint.dead_letter:
        return _single(endpoint, dlq, f"{dlq}:delayed", base_groups=groups)
    return _single(endpoint, base, f"{base}:delayed", base_groups=groups, dead_letter=dlq)


def _single(
    endpoint: Endpoint, stream: str, delayed: str, *, base_groups: tuple[GroupSpec, ...], dead_letter: str | None = None
) -> Route:
    """A stream with one group: a queue, or a dead-letter stream (whose own dead letters stay in it)."""
    return Route(
        endpoint=endpoint,
        send_stream=stream,
        send_delayed=delayed,
        streams=(stream,),
        group=QUEUE_GROUP,
        deletable=frozenset({stream}),
        shared=None,
        retry_stream=stream,
        retry_delayed=delayed,
        dead_letter_stream=dead_letter or stream,
        movers=((delayed, stream),),
        groups=base_groups,
        receivable=True,
    )


def _check_name(what: str, name: str) -> None:
    if not name or "{" in name or "}" in name:
        raise ConfigError(f"{what} name {name!r} must be non-empty and must not contain '{{' or '}}' on redis://")
