"""URL options of the Redis adapter, read once into a frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

Persistence = Literal["auto", "none", "process-crash", "disk"]

DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024
REDIS_MAX_BULK = 512 * 1024 * 1024  # Redis' hard limit for one string (proto-max-bulk-len default)
DEFAULT_PARTITIONS = 16  # partition streams of an endpoint with ordering=per_key
MAX_PARTITIONS = 256


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Everything the adapter needs from the URL. Holds the password, so it has no field-showing repr."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    prefix: str
    visibility_timeout: float
    poll_interval: float
    trim_interval: float
    idle_consumer_timeout: float
    max_message_size: int
    persistence: Persistence
    wait_replicas: int
    wait_timeout: float
    socket_timeout: float
    connect_timeout: float
    retries: int
    ssl_ca_certs: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    ssl_check_hostname: bool
    body_fields: tuple[bytes, ...] = (b"body",)
    ordering: Literal["none", "per_key"] = "none"  # per_key: keyed messages in `partitions` leased streams by key hash
    partitions: int = DEFAULT_PARTITIONS

    def __repr__(self) -> str:
        return f"RedisOptions(host={self.host!r}, port={self.port}, db={self.db}, tls={self.tls})"


def read_options(url: BusURL, reader: OptionReader) -> RedisOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards."""
    tls = url.scheme == "rediss"
    options = RedisOptions(
        host=url.host or "127.0.0.1",
        port=url.port or 6379,
        db=_db_number(url.path),
        username=url.username or None,
        password=url.password or None,
        tls=tls,
        prefix=_prefix(reader.str("prefix", "msgbus") or "msgbus"),
        visibility_timeout=reader.float("visibility_timeout", 30.0, min=0.1),
        poll_interval=reader.float("poll_interval", 0.2, min=0.01),
        trim_interval=reader.float("trim_interval", 5.0, min=0.1),
        idle_consumer_timeout=reader.float("idle_consumer_timeout", 3600.0, min=0.1),
        max_message_size=reader.int("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, min=1),
        persistence=_persistence(reader),
        wait_replicas=reader.int("wait_replicas", 0, min=0),
        wait_timeout=reader.float("wait_timeout", 1.0, min=0.001),
        socket_timeout=reader.float("socket_timeout", 10.0, min=0.1),
        connect_timeout=reader.float("connect_timeout", 5.0, min=0.1),
        retries=reader.int("retries", 20, min=0),
        ssl_ca_certs=reader.str("ssl_ca_certs") if tls else None,
        ssl_certfile=reader.str("ssl_certfile") if tls else None,
        ssl_keyfile=reader.str("ssl_keyfile") if tls else None,
        ssl_check_hostname=reader.bool("ssl_check_hostname", True) if tls else False,
        body_fields=_body_fields(reader.str("body_fields", "body") or "body"),
        ordering="per_key" if reader.choice("ordering", "none", ("none", "per_key")) == "per_key" else "none",
        partitions=reader.int("partitions", DEFAULT_PARTITIONS, min=1),
    )
    if options.partitions > MAX_PARTITIONS:
        raise ConfigError(f"option 'partitions' must be <= {MAX_PARTITIONS}, got {options.partitions}")
    if options.max_message_size > REDIS_MAX_BULK // 2:
        raise ConfigError(f"option 'max_message_size' must be <= {REDIS_MAX_BULK // 2} (Redis strings hold 512 MiB)")
    if options.ordering == "per_key" and 3 * options.poll_interval > options.visibility_timeout:
        raise ConfigError(
            "with ordering=per_key option 'poll_interval' must be at most a third of 'visibility_timeout' "
            "(receivers renew their partition leases every poll_interval; a lease lasts visibility_timeout)"
        )
    if options.socket_timeout <= options.poll_interval:
        raise ConfigError("option 'socket_timeout' must be longer than 'poll_interval' (receives block that long)")
    return options


def _db_number(path: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ConfigError(f"redis URL path must be a database number like '/0', got {path!r}")
    return int(text)


def _prefix(value: str) -> str:
    if "{" in value or "}" in value or any(c.isspace() for c in value):
        raise ConfigError(f"option 'prefix' must not contain braces or spaces, got {value!r}")
    return value


# Fields with a meaning of their own in the stream entry convention (``_codec``): never the body.
_NOT_BODY = frozenset({"id", "key", "headers", "timestamp", "correlation-id", "correlation_id", "attempts"})


def _body_fields(value: str) -> tuple[bytes, ...]:
    """``body_fields``: the comma-separated names of the field that holds an entry's body, first match wins;
    msgbus writes the body under the first."""
    names = tuple(name.strip() for name in value.split(","))
    for name in names:
        low = name.lower()
        if (
            not name
            or low in _NOT_BODY
            or low.startswith("x-msgbus-")
            or low.replace("_", "").replace("-", "") == "contenttype"
        ):
            raise ConfigError(f"option 'body_fields' must name fields other than msgbus's own, got {value!r}")
    return tuple(dict.fromkeys(name.encode() for name in names))


def _persistence(reader: OptionReader) -> Persistence:
    value = reader.choice("persistence", "auto", ("auto", "none", "process-crash", "disk"))
    if value == "none":
        return "none"
    if value == "process-crash":
        return "process-crash"
    if value == "disk":
        return "disk"
    return "auto"
