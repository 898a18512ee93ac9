"""URL scheme -> adapter factory, through the ``msgbus.adapters`` entry-point group."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import entry_points

from ._url import BusURL, OptionReader
from .adapter import Adapter
from .errors import AdapterNotInstalled, ConfigError

Factory = Callable[[BusURL, OptionReader], Adapter]

GROUP = "msgbus.adapters"

# Built into the core: found even when msgbus runs from a source tree without being installed.
_BUILTIN = {"memory": "msgbus._memory:create", "sqlite": "msgbus._sqlite:create"}

# Schemes of first-party adapters, so a missing one names the package to install.
PACKAGES = {
    "amqp": "msgbus-rabbitmq",
    "amqps": "msgbus-rabbitmq",
    "kafka": "msgbus-kafka",
    "kafka+ssl": "msgbus-kafka",
    "sqs": "msgbus-sqs",
    "pubsub": "msgbus-pubsub",
    "servicebus": "msgbus-servicebus",
    "redis": "msgbus-redis",
    "rediss": "msgbus-redis",
    "nats": "msgbus-nats",
    "postgresql": "msgbus-postgresql",
    "postgres": "msgbus-postgresql",
}


@lru_cache(maxsize=1)
def _registered() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def schemes() -> list[str]:
    """Every URL scheme with an installed adapter."""
    return sorted(_registered())


def factory(scheme: str) -> Factory:
    """The adapter factory for ``scheme``; ``AdapterNotInstalled`` names the package when missing."""
    target = _registered().get(scheme)
    if target is None:
        raise AdapterNotInstalled(scheme, PACKAGES.get(scheme))
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = PACKAGES.get(scheme)
        hint = f": pip install {package}" if package else ""
        raise ConfigError(f"adapter for '{scheme}://' failed to import ({exc}){hint}") from exc
    fn: Factory = getattr(module, attr)
    return fn
