"""What a backend can do, declared as data and proved by the contract suite."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

from .errors import CapabilityMissing, ConfigError


@dataclass(frozen=True, slots=True)
class Capabilities:
    """A backend's declared capabilities. Declaring one is a claim the contract suite tests.

    Sizes are in bytes and times in seconds; ``None`` means "no limit the adapter knows of".
    """

    ordering: Literal["none", "per_key"] = "none"  # per_key: same key -> send order, one consumer at a time
    delayed_delivery: bool = False  # send(..., delay=) holds a message back
    max_delay: float | None = None  # longest delay accepted (seconds)
    delayed_nack: bool = False  # nack(delay=) holds a redelivery back
    native_dead_letter: bool = False  # the broker itself dead-letters (vs. the adapter re-sending)
    max_message_size: int | None = None  # Record.size() limit, enforced before sending
    persistence: Literal["none", "process-crash", "disk"] = "disk"  # what survives a broker restart
    cross_process: bool = True  # other processes can reach the same bus (kill-a-consumer test)
    lock_extension: bool = False  # unacked messages return after lock_duration unless extended
    restartable: bool = True  # there is a broker process that can restart (reconnect test)
    lock_duration: float | None = None  # seconds a received message stays invisible to others
    exactly_once: bool = False
    # ``attempt`` counts every delivery, including those to consumers that died or stopped before settling:
    # what lets the runtime dead-letter a message that kills its consumer (the delivery limit, docs/guide.md).
    counts_deliveries: bool = False
    native_delivery_limit: int | None = None  # deliveries after which the broker dead-letters by itself
    ack_delay: float = 0.0  # seconds an ack handed to the adapter may wait before it is durable
    # Seconds within which a send repeating a message id (a retry after a timeout) is stored once
    # (``msgbus.adapter.dedup_key``); None: every send is stored.
    dedup_window: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Every capability by name, for reports (``msgbus contract`` prints them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_BOOL_FLAGS = {
    "delayed_delivery",
    "delayed_nack",
    "native_dead_letter",
    "cross_process",
    "lock_extension",
    "exactly_once",
    "restartable",
    "counts_deliveries",
}


def has(caps: Capabilities, name: str) -> bool:
    """Whether ``caps`` offers capability ``name`` (``"ordering"`` means per-key ordering)."""
    if name == "ordering" or name == "per_key_ordering":
        return caps.ordering == "per_key"
    if name == "persistence":
        return caps.persistence != "none"
    if name == "dedup_window":
        return bool(caps.dedup_window and caps.dedup_window > 0)
    if name not in _BOOL_FLAGS:
        raise ValueError(f"unknown capability {name!r}")
    return bool(getattr(caps, name))


def require(target: object, *names: str) -> None:
    """Fail at start-up, not on the first message, when a backend lacks a capability.

    ``target`` is a ``Bus`` (or anything with a ``capabilities`` attribute) or ``Capabilities``.
    """
    caps = target if isinstance(target, Capabilities) else getattr(target, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise TypeError("require() needs a Bus or a Capabilities object")
    missing = [n for n in names if not has(caps, n)]
    if missing:
        raise CapabilityMissing(f"backend {target!r} lacks required capability: {', '.join(missing)}")


def with_ordering(caps: Capabilities, asked: str | None, scheme: str) -> Capabilities:
    """``caps`` after the URL/profile option ``ordering`` (``none`` or ``per_key``; ``None``: not given).

    ``per_key`` on a backend that does not declare it (with its other options) raises ``CapabilityMissing`` at
    ``connect``; ``none`` declares no order even where the backend keeps one (Kafka partitions), so a service
    configured without ordering is tested without it.
    """
    if asked is None:
        return caps
    if asked not in ("none", "per_key"):
        raise ConfigError(f"option 'ordering' must be one of none, per_key; got {asked!r}")
    if asked == "per_key" and caps.ordering != "per_key":
        raise CapabilityMissing(
            f"{scheme}:// cannot keep per-key order with these options (ordering=per_key); see the "
            "capability matrix (docs/capabilities.md) and the adapter's page for the options that do"
        )
    return caps if asked == caps.ordering else replace(caps, ordering="none")
