"""URL options of ``nats://`` buses, read once into a frozen dataclass."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Literal

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

_PREFIX = re.compile(r"^[A-Za-z0-9-]{1,32}$")
DEFAULT_PARTITIONS = 16  # partition consumers of an endpoint with ordering=per_key
MAX_PARTITIONS = 256  # each is a durable consumer on the server and a pull request per receiver


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """Everything the adapter needs from the URL. Holds credentials, so its repr shows none of them."""

    host: str
    port: int
    user: str | None
    password: str | None
    token: str | None
    tls: ssl.SSLContext | None
    prefix: str
    ack_wait: float  # the lock duration: an unacked message is redelivered after this long
    max_deliver: int  # the server's own delivery limit (0: none); keep it above RetryPolicy.max_attempts
    max_ack_pending: int
    storage: Literal["file", "memory"]
    replicas: int
    duplicate_window: float
    max_message_size: int | None  # None: the server's max_payload less the room msgbus's headers need
    send_timeout: float  # a send retries (same Nats-Msg-Id, so no duplicates) until this long has passed
    request_timeout: float  # one JetStream API call or publish acknowledgement
    connect_timeout: float
    reconnect_wait: float
    ping_interval: float
    max_outstanding_pings: int
    ordering: Literal["none", "per_key"] = "none"  # per_key: keyed messages go to `partitions` partition subjects
    partitions: int = DEFAULT_PARTITIONS  # each read by a durable consumer with max_ack_pending=1

    def __repr__(self) -> str:
        return f"NatsOptions(host={self.host!r}, port={self.port}, prefix={self.prefix!r}, tls={self.tls is not None})"

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.password, self.token)


def read_options(url: BusURL, reader: OptionReader) -> NatsOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards.

    ``nats://user:password@host:4222`` authenticates with a user and password, ``nats://token@host`` with
    a token (NATS' own URL convention).
    """
    if url.path not in ("", "/"):
        raise ConfigError(f"a nats:// URL has no path (streams are named by msgbus), got {url.path!r}")
    prefix = reader.str("prefix", "msgbus") or "msgbus"
    if not _PREFIX.match(prefix):
        raise ConfigError(f"option 'prefix' must be 1-32 letters, digits or '-', got {prefix!r}")
    storage = reader.choice("storage", "file", ("file", "memory"))
    tls = _tls(reader)
    ordering = reader.choice("ordering", "none", ("none", "per_key"))
    partitions = reader.int("partitions", DEFAULT_PARTITIONS, min=1)
    if partitions > MAX_PARTITIONS:
        raise ConfigError(f"option 'partitions' must be <= {MAX_PARTITIONS}, got {partitions}")
    token = url.username if url.username and url.password is None else None
    options = NatsOptions(
        host=url.host or "127.0.0.1",
        port=url.port or 4222,
        user=None if token else url.username or None,
        password=url.password or None,
        token=token,
        tls=tls,
        prefix=prefix,
        ack_wait=reader.float("ack_wait", 30.0, min=0.5),
        max_deliver=reader.int("max_deliver", 50, min=0),
        max_ack_pending=reader.int("max_ack_pending", 20_000, min=1),
        storage="memory" if storage == "memory" else "file",
        replicas=reader.int("replicas", 1, min=1),
        duplicate_window=reader.float("duplicate_window", 120.0, min=1.0),
        max_message_size=_optional_int(reader, "max_message_size"),
        send_timeout=reader.float("send_timeout", 30.0, min=0.1),
        request_timeout=reader.float("request_timeout", 5.0, min=0.1),
        connect_timeout=reader.float("connect_timeout", 5.0, min=0.1),
        reconnect_wait=reader.float("reconnect_wait", 0.5, min=0.05),
        ping_interval=reader.float("ping_interval", 5.0, min=0.1),
        max_outstanding_pings=reader.int("max_outstanding_pings", 3, min=1),
        ordering="per_key" if ordering == "per_key" else "none",
        partitions=partitions,
    )
    if options.replicas > 5:
        raise ConfigError("option 'replicas' must be <= 5 (JetStream's limit)")
    if 0 < options.max_deliver < 2:
        raise ConfigError("option 'max_deliver' must be 0 (no server limit) or >= 2")
    if options.duplicate_window < options.send_timeout:
        raise ConfigError("option 'duplicate_window' must be >= 'send_timeout' (retried sends rely on it)")
    return options


def _optional_int(reader: OptionReader, name: str) -> int | None:
    value = reader.int(name, 0, min=1)
    return value or None


def _tls(reader: OptionReader) -> ssl.SSLContext | None:
    """A client TLS context when ``tls=true`` (or a certificate option) is given; file errors are ``ConfigError``."""
    ca_file, cert_file, key_file = reader.str("ca_file"), reader.str("cert_file"), reader.str("key_file")
    wanted = reader.bool("tls", bool(ca_file or cert_file))
    if not wanted:
        if ca_file or cert_file or key_file:
            raise ConfigError("ca_file, cert_file and key_file need tls=true")
        return None
    if key_file and not cert_file:
        raise ConfigError("key_file needs cert_file")
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror or str(exc)
        raise ConfigError(f"cannot load TLS files for nats://: {type(exc).__name__}: {detail}") from exc
    return ctx
