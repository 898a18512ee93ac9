"""The testcontainers fallback: a broker in a container, used only when a Docker daemon answers.

``testcontainers`` is imported lazily, here and only after a daemon answered, so machines without Docker
(this project's CI) never need it installed.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from ._launchers import LauncherError, LocalBroker
from ._process import progress


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=2)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(self._path)


def docker_answers() -> str | None:
    """None when a Docker daemon answers ``/_ping`` (at ``$DOCKER_HOST`` or the default socket), else why not."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parts = urlsplit(host)
    try:
        if parts.scheme == "unix":
            if not os.path.exists(parts.path):
                return f"no Docker daemon ({parts.path} does not exist)"
            conn: http.client.HTTPConnection = _UnixHTTPConnection(parts.path)
        elif parts.scheme == "tcp":
            conn = http.client.HTTPConnection(parts.hostname or "localhost", parts.port or 2375, timeout=2)
        else:
            return f"DOCKER_HOST scheme {parts.scheme!r} not probed"
        conn.request("GET", "/_ping")
        status = conn.getresponse().status
        conn.close()
    except OSError as exc:
        return f"no Docker daemon answers at {host}: {exc}"
    return None if status == 200 else f"Docker daemon at {host} answered {status}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ContainerBroker:
    """A broker in a container with fixed host ports, so ``restart()`` keeps the URL and the data."""

    def __init__(self, broker: LocalBroker) -> None:
        if broker.image is None:
            raise LauncherError(f"{broker.name}: no container image known")
        from testcontainers.core.container import DockerContainer

        self.broker = broker
        self._ports = {p: _free_port() for p in (broker.port, *broker.extra_ports)}
        container: Any = DockerContainer(broker.image)
        for inner, outer in self._ports.items():
            container = container.with_bind_ports(inner, outer)
        for key, value in broker.container_env.items():
            container = container.with_env(key, value)
        if broker.container_command:
            container = container.with_command(broker.container_command)
        self._container = container
        self._host = "127.0.0.1"

    @property
    def url(self) -> str:
        """The bus URL of the containerised broker."""
        return self.broker.url_for(self._host, self._ports.__getitem__)

    def start(self) -> None:
        """Start the container and block until the broker serves clients."""
        progress(f"{self.broker.name}: starting container {self.broker.image}")
        self._container.start()
        self._host = self._container.get_container_host_ip()
        self._wait_ready()

    def stop(self) -> None:
        """Remove the container (and its data)."""
        self._container.stop()

    def restart(self, *, hard: bool = False) -> None:
        """Restart the container in place (``hard=True``: SIGKILL first), keeping ports and data; wait ready."""
        wrapped = self._container.get_wrapped_container()
        if hard:
            wrapped.kill()
            wrapped.start()
        else:
            wrapped.restart()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.broker.start_timeout
        while (reason := self.broker.probe_for(self._host, self._ports.__getitem__)) is not None:
            if time.monotonic() > deadline:
                raise LauncherError(f"{self.broker.name} container not ready: {reason}")
            time.sleep(0.5)
