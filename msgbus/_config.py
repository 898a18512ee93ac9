"""Where a bus URL comes from: the argument, ``MSGBUS_URL``, a config file profile, or the embedded default."""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("msgbus")

DEFAULT_URL = "sqlite:///./msgbus.db"
DEFAULT_CONFIG = "msgbus.toml"


@dataclass(frozen=True, slots=True)
class Resolved:
    url: str
    options: dict[str, Any]
    source: str  # where the URL came from, for messages


def resolve(url: str | None, profile: str | None) -> Resolved:
    """Pick the URL and file options for ``connect()``, in the documented order."""
    if url is not None:
        if profile is not None:
            raise ConfigError("give either a URL or a profile, not both")
        return Resolved(url, {}, "argument")
    if profile is None and os.environ.get("MSGBUS_URL"):
        return Resolved(os.environ["MSGBUS_URL"], {}, "MSGBUS_URL")
    path = _config_path()
    if path is not None:
        profiles = _load(path)
        name = profile or "default"
        if name in profiles:
            entry = dict(profiles[name])
            found = entry.pop("url", None)
            if not isinstance(found, str):
                raise ConfigError(f"profile [bus.{name}] in {path} needs a string 'url'")
            opts = entry.pop("options", {})
            if not isinstance(opts, dict):
                raise ConfigError(f"[bus.{name}.options] in {path} must be a table")
            opts.update(entry)
            return Resolved(found, opts, f"{path} [bus.{name}]")
        if profile is not None:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"no profile [bus.{profile}] in {path} (profiles: {known})")
    elif profile is not None:
        raise ConfigError(
            f"profile {profile!r} asked for, but there is no config file ({DEFAULT_CONFIG} or MSGBUS_CONFIG)"
        )
    log.warning(
        "msgbus: no MSGBUS_URL or config file; using the embedded default %s (file %s)",
        DEFAULT_URL,
        Path("msgbus.db").resolve(),
    )
    return Resolved(DEFAULT_URL, {}, "default")


def _config_path() -> Path | None:
    explicit = os.environ.get("MSGBUS_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"MSGBUS_CONFIG names {path}, which is not a file")
        return path
    path = Path(DEFAULT_CONFIG)
    return path if path.is_file() else None


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        if path.suffix in (".yaml", ".yml"):
            data = _load_yaml(path)
        else:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    bus = data.get("bus", {})
    if not isinstance(bus, dict) or not all(isinstance(v, dict) for v in bus.values()):
        raise ConfigError(f"config file {path}: 'bus' must hold tables like [bus.orders] with a url")
    return bus


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(f"{path} is YAML: pip install pyyaml (or use msgbus.toml)") from None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data
