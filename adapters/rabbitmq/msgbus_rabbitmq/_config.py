"""URL options of ``amqp://`` / ``amqps://`` buses, read once into a frozen options object."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # well under RabbitMQ's own 128 MiB default
BROKER_MAX_MESSAGE_SIZE = 512 * 1024 * 1024  # the largest max_message_size RabbitMQ accepts
DEFAULT_DELIVERY_LIMIT = 20  # a quorum queue's x-delivery-limit; RabbitMQ 4's own default
DEFAULT_PARTITIONS = 16  # partition queues of an endpoint with ordering=per_key
MAX_PARTITIONS = 256


@dataclass(frozen=True, slots=True)
class RabbitMQOptions:
    """Everything the adapter needs from the URL. ``password`` never appears in ``repr``."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    vhost: str
    tls: ssl.SSLContext | None = field(repr=False)
    queue_type: str = "quorum"
    confirms: bool = True
    send_timeout: float = 30.0
    connect_timeout: float = 10.0
    heartbeat: int = 60
    reconnect_interval: float = 1.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    ordering: str = "none"  # per_key: each endpoint is `partitions` single-active-consumer queues, by key hash
    partitions: int = DEFAULT_PARTITIONS


def read_options(url: BusURL, options: OptionReader) -> RabbitMQOptions:
    """Read the adapter's options from ``options`` (the core rejects any left unread)."""
    secure = url.scheme == "amqps"
    ca_file = options.str("ca_file")
    cert_file = options.str("cert_file")
    key_file = options.str("key_file")
    verify = options.bool("verify", True)
    if not secure and (ca_file or cert_file or key_file):
        raise ConfigError("ca_file, cert_file and key_file need an amqps:// URL")
    if key_file and not cert_file:
        raise ConfigError("key_file needs cert_file")
    max_size = options.int("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, min=1)
    if max_size > BROKER_MAX_MESSAGE_SIZE:
        raise ConfigError(f"option 'max_message_size' must be <= {BROKER_MAX_MESSAGE_SIZE} (RabbitMQ's ceiling)")
    vhost = unquote(url.path[1:]) if url.path.startswith("/") else unquote(url.path)
    queue_type = options.choice("queue_type", "quorum", ("quorum", "classic"))
    ordering = options.choice("ordering", "none", ("none", "per_key"))
    partitions = options.int("partitions", DEFAULT_PARTITIONS, min=1)
    if partitions > MAX_PARTITIONS:
        raise ConfigError(f"option 'partitions' must be <= {MAX_PARTITIONS}, got {partitions}")
    if ordering == "per_key" and queue_type != "quorum":
        # A classic queue does not count returns, and a retry then travels as a copy to the tail of the queue.
        raise ConfigError("ordering=per_key needs queue_type=quorum (a classic queue cannot keep a retry in place)")
    return RabbitMQOptions(
        host=url.host or "localhost",
        port=url.port or (5671 if secure else 5672),
        username=url.username if url.username is not None else "guest",
        password=url.password if url.password is not None else "guest",
        vhost=vhost or "/",
        tls=_tls_context(ca_file, cert_file, key_file, verify) if secure else None,
        queue_type=queue_type,
        confirms=options.bool("confirms", True),
        send_timeout=options.float("send_timeout", 30.0, min=0.1),
        connect_timeout=options.float("connect_timeout", 10.0, min=0.1),
        heartbeat=options.int("heartbeat", 60, min=0),
        reconnect_interval=options.float("reconnect_interval", 1.0, min=0.1),
        max_message_size=max_size,
        delivery_limit=options.int("delivery_limit", DEFAULT_DELIVERY_LIMIT, min=0),
        ordering=ordering,
        partitions=partitions,
    )


def _tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool) -> ssl.SSLContext:
    """A client TLS context; file problems become ``ConfigError`` without echoing file contents."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        detail = exc.strerror or str(exc)
        raise ConfigError(f"cannot load TLS files for amqps://: {type(exc).__name__}: {detail}") from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
