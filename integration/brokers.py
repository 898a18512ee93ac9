"""Real broker endpoints for the integration tests, and the CLI that starts and stops local brokers.

Where a backend's endpoint comes from, first match wins:

1. the environment: ``MSGBUS_TEST_<BACKEND>_URL``, or the broker's own variable (``PUBSUB_EMULATOR_HOST``);
2. a local broker process started by this module (installed first when allowed, see ``resolve``);
3. a container through ``testcontainers``, when a Docker daemon answers;
4. none: the backend's tests are skipped with the reason, or FAIL when ``MSGBUS_REQUIRE_BACKENDS`` names it.

CLI: ``python -m integration.brokers start|stop|restart|status [--hard] [NAME...]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from ._containers import ContainerBroker, docker_answers
from ._launchers import LAUNCHERS, LauncherError, LocalBroker, NotImplementedLauncher, state_root

__all__ = [
    "DEFAULT_BROKERS",
    "LAUNCHERS",
    "BrokerUnavailable",
    "Endpoint",
    "LauncherError",
    "LocalBroker",
    "NotImplementedLauncher",
    "Restartable",
    "endpoint",
    "get",
    "main",
    "release",
    "required",
    "resolve",
]

# What `start` with no names, `make brokers` and CI provision.
DEFAULT_BROKERS = ("rabbitmq", "redis", "nats")


class Restartable(Protocol):
    """What the contract suite's "restart the broker" hook calls."""

    def restart(self, *, hard: bool = False) -> None:
        """Stop the broker (``hard``: kill it) and start it on the same data; return once it serves again."""


class BrokerUnavailable(RuntimeError):
    """No endpoint for a backend; ``required`` says whether the run must fail rather than skip."""

    def __init__(self, backend: str, reason: str, *, required: bool) -> None:
        super().__init__(f"{backend}: {reason}")
        self.backend = backend
        self.reason = reason
        self.required = required


@dataclass(frozen=True)
class Endpoint:
    """Where a backend's broker is. ``handle`` restarts it; None when it came from the environment."""

    backend: str
    url: str = field(repr=False)
    source: Literal["env", "local", "container"]
    handle: Restartable | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Endpoint({self.backend!r}, {redact(self.url)!r}, source={self.source!r})"

    def restart(self, *, hard: bool = False) -> None:
        """Restart the broker (see ``Restartable``); raises LauncherError for an endpoint from the environment."""
        if self.handle is None:
            raise LauncherError(f"{self.backend}: the endpoint came from the environment; it cannot be restarted")
        self.handle.restart(hard=hard)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def get(name: str) -> LocalBroker:
    """The local launcher registered as ``name`` (raises KeyError listing the known names)."""
    try:
        return LAUNCHERS[name]()
    except KeyError:
        raise KeyError(f"unknown broker {name!r}; known: {', '.join(sorted(LAUNCHERS))}") from None


def required(backend: str) -> bool:
    """True when ``MSGBUS_REQUIRE_BACKENDS`` (comma list, or ``all``) names ``backend``: missing means failure."""
    names = {n.strip().lower() for n in os.environ.get("MSGBUS_REQUIRE_BACKENDS", "").split(",") if n.strip()}
    return "all" in names or backend in names


_resolved: dict[str, Endpoint | BrokerUnavailable] = {}
_leased: list[LocalBroker] = []
_started_containers: list[ContainerBroker] = []


def resolve(backend: str) -> Endpoint:
    """The endpoint for ``backend`` by the order in this module's docstring; cached for the process.

    May start a local broker (left running for the other tests; ``release()`` stops what this process
    started) or a container. A missing local broker is installed only when the backend is required or
    ``MSGBUS_TEST_INSTALL=1``. Raises BrokerUnavailable with every reason tried.
    """
    cached = _resolved.get(backend)
    if cached is None:
        try:
            cached = _resolve(backend)
        except BrokerUnavailable as exc:
            cached = exc
        _resolved[backend] = cached
    if isinstance(cached, BrokerUnavailable):
        raise cached
    return cached


def _resolve(backend: str) -> Endpoint:
    broker = get(backend)
    for variable in (f"MSGBUS_TEST_{backend.upper()}_URL", *broker.env_vars):
        value = os.environ.get(variable)
        if value:
            return Endpoint(backend, broker.url_from_env(variable, value), "env")

    reasons = []
    allow_install = required(backend) or os.environ.get("MSGBUS_TEST_INSTALL") == "1"
    if broker.implemented and not broker.installed() and not allow_install:
        reasons.append(
            f"not installed locally (`python -m integration.brokers start {backend}` installs it, "
            "or set MSGBUS_TEST_INSTALL=1)"
        )
    else:
        try:
            broker.lease(started=broker.start(install=allow_install))
            _leased.append(broker)
            return Endpoint(backend, broker.url, "local", broker)
        except LauncherError as exc:
            reasons.append(str(exc))

    docker = docker_answers()
    if docker is not None:
        reasons.append(docker)
    elif broker.image is None:
        reasons.append("no container image known")
    else:
        try:
            container = ContainerBroker(broker)
            container.start()
        except ImportError:
            reasons.append("a Docker daemon answers but testcontainers is not installed (pip install testcontainers)")
        except Exception as exc:  # any container failure is one more reason, reported with the others
            reasons.append(f"container failed: {type(exc).__name__}: {exc}")
        else:
            _started_containers.append(container)
            return Endpoint(backend, container.url, "container", container)

    raise BrokerUnavailable(
        backend,
        f"no broker: {'; '.join(reasons)}",
        required=required(backend),
    )


def endpoint(backend: str) -> Endpoint:
    """The endpoint for ``backend`` in a pytest test: skips the test when there is none, or fails it when
    ``MSGBUS_REQUIRE_BACKENDS`` names the backend. Call it from a test or fixture, not at import time.
    """
    import pytest

    try:
        return resolve(backend)
    except BrokerUnavailable as exc:
        if exc.required:
            pytest.fail(f"{exc} (required by MSGBUS_REQUIRE_BACKENDS)", pytrace=False)
        pytest.skip(str(exc))


def release() -> None:
    """Let go of the brokers this process resolved; stop those a test run started once no run uses them.

    Brokers started from the CLI (``make brokers``, ``.ci/provision.sh``) keep running, and so does every
    broker when ``MSGBUS_TEST_KEEP_BROKERS=1``. Containers this process started are removed. Idempotent.
    """
    keep = os.environ.get("MSGBUS_TEST_KEEP_BROKERS") == "1"
    while _leased:
        broker = _leased.pop()
        if keep:
            broker.keep()
        broker.unlease()
    while _started_containers:
        _started_containers.pop().stop()
    _resolved.clear()


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code (non-zero when an action failed or a broker is not ready)."""
    parser = argparse.ArgumentParser(prog="python -m integration.brokers", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "restart", "status"))
    parser.add_argument("names", nargs="*", help=f"brokers (default: {' '.join(DEFAULT_BROKERS)}; all: every one)")
    parser.add_argument("--hard", action="store_true", help="stop/restart with SIGKILL, like a crash")
    args = parser.parse_intermixed_args(argv)
    names = args.names or list(DEFAULT_BROKERS)
    if names == ["all"]:
        names = sorted(LAUNCHERS)
    unknown = [n for n in names if n not in LAUNCHERS]
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(unknown)}; known: {', '.join(sorted(LAUNCHERS))}")
    failed = 0
    for name in names:
        broker = get(name)
        try:
            if args.action == "start":
                broker.start()
                broker.keep()
            elif args.action == "stop":
                if not broker.stop(hard=args.hard):
                    print(f"{name}: not running", file=sys.stderr)
            elif args.action == "restart":
                broker.restart(hard=args.hard)
            else:
                print(broker.status())
                failed += broker.running() is None or broker.ready() is not None
        except LauncherError as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            failed += 1
    if args.action == "status":
        print(f"state dir: {state_root()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
