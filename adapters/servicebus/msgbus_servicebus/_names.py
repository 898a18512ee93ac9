"""msgbus endpoints -> Service Bus entity names (queue, topic, subscription), with Service Bus' name rules
checked. Pure: no I/O."""

from __future__ import annotations

import re

from msgbus.adapter import Endpoint
from msgbus.errors import ConfigError

_ENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_entity(kind: str, name: str, limit: int) -> str:
    """``name`` when Service Bus accepts it for ``kind``, else ``ConfigError``."""
    if len(name) > limit or not _ENTITY.match(name):
        raise ConfigError(f"Service Bus {kind} names are 1-{limit} of letters, digits, '.', '_', '-'; got {name!r}")
    return name


def entity(endpoint: Endpoint) -> str:
    """The entity a sender addresses (queue or topic), with Service Bus' name rules checked."""
    return check_entity(endpoint.kind, endpoint.name, 260)
