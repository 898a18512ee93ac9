"""URL options of the Pub/Sub adapter, read once into a frozen dataclass."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Literal

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

Persistence = Literal["none", "process-crash", "disk"]

# ``ordering=per_key`` as every adapter spells it; ``true``/``false`` as this adapter spelled it first.
_ORDERING = ("none", "per_key", "true", "false")
PUBSUB_MAX_MESSAGE = 10_000_000  # Pub/Sub's limit on one message (data + attributes + ordering key)
# The declared limit on Record.size(): the adapter's own attributes and JSON escaping need some room.
DEFAULT_MAX_MESSAGE_SIZE = PUBSUB_MAX_MESSAGE - 64 * 1024
MAX_ACK_DEADLINE = 600  # seconds: Pub/Sub's upper bound for ack deadlines and modify_ack_deadline
MIN_SUBSCRIPTION_ACK_DEADLINE = 10  # seconds: the smallest ack deadline a subscription may have
_PROJECT = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]$")  # includes domain-scoped ids (example.com:proj)


@dataclass(frozen=True, slots=True)
class PubSubOptions:
    """Everything the adapter needs from the URL (it holds no secret: credentials come from the environment)."""

    project: str
    emulator_host: str | None  # host:port of an emulator (plaintext gRPC, no credentials); None: the real service
    prefix: str
    ack_deadline: int  # seconds a pulled message stays ours (the lock duration)
    ordering: bool
    max_delivery_attempts: int  # the subscription's dead-letter policy (5..100)
    max_message_size: int
    persistence: Persistence
    batch_max_messages: int
    batch_max_bytes: int
    batch_max_latency: float
    publish_timeout: float  # seconds a send may take, retries included
    pull_timeout: float  # seconds one pull RPC may wait beyond the caller's receive timeout
    rpc_timeout: float  # seconds for admin, ack and modify-deadline calls

    @property
    def subscription_ack_deadline(self) -> int:
        """The deadline set on the subscription; receivers shorten it per message with modify_ack_deadline."""
        return max(MIN_SUBSCRIPTION_ACK_DEADLINE, self.ack_deadline)


def read_options(url: BusURL, reader: OptionReader) -> PubSubOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards.

    ``pubsub://PROJECT`` names the project; ``emulator_host=`` (else ``$PUBSUB_EMULATOR_HOST``) selects an
    emulator. A port or path in the URL is a mistake (the project is the whole address), so it is refused.
    """
    project = url.host or ""
    if not project:
        raise ConfigError("pubsub URL needs a project id: pubsub://PROJECT")
    if not _PROJECT.match(project):
        raise ConfigError(f"pubsub project id {project!r} is not a valid Google Cloud project id")
    if url.port is not None or url.path.strip("/"):
        raise ConfigError("pubsub URL is pubsub://PROJECT?options; use emulator_host=HOST:PORT for an emulator")
    if url.username is not None or url.password is not None:
        raise ConfigError("pubsub URL takes no credentials; use GOOGLE_APPLICATION_CREDENTIALS or workload identity")
    emulator = reader.str("emulator_host") or os.environ.get("PUBSUB_EMULATOR_HOST") or None
    ack = reader.float("ack_deadline", 60.0, min=1.0)
    if ack > MAX_ACK_DEADLINE:
        raise ConfigError(f"option 'ack_deadline' must be <= {MAX_ACK_DEADLINE} seconds, got {ack}")
    attempts = reader.int("max_delivery_attempts", 100, min=5)
    if attempts > 100:
        raise ConfigError(f"option 'max_delivery_attempts' must be between 5 and 100, got {attempts}")
    options = PubSubOptions(
        project=project,
        emulator_host=emulator,
        prefix=_prefix(reader.str("prefix", "") or ""),
        ack_deadline=math.ceil(ack),
        ordering=reader.choice("ordering", "none", _ORDERING) in ("per_key", "true"),
        max_delivery_attempts=attempts,
        max_message_size=reader.int("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, min=1),
        persistence=_persistence(reader),
        batch_max_messages=reader.int("batch_max_messages", 1000, min=1),
        batch_max_bytes=reader.int("batch_max_bytes", 9_000_000, min=1024),
        batch_max_latency=reader.float("batch_max_latency", 0.005, min=0.0),
        publish_timeout=reader.float("publish_timeout", 60.0, min=0.1),
        pull_timeout=reader.float("pull_timeout", 2.0, min=0.1),
        rpc_timeout=reader.float("rpc_timeout", 30.0, min=0.1),
    )
    if options.max_message_size > DEFAULT_MAX_MESSAGE_SIZE:
        raise ConfigError(f"option 'max_message_size' must be <= {DEFAULT_MAX_MESSAGE_SIZE} (Pub/Sub takes 10 MB)")
    if options.batch_max_messages > 1000:
        raise ConfigError("option 'batch_max_messages' must be <= 1000 (Pub/Sub's limit per publish request)")
    if options.batch_max_bytes > PUBSUB_MAX_MESSAGE:
        raise ConfigError(f"option 'batch_max_bytes' must be <= {PUBSUB_MAX_MESSAGE} (Pub/Sub's request limit)")
    return options


def _prefix(value: str) -> str:
    if value and not re.match(r"^[A-Za-z][A-Za-z0-9_.~+%-]*$", value):
        raise ConfigError(f"option 'prefix' must start with a letter and use Pub/Sub name characters, got {value!r}")
    return value


def _persistence(reader: OptionReader) -> Persistence:
    value = reader.choice("persistence", "disk", ("none", "process-crash", "disk"))
    if value == "none":
        return "none"
    if value == "process-crash":
        return "process-crash"
    return "disk"
