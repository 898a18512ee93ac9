"""URL options of the Service Bus adapter, and connection strings turned into ``servicebus://`` URLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msgbus.adapter import BusURL, OptionReader
from msgbus.adapter import url_from_connection_string as url_from_connection_string
from msgbus.errors import ConfigError

Management = Literal["admin", "none"]
Ordering = Literal["none", "per_key"]

# Duplicate detection's history window (DuplicateDetectionHistoryTimeWindow): Azure's default and bounds, seconds.
DEFAULT_DEDUP_WINDOW = 600.0
MIN_DEDUP_WINDOW, MAX_DEDUP_WINDOW = 20.0, 7 * 24 * 3600.0
# Standard tier's limit is 256 KiB for the whole message; leave room for the AMQP sections around the body.
DEFAULT_MAX_MESSAGE_SIZE = 240 * 1024
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class ServiceBusOptions:
    """Everything the adapter needs from the URL. Holds the key, so its repr shows none of it."""

    host: str
    port: int | None
    key_name: str
    key: str
    emulator: bool
    management: Management
    lock_duration: float
    max_delivery_count: int
    max_message_size: int
    retry_total: int
    ordering: Ordering = "none"  # per_key: session-enabled entities, the key is the session id (``_sessions``)
    # Seconds of duplicate detection (RequiresDuplicateDetection on the queues and topics): None when off.
    dedup_window: float | None = None

    def __repr__(self) -> str:
        return f"ServiceBusOptions(host={self.host!r}, port={self.port}, emulator={self.emulator})"

    @property
    def connection_string(self) -> str:
        """The SDK's connection string (secret: never log it)."""
        netloc = self.host if self.port is None else f"{self.host}:{self.port}"
        text = f"Endpoint=sb://{netloc}/;SharedAccessKeyName={self.key_name};SharedAccessKey={self.key}"
        return text + (";UseDevelopmentEmulator=true" if self.emulator else "")


def read_options(url: BusURL, reader: OptionReader) -> ServiceBusOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards."""
    if not url.host:
        raise ConfigError("servicebus URL needs a host: servicebus://KeyName:Key@namespace.servicebus.windows.net")
    if not url.username or not url.password:
        raise ConfigError("servicebus URL needs the shared access key name and key: servicebus://KeyName:Key@host")
    if url.path.strip("/"):
        raise ConfigError(f"servicebus URL takes no path (entities are named by the roles), got {url.path!r}")
    emulator = reader.bool("emulator", url.host in _LOCAL_HOSTS)
    management = reader.choice("management", "none" if emulator else "admin", ("admin", "none"))
    detection = reader.bool("duplicate_detection", False)
    window = reader.float("dedup_window", 0.0, min=0.0)
    if window and not MIN_DEDUP_WINDOW <= window <= MAX_DEDUP_WINDOW:
        raise ConfigError(
            f"option 'dedup_window' must be from {MIN_DEDUP_WINDOW:g} to {MAX_DEDUP_WINDOW:g} seconds (Service Bus' "
            f"DuplicateDetectionHistoryTimeWindow), got {window:g}"
        )
    return ServiceBusOptions(
        host=url.host,
        port=url.port,
        key_name=url.username,
        key=url.password,
        emulator=emulator,
        management="admin" if management == "admin" else "none",
        lock_duration=reader.float("lock_duration", 60.0, min=1.0),
        max_delivery_count=reader.int("max_delivery_count", 10, min=1),
        max_message_size=reader.int("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, min=1),
        retry_total=reader.int("retry_total", 3, min=0),
        ordering="per_key" if reader.choice("ordering", "none", ("none", "per_key")) == "per_key" else "none",
        dedup_window=(window or DEFAULT_DEDUP_WINDOW) if detection or window else None,
    )
