"""Toxiproxy, the fault-injecting TCP proxy the failure suite puts between a client and its broker.

Shopify's Toxiproxy (``github.com/Shopify/toxiproxy/v2``, pinned by ``integration/toxiproxy/go.mod``) is built
from the Go module proxy on first start, like pstest, and run on 127.0.0.1 with its HTTP API on 8474. Tests
create one proxy per broker port through that API (``Toxiproxy``), then add and remove *toxics*: ``reset_peer``
(TCP RST), ``latency``, ``timeout`` with timeout 0 (a blackhole: bytes are dropped, the connection stays open).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

from . import _probes
from ._go import GoProgram
from ._launchers import HOST, LocalBroker, register

SERVER = GoProgram("toxiproxy-server", "toxiproxy", "github.com/Shopify/toxiproxy/v2/cmd/server")
API_PORT = 8474
# The proxy for broker port P listens on PROXY_BASE + P % 10000: 21000-30999, below Linux's ephemeral ports
# (32768-60999), which clients' own connections take (a proxy on 35682 once found its port in use).
PROXY_BASE = 21000


def proxy_port(port: int) -> int:
    """The port the failure suite's proxy for broker port ``port`` listens on (5672 -> 26672)."""
    return PROXY_BASE + port % 10000


Stream = Literal["upstream", "downstream"]


@register
class ToxiproxyServer(LocalBroker):
    """The Toxiproxy server (API on 127.0.0.1:8474); it keeps no state, proxies are made by each test run."""

    name = "toxiproxy"
    port = API_PORT
    persistent = False
    start_timeout = 30.0
    stop_timeout = 10.0

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"http://{host}:{port(self.port)}"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probes.http_ok(f"{self.url_for(host, port)}/version")

    def executable(self) -> str | None:
        return str(SERVER.binary) if SERVER.up_to_date() else None

    def install(self) -> None:
        SERVER.build()

    def argv(self) -> list[str]:
        return [str(SERVER.binary), "-host", HOST, "-port", str(self.port)]

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "LOG_LEVEL": "warn"}  # not a line per API request and connection


class ToxiproxyError(RuntimeError):
    """The Toxiproxy API refused a request (the message has its answer)."""


class Toxiproxy:
    """A small client for Toxiproxy's HTTP API: proxies and their toxics. Blocking; every call is one request."""

    def __init__(self, api: str = f"http://{HOST}:{API_PORT}", *, timeout: float = 10.0) -> None:
        self.api = api.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ToxiproxyError(f"{method} {path}: {exc.code} {exc.read()[:300]!r}") from exc
        return json.loads(raw) if raw.strip() else None

    def version(self) -> str:
        """The server's version string (its ``/version``)."""
        answer = self._call("GET", "/version")
        return str(answer["version"] if isinstance(answer, dict) else answer)

    def create(self, name: str, listen_port: int, upstream: str) -> None:
        """A proxy ``name`` from 127.0.0.1:``listen_port`` to ``upstream`` (host:port); replaced if it exists."""
        self.delete(name)
        self._call("POST", "/proxies", {"name": name, "listen": f"{HOST}:{listen_port}", "upstream": upstream})

    def delete(self, name: str) -> None:
        """Remove proxy ``name`` (closing its connections); nothing when there is none."""
        try:
            self._call("DELETE", f"/proxies/{name}")
        except ToxiproxyError as exc:
            if " 404 " not in str(exc):
                raise

    def enable(self, name: str, enabled: bool) -> None:
        """Disabling closes every connection and stops listening (clients get refused); enabling listens again."""
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def add(self, name: str, toxic: str, kind: str, stream: Stream, **attributes: float) -> None:
        """Add toxic ``toxic`` of type ``kind`` (``latency``, ``reset_peer``, ``timeout``...) to one direction."""
        body = {"name": toxic, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes}
        self._call("POST", f"/proxies/{name}/toxics", body)

    def remove(self, name: str, toxic: str) -> None:
        """Remove toxic ``toxic`` from proxy ``name``: the connection's bytes flow unharmed again."""
        self._call("DELETE", f"/proxies/{name}/toxics/{toxic}")

    def clear(self, name: str) -> None:
        """Remove every toxic of proxy ``name`` and enable it."""
        for toxic in self._call("GET", f"/proxies/{name}/toxics") or []:
            self.remove(name, toxic["name"])
        self.enable(name, True)
