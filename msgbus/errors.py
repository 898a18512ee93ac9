"""The msgbus error tree: every failure a caller can see is one of these.

Adapters translate their client library's exceptions into these types in one place
(``raise ... from exc``), so service code never catches a broker-specific exception.
``retryable`` tells the runtime (and the caller) whether trying again may succeed.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotInstalled",
    "BrokerError",
    "CapabilityMissing",
    "ClosedError",
    "ConfigError",
    "ConnectionLost",
    "DecodeError",
    "InvalidMessage",
    "MessageTooLarge",
    "MsgbusError",
    "PublishError",
    "RequestTimeout",
    "TopologyError",
]


class MsgbusError(Exception):
    """Base of every msgbus error."""

    retryable: bool = False


class ConfigError(MsgbusError, ValueError):
    """A URL, option or config file is malformed or names something unknown."""


class AdapterNotInstalled(ConfigError):
    """The URL's scheme belongs to an adapter distribution that is not installed."""

    def __init__(self, scheme: str, package: str | None) -> None:
        self.scheme = scheme
        self.package = package
        if package:
            text = f"no adapter for '{scheme}://' is installed: pip install {package}"
        else:
            text = f"unknown URL scheme '{scheme}://': no installed adapter registers it"
        super().__init__(text)


class CapabilityMissing(MsgbusError):
    """The backend does not offer a capability the caller requires."""


class InvalidMessage(MsgbusError, TypeError):
    """A message to send is malformed: wrong body, header, key or option types or values."""


class MessageTooLarge(InvalidMessage):
    """The encoded message exceeds the backend's declared maximum size; nothing was sent."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message is {size} bytes, the backend accepts at most {limit}")


class DecodeError(MsgbusError):
    """A received payload could not be decoded or validated into the requested type."""


class ClosedError(MsgbusError):
    """The bus, producer or consumer was used after it was closed."""


class BrokerError(MsgbusError):
    """The broker refused or failed an operation."""

    retryable = True


class ConnectionLost(BrokerError):
    """The connection to the broker is down (and could not be re-established in time)."""


class PublishError(BrokerError):
    """The broker did not confirm a send: the message may not have been stored."""


class TopologyError(BrokerError):
    """A queue, topic or subscription is missing (verify-only mode) or was declared incompatibly."""

    retryable = False


class RequestTimeout(MsgbusError, TimeoutError):
    """``bus.request()`` got no reply within its timeout. The request may still be handled later; its late reply
    is then dropped (counted in ``bus.dropped_replies``), never handed to another caller."""
