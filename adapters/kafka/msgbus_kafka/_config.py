"""URL options of the Kafka adapter, read once into a frozen dataclass."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

from msgbus.adapter import BusURL, OptionReader
from msgbus.errors import ConfigError

# Broker default message.max.bytes is 1048588 and the producer's max_request_size 1048576; leave room for the
# record batch overhead and our metadata headers.
DEFAULT_MAX_MESSAGE_SIZE = 1_000_000
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# replication_factor unset: the cluster's size, at most 3 (see _adapter.Kafka._replication).
AUTO_REPLICATION = 0
_HOSTPORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    """Everything the adapter needs from the URL. Holds the password, so it has no field-showing repr."""

    bootstrap: tuple[str, ...]
    tls: bool
    username: str | None
    password: str | None
    sasl_mechanism: str
    ssl_cafile: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    ssl_check_hostname: bool
    ssl_verify: bool
    partitions: int
    replication_factor: int  # AUTO_REPLICATION: decided from the cluster's size when a topic is created
    dead_letter_partitions: int
    group_prefix: str
    visibility_timeout: float
    rebalance_timeout: float
    session_timeout: float
    heartbeat_interval: float
    commit_interval: float
    max_message_size: int
    request_timeout: float
    linger: float
    client_id: str

    def __repr__(self) -> str:
        return f"KafkaOptions(bootstrap={','.join(self.bootstrap)!r}, tls={self.tls}, sasl={self.username is not None})"

    @property
    def security_protocol(self) -> str:
        sasl = "SASL_" if self.username is not None else ""
        return f"{sasl}SSL" if self.tls else f"{sasl}PLAINTEXT"

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings shared by aiokafka's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout * 1000),
        }
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.username is not None:
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password or "",
            }
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: the system CAs (or ``ssl_cafile``), optional client certificate.

        ``ssl_check_hostname=false`` only stops matching the certificate to the host name: the certificate is
        still verified against the CAs. Only ``ssl_verify=false`` turns verification off (and hostname
        checking with it, which needs a verified certificate).
        """
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        context.check_hostname = self.ssl_check_hostname and self.ssl_verify
        if not self.ssl_verify:
            context.verify_mode = ssl.CERT_NONE
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context


def read_options(url: BusURL, reader: OptionReader) -> KafkaOptions:
    """Read the adapter's options; the caller rejects unknown ones afterwards."""
    tls = url.scheme == "kafka+ssl"
    if url.path not in ("", "/"):
        raise ConfigError(f"a kafka URL has no path (got {url.path!r}); give options as ?name=value")
    first = f"{url.host or '127.0.0.1'}:{url.port or 9092}"
    extra = [h.strip() for h in (reader.str("bootstrap") or "").split(",") if h.strip()]
    for host in extra:
        if not _HOSTPORT.match(host):
            raise ConfigError(f"option 'bootstrap' must be a comma list of host:port, got {host!r}")
    session = reader.float("session_timeout", 10.0, min=1.0)
    options = KafkaOptions(
        bootstrap=(first, *extra),
        tls=tls,
        username=url.username or None,
        password=url.password,
        sasl_mechanism=reader.choice("sasl_mechanism", "PLAIN", SASL_MECHANISMS),
        ssl_cafile=reader.str("ssl_cafile") if tls else None,
        ssl_certfile=reader.str("ssl_certfile") if tls else None,
        ssl_keyfile=reader.str("ssl_keyfile") if tls else None,
        ssl_check_hostname=reader.bool("ssl_check_hostname", True) if tls else False,
        ssl_verify=reader.bool("ssl_verify", True) if tls else False,
        partitions=reader.int("partitions", 8, min=1),
        replication_factor=reader.int("replication_factor", AUTO_REPLICATION, min=1),
        dead_letter_partitions=reader.int("dead_letter_partitions", 1, min=1),
        group_prefix=_prefix(reader.str("group_prefix", "msgbus") or "msgbus"),
        visibility_timeout=reader.float("visibility_timeout", 30.0, min=0.1),
        # As long as the Java client's (max.poll.interval.ms): during a rebalance a member holds its partitions
        # while run() extends its handlers' locks, up to 80% of this; at 60 s a 75 s handler was redelivered.
        rebalance_timeout=reader.float("rebalance_timeout", 300.0, min=1.0),
        session_timeout=session,
        heartbeat_interval=reader.float("heartbeat_interval", min(1.0, session / 3), min=0.05),
        commit_interval=reader.float("commit_interval", 0.2, min=0.0),
        max_message_size=reader.int("max_message_size", DEFAULT_MAX_MESSAGE_SIZE, min=1),
        request_timeout=reader.float("request_timeout", 40.0, min=1.0),
        linger=reader.float("linger", 0.0, min=0.0),
        client_id=reader.str("client_id", "msgbus") or "msgbus",
    )
    if options.heartbeat_interval >= options.session_timeout:
        raise ConfigError("option 'heartbeat_interval' must be shorter than 'session_timeout'")
    if options.username is None and options.password is not None:
        raise ConfigError("a kafka URL with a password needs a user name (SASL)")
    return options


def _prefix(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", value):
        raise ConfigError(f"option 'group_prefix' must be 1-64 letters, digits, '_', '.', '-', got {value!r}")
    return value
