"""msgbus: one small interface for work queues and pub/sub on any message broker.

``msgbus.connect(url)`` returns a ``Bus``; its ``producer``/``consumer`` (work queues) and
``publisher``/``subscriber`` (pub/sub) behave the same on every backend, as the shipped contract
suite (``msgbus.testing``) proves.
"""

from __future__ import annotations

from typing import Any

from . import errors
from ._batch import BatchHandler, BatchMiddleware, BatchResult
from ._bus import Bus, Consumer, Producer, Publisher, Subscriber
from ._capabilities import Capabilities, require
from ._capabilities import with_ordering as _with_ordering
from ._config import resolve
from ._message import Message, Outgoing
from ._redrive import Redriven
from ._registry import factory, schemes
from ._retry import RetryPolicy
from ._runtime import Handler, Middleware
from ._url import parse_url
from .adapter import (
    HEADER_ATTEMPTS,
    HEADER_DEAD_LETTER_HISTORY,
    HEADER_DEAD_LETTER_REASON,
    HEADER_DEAD_LETTER_SOURCE,
    HEADER_REPLY_TO,
)
from .errors import ConfigError

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_DEAD_LETTER_HISTORY",
    "HEADER_DEAD_LETTER_REASON",
    "HEADER_DEAD_LETTER_SOURCE",
    "HEADER_REPLY_TO",
    "BatchHandler",
    "BatchMiddleware",
    "BatchResult",
    "Bus",
    "Capabilities",
    "Consumer",
    "Handler",
    "Message",
    "Middleware",
    "Outgoing",
    "Producer",
    "Publisher",
    "Redriven",
    "RetryPolicy",
    "Subscriber",
    "__version__",
    "connect",
    "errors",
    "require",
    "schemes",
]

__version__ = "0.1.0"


def connect(url: str | None = None, *, profile: str | None = None, **options: Any) -> Bus:
    """A ``Bus`` for ``url`` (not yet connected: use ``async with`` or ``await bus.open()``).

    Without a URL: ``MSGBUS_URL``, else the config file (``MSGBUS_CONFIG`` or ``./msgbus.toml``, profile
    ``default`` or ``profile``), else the embedded default ``sqlite:///./msgbus.db`` with a warning.
    ``options`` are merged over the URL's query options; unknown ones raise ``ConfigError``.
    """
    resolved = resolve(url, profile)
    parsed = parse_url(resolved.url)
    reader = parsed.reader({**resolved.options, **options})
    topology = reader.choice("topology", "declare", ("declare", "verify"))
    make = factory(parsed.scheme)
    adapter = make(parsed, reader)
    ordering = reader.str("ordering")  # None as well when the adapter read it itself (and declared from it)
    reader.finish()
    if not isinstance(adapter, msgbus_adapter.Adapter):
        raise ConfigError(f"the adapter for {parsed.scheme}:// is not a msgbus.adapter.Adapter")
    adapter.capabilities = _with_ordering(adapter.capabilities, ordering, parsed.scheme)
    return Bus(adapter, parsed, create_topology=topology == "declare", options=reader.used())


from . import adapter as msgbus_adapter  # noqa: E402  (after connect, to keep the public names first)
