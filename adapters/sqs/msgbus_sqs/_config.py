"""URL options of the SQS adapter, read once into a frozen dataclass.

``sqs://REGION?endpoint_url=...&visibility_timeout=30``: the host is the AWS region (empty: the usual
AWS environment/config chain decides); credentials come from options or that same chain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

SQS_MAX_MESSAGE_SIZE = 256 * 1024  # SNS's limit; SQS alone now takes 1 MiB, but topics go through SNS
SQS_MAX_DELAY = 900  # DelaySeconds: 15 minutes
SQS_MAX_VISIBILITY = 43200  # 12 hours
SQS_MAX_WAIT = 20  # long-poll WaitTimeSeconds

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{0,40}$")


@dataclass(frozen=True, slots=True)
class SqsOptions:
    """Everything the adapter needs from the URL. Holds credentials, so its repr shows none of them."""

    region: str | None
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    profile: str | None
    prefix: str
    fifo: bool
    ordering: str  # "per_key" (FIFO queues) or "none"
    visibility_timeout: int
    wait_time: int
    max_receive_count: int
    retention_period: int | None
    send_concurrency: int
    retries: int
    connect_timeout: float
    read_timeout: float

    def __repr__(self) -> str:
        return f"SqsOptions(region={self.region!r}, endpoint_url={self.endpoint_url!r}, fifo={self.fifo})"

    @property
    def secrets(self) -> tuple[str | None, ...]:
        """Values to scrub from any error text."""
        return (self.secret_access_key, self.session_token, self.access_key_id)


def read_options(url: BusURL, reader: OptionReader) -> SqsOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards."""
    if url.username is not None or url.password is not None:
        raise ConfigError(
            "sqs:// URLs take credentials as options (access_key_id, secret_access_key), not as user:password@"
        )
    if url.port is not None or url.path not in ("", "/"):
        raise ConfigError("sqs:// URL is sqs://REGION?options (no port or path); the endpoint goes in endpoint_url")
    region = url.host or None
    if region is not None and not _REGION.match(region):
        raise ConfigError(f"sqs:// URL host must be an AWS region like 'us-east-1', got {region!r}")
    access_key_id = reader.str("access_key_id")
    secret_access_key = reader.str("secret_access_key")
    if (access_key_id is None) != (secret_access_key is None):
        raise ConfigError("options 'access_key_id' and 'secret_access_key' must be given together")
    ordering = reader.str("ordering")
    if ordering not in (None, "none", "per_key"):
        raise ConfigError(f"option 'ordering' must be one of none, per_key; got {ordering!r}")
    fifo = reader.bool("fifo", ordering == "per_key")  # ordering=per_key means FIFO queues
    if ordering == "per_key" and not fifo:
        raise ConfigError("ordering=per_key on SQS needs FIFO queues: drop fifo=false (ordering=per_key implies it)")
    options = SqsOptions(
        region=region,
        endpoint_url=_endpoint(reader.str("endpoint_url")),
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        session_token=reader.str("session_token"),
        profile=reader.str("profile"),
        prefix=_prefix(reader.str("prefix", "") or ""),
        fifo=fifo,
        ordering=ordering or ("per_key" if fifo else "none"),
        visibility_timeout=reader.int("visibility_timeout", 30, min=1),
        wait_time=reader.int("wait_time", SQS_MAX_WAIT, min=0),
        max_receive_count=reader.int("max_receive_count", 50, min=0),
        retention_period=_optional_int(reader, "retention_period"),
        send_concurrency=reader.int("send_concurrency", 8, min=1),
        retries=reader.int("retries", 5, min=0),
        connect_timeout=reader.float("connect_timeout", 5.0, min=0.1),
        read_timeout=reader.float("read_timeout", 30.0, min=0.1),
    )
    if options.visibility_timeout > SQS_MAX_VISIBILITY:
        raise ConfigError(f"option 'visibility_timeout' must be <= {SQS_MAX_VISIBILITY} seconds (SQS's maximum)")
    if options.wait_time > SQS_MAX_WAIT:
        raise ConfigError(f"option 'wait_time' must be <= {SQS_MAX_WAIT} seconds (SQS's longest long poll)")
    if options.max_receive_count > 1000:
        raise ConfigError("option 'max_receive_count' must be <= 1000 (SQS's maximum; 0 turns the redrive off)")
    if options.retention_period is not None and not 60 <= options.retention_period <= 1209600:
        raise ConfigError("option 'retention_period' must be 60..1209600 seconds")
    if options.read_timeout <= options.wait_time:
        raise ConfigError("option 'read_timeout' must be longer than 'wait_time' (a long poll blocks that long)")
    return options


def _endpoint(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"option 'endpoint_url' must be an http:// or https:// URL, got {value!r}")
    return value


def _prefix(value: str) -> str:
    if not _PREFIX.match(value):
        raise ConfigError(f"option 'prefix' must be up to 40 letters, digits, '_' or '-', got {value!r}")
    return value


def _optional_int(reader: OptionReader, name: str) -> int | None:
    value = reader.int(name, -1)
    return None if value == -1 else value


def whole_seconds(seconds: float, limit: int) -> int:
    """SQS takes whole seconds: round up, so a delay is never shorter than asked."""
    return min(limit, max(0, math.ceil(seconds - 1e-9)))
