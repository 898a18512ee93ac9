"""Local broker processes for the integration tests: one class per broker, registered by backend name.

Every broker runs on 127.0.0.1 on a fixed test port, with its config, data, log and PID file under
``integration/.state/<name>/`` (or ``$MSGBUS_TEST_STATE_DIR/<name>/``), so a restart reuses the same data
and nothing outside that folder is written. Only a process whose PID *and* start time we recorded is ever
signalled.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, TypeVar

from . import _probes
from ._install import apt_install, importable, pip_install
from ._process import (
    PidRecord,
    locked,
    port_bindable,
    progress,
    read_pid,
    spawn,
    start_time,
    terminate,
    wait_until,
)

HOST = "127.0.0.1"
_DEFAULT_STATE = Path(__file__).resolve().parent / ".state"
# sbin folders hold rabbitmq/nats binaries and are not on a non-root user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def state_root() -> Path:
    """Where brokers keep their state: ``$MSGBUS_TEST_STATE_DIR`` or ``integration/.state``."""
    return Path(os.environ.get("MSGBUS_TEST_STATE_DIR") or _DEFAULT_STATE)


class LauncherError(RuntimeError):
    """A local broker could not be installed, started, or stopped; the message says why and what to do."""


class NotImplementedLauncher(LauncherError, NotImplementedError):
    """The backend has a registered name but no local launcher yet."""


class LocalBroker:
    """One broker as a local process: ``install``, ``start``, ``stop``, ``restart``, ``ready``, ``url``.

    ``start`` is idempotent (a broker already up is left alone) and blocks until the broker really serves
    clients. ``stop`` only touches the process recorded in this broker's PID file. Methods are safe to call
    from several processes at once (a file lock serialises them) but not from several threads.
    """

    name: ClassVar[str]
    port: ClassVar[int]
    # Further ports the broker binds (distribution, monitoring), checked free before a start.
    extra_ports: ClassVar[tuple[int, ...]] = ()
    apt_packages: ClassVar[tuple[str, ...]] = ()
    # True when data written before ``restart()`` is there after it.
    persistent: ClassVar[bool] = True
    implemented: ClassVar[bool] = True
    start_timeout: ClassVar[float] = 60.0
    stop_timeout: ClassVar[float] = 60.0
    # Environment variables that, when set, give this backend's endpoint instead of a local process.
    env_vars: ClassVar[tuple[str, ...]] = ()
    # Container image and command for the testcontainers fallback (None: no container known).
    image: ClassVar[str | None] = None
    container_command: ClassVar[str | None] = None
    container_env: ClassVar[Mapping[str, str]] = {}

    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or state_root()) / self.name
        self.pid_file = self.dir / "pid.json"
        self.log = self.dir / "broker.log"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dir={str(self.dir)!r})"

    # --- what each broker defines ---

    def url_from_env(self, variable: str, value: str) -> str:
        """The bus URL for an endpoint given in the environment (``MSGBUS_TEST_<NAME>_URL`` is taken as is)."""
        return value

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        """The bus URL of this broker at ``host``, where ``port(p)`` maps a default port to the real one."""
        raise NotImplementedError

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        """None when the broker at ``host`` serves clients, else the reason it does not (yet)."""
        raise NotImplementedError

    def executable(self) -> str | None:
        """Path of the broker program, or None when it is not installed."""
        raise NotImplementedError

    def argv(self) -> list[str]:
        """The command that runs the broker in the foreground."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Environment for the broker process."""
        return dict(os.environ)

    def prepare(self) -> None:
        """Write config files into ``self.dir`` before a start (data already there is kept)."""

    def install(self) -> None:
        """Install what is missing (Debian packages with apt-get as root)."""
        apt_install(self.apt_packages)

    # --- the common lifecycle ---

    @property
    def url(self) -> str:
        """The bus URL of the local broker (contains the well-known test credentials where there are any)."""
        return self.url_for(HOST, lambda p: p)

    def ready(self) -> str | None:
        """None when the local broker serves clients, else the reason it does not."""
        return self.probe_for(HOST, lambda p: p)

    def installed(self) -> bool:
        """True when the broker program is on this machine."""
        return self.executable() is not None

    def running(self) -> PidRecord | None:
        """The broker process we started, while it is alive; None otherwise."""
        record = read_pid(self.pid_file)
        return record if record is not None and record.alive() else None

    def start(self, *, install: bool = True) -> bool:
        """Start the broker unless it already runs, and wait until it is ready.

        Returns True when this call started it, False when it was already up. ``install=False`` raises
        instead of installing a missing broker. Raises LauncherError when a port is taken by a process we
        did not start, or the broker does not become ready within ``start_timeout``.
        """
        with locked(self.dir / "lock"):
            return self._start_locked(install=install)

    def _start_locked(self, *, install: bool) -> bool:
        record = self.running()
        if record is not None:
            self._wait_ready(record)
            progress(f"{self.name}: already running (pid {record.pid}) on {HOST}:{self.port}")
            return False
        if not self.installed():
            if not install:
                raise LauncherError(f"{self.name} is not installed (packages: {' '.join(self.apt_packages)})")
            self.install()
            if not self.installed():
                raise LauncherError(f"{self.name}: installed {self.apt_packages} but found no executable")
        self._check_ports_free()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        began = time.monotonic()
        progress(f"{self.name}: starting on {HOST}:{self.port} (state {self.dir})")
        record = spawn(self.argv(), env=self.environment(), cwd=self.dir, log=self.log, pid_file=self.pid_file)
        try:
            self._wait_ready(record)
        except LauncherError:
            terminate(record, timeout=5, hard=True)
            self.pid_file.unlink(missing_ok=True)
            raise
        progress(f"{self.name}: ready in {time.monotonic() - began:.1f}s (pid {record.pid})")
        return True

    def stop(self, *, hard: bool = False) -> bool:
        """Stop the broker we started: gracefully (SIGTERM), or ``hard=True`` with SIGKILL like a crash.

        Returns True when a process was stopped. A PID file whose process is gone or is not the one we
        started is removed and nothing is signalled. Blocks until the process group has exited.
        """
        with locked(self.dir / "lock"):
            self._auto_stop.unlink(missing_ok=True)
            return self._stop_locked(hard=hard)

    def _stop_locked(self, *, hard: bool) -> bool:
        record = read_pid(self.pid_file)
        if record is None or not record.alive():
            self.pid_file.unlink(missing_ok=True)
            return False
        began = time.monotonic()
        progress(f"{self.name}: stopping pid {record.pid}{' (SIGKILL)' if hard else ''}")
        terminate(record, timeout=self.stop_timeout, hard=hard)
        self.pid_file.unlink(missing_ok=True)
        progress(f"{self.name}: stopped in {time.monotonic() - began:.1f}s")
        return True

    # --- sharing one broker between concurrent test runs ---

    @property
    def _auto_stop(self) -> Path:
        # Present while the broker was started by a test run (not by `start` on the CLI): the last test
        # run to let go of it stops it.
        return self.dir / "auto-stop"

    def lease(self, *, started: bool) -> None:
        """Record that this process uses the broker; ``started``: this process started it for its tests."""
        with locked(self.dir / "lock"):
            leases = self.dir / "leases"
            leases.mkdir(exist_ok=True)
            (leases / str(os.getpid())).write_text(str(start_time(os.getpid())))
            if started:
                self._auto_stop.touch()

    def unlease(self) -> bool:
        """Drop this process's lease; stop the broker when a test run started it and no other live process
        holds a lease on it. Returns True when it stopped the broker."""
        with locked(self.dir / "lock"):
            others = 0
            for lease in (self.dir / "leases").glob("*"):
                pid = int(lease.name)
                if pid == os.getpid() or str(start_time(pid)) != lease.read_text(errors="replace"):
                    lease.unlink(missing_ok=True)
                else:
                    others += 1
            if others or not self._auto_stop.exists():
                return False
            return self._stop_locked(hard=False)

    def keep(self) -> None:
        """Keep the broker running after the test runs using it end (what ``start`` on the CLI asks for)."""
        self._auto_stop.unlink(missing_ok=True)

    def restart(self, *, hard: bool = False) -> None:
        """Stop the broker (``hard=True``: kill it) and start it again on the same data; blocks until ready."""
        # One lock across stop and start: no other process can start a broker on the ports in between.
        with locked(self.dir / "lock"):
            self._stop_locked(hard=hard)
            self._start_locked(install=False)

    def status(self) -> str:
        """One line: running or not, ready or why not, where its state lives."""
        record = self.running()
        if record is None:
            return f"{self.name}: stopped (state {self.dir})"
        reason = self.ready()
        return f"{self.name}: running pid {record.pid} on {HOST}:{self.port}, {reason or 'ready'} (state {self.dir})"

    def _wait_ready(self, record: PidRecord) -> None:
        try:
            wait_until(self.ready, record=record, timeout=self.start_timeout, log=self.log, what=self.name)
        except RuntimeError as exc:
            raise LauncherError(str(exc)) from exc

    def _check_ports_free(self) -> None:
        # A port can stay bound for a moment after the previous process exited; wait a little, then blame.
        deadline = time.monotonic() + 2
        for port in (self.port, *self.extra_ports):
            while not port_bindable(port, HOST) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not port_bindable(port, HOST):
                env = f"MSGBUS_TEST_{self.name.upper()}_URL"
                raise LauncherError(
                    f"{self.name}: port {HOST}:{port} is taken by a process integration/brokers did not start; "
                    f"stop it, or point the tests at it with {env}"
                )


class PlannedBroker(LocalBroker):
    """A backend whose local launcher is planned but not written: every action says so."""

    implemented = False
    plan: ClassVar[str]

    def executable(self) -> str | None:
        return None

    def install(self) -> None:
        raise NotImplementedLauncher(self._todo())

    def start(self, *, install: bool = True) -> bool:
        raise NotImplementedLauncher(self._todo())

    def stop(self, *, hard: bool = False) -> bool:
        return False

    def restart(self, *, hard: bool = False) -> None:
        raise NotImplementedLauncher(self._todo())

    def status(self) -> str:
        return f"{self.name}: {self._todo()}"

    def _todo(self) -> str:
        env = " or ".join((f"MSGBUS_TEST_{self.name.upper()}_URL", *self.env_vars))
        return f"local {self.name} launcher not implemented yet ({self.plan}); set {env} to use a running broker"


LAUNCHERS: dict[str, type[LocalBroker]] = {}
_B = TypeVar("_B", bound=type[LocalBroker])


def register(cls: _B) -> _B:
    """Class decorator: make the launcher available under its backend ``name``."""
    LAUNCHERS[cls.name] = cls
    return cls


def _which(program: str) -> str | None:
    return shutil.which(program, path=_SEARCH_PATH)


@register
class RabbitMQ(LocalBroker):
    """RabbitMQ from the Debian package, as its own Erlang node with its own cookie, plugins disabled."""

    name = "rabbitmq"
    port = 5672
    dist_port = 25672
    extra_ports = (dist_port,)
    apt_packages = ("rabbitmq-server",)
    start_timeout = 120.0
    node = "msgbus-test@localhost"
    image = "rabbitmq:3.13-alpine"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"amqp://guest:guest@{host}:{port(self.port)}/"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probes.amqp(self.url_for(host, port), host, port(self.port))

    def executable(self) -> str | None:
        # The Debian /usr/sbin wrapper switches to the rabbitmq user and its HOME; run the real script.
        path = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        return str(path) if path.exists() else None

    def argv(self) -> list[str]:
        return [str(self.executable())]

    def prepare(self) -> None:
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex().upper())
            cookie.chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# intentionally empty: settings come from the environment\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.port}\n"
            # A modest memory alarm: publishers are blocked above 512 MiB instead of 40% of the machine.
            "vm_memory_high_watermark.absolute = 512MiB\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        d = self.dir
        env.update(
            HOME=str(d / "home"),
            ERL_EPMD_ADDRESS=HOST,
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins-expand"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbitmq.pid"),
            # Erlang's schedulers spin while idle by default; on a shared 2-core machine that costs a core.
            # The distribution listener binds to loopback only, like everything else.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        )
        return env


@register
class Redis(LocalBroker):
    """redis-server with an append-only file fsynced on every write: acknowledged writes survive even a kill."""

    name = "redis"
    port = 6379
    apt_packages = ("redis-server",)
    image = "redis:7-alpine"
    container_command = "redis-server --appendonly yes --appendfsync always"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"redis://{host}:{port(self.port)}/0"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probes.redis_ping(host, port(self.port))

    def executable(self) -> str | None:
        return _which("redis-server")

    def argv(self) -> list[str]:
        return [str(self.executable()), str(self.dir / "redis.conf")]

    def prepare(self) -> None:
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        (self.dir / "redis.conf").write_text(
            f"bind {HOST}\n"
            f"port {self.port}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'logfile ""\n'
            f'dir "{data}"\n'
            # Durability over speed: the contract's "durable send" and "reconnect loses nothing acked"
            # promises are tested by killing the broker, so every write is fsynced before Redis answers.
            "appendonly yes\n"
            "appendfsync always\n"
            'save ""\n'
        )


@register
class NATS(LocalBroker):
    """nats-server with JetStream storing to the state dir; monitoring (health checks) on 8222."""

    name = "nats"
    port = 4222
    monitor_port = 8222
    extra_ports = (monitor_port,)
    apt_packages = ("nats-server",)
    image = "nats:2.10-alpine"
    container_command = "-js -sd /data -m 8222"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"nats://{host}:{port(self.port)}"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probes.nats_jetstream(host, port(self.port), port(self.monitor_port))

    def executable(self) -> str | None:
        return _which("nats-server")

    def argv(self) -> list[str]:
        # A fixed server name keeps JetStream's identity, hence its streams, across restarts.
        return [
            str(self.executable()),
            *("-a", HOST, "-p", str(self.port), "-m", str(self.monitor_port), "-n", "msgbus-test"),
            *("-js", "-sd", str(self.dir / "jetstream")),
        ]


@register
class Moto(LocalBroker):
    """moto's server (SQS and SNS) from PyPI, run by this interpreter through ``integration/_moto.py``.

    That wrapper serialises requests (moto's backends are not thread-safe), snapshots the state and journals
    every message change before replying, so ``restart()``, even ``restart(hard=True)`` (a kill), keeps
    queues, subscriptions and messages.
    """

    name = "sqs"
    port = 4566
    start_timeout = 60.0
    env_vars = ("AWS_ENDPOINT_URL_SQS",)
    image = "motoserver/moto:latest"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"sqs://us-east-1?endpoint_url=http://{host}:{port(self.port)}"

    def url_from_env(self, variable: str, value: str) -> str:
        if variable == "AWS_ENDPOINT_URL_SQS":
            return f"sqs://{os.environ.get('AWS_DEFAULT_REGION', 'us-east-1')}?endpoint_url={value}"
        return value

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probes.http_ok(f"http://{host}:{port(self.port)}/moto-api/")

    def executable(self) -> str | None:
        # moto's server needs its [server] extra (flask, flask-cors) besides moto itself.
        return sys.executable if importable("moto.server") and importable("flask_cors") else None

    def install(self) -> None:
        pip_install("flask_cors", "moto[server]")

    def argv(self) -> list[str]:
        state = str(self.dir / "moto-state.pickle")
        return [sys.executable, "-m", "integration._moto", "-H", HOST, "-p", str(self.port), "--state", state]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # integration._moto must be importable whatever the working directory (the state dir).
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env


# Apache Kafka (KRaft, jars from Maven Central): implemented in its own module, which needs LocalBroker above.
from ._kafka import Kafka, ProxiedKafka  # noqa: E402

register(Kafka)
register(ProxiedKafka)


# Google's pstest Pub/Sub fake wrapped in a small Go program (integration/pstest/), built by go on first start.
from ._pubsub import PubSubBroker as PubSub  # noqa: E402 - it subclasses LocalBroker, defined above

register(PubSub)


# The Service Bus test broker and Toxiproxy (the failure suite's fault-injecting proxy) launchers live in their
# own modules, which register themselves.
# The failure suite's clusters (3 RabbitMQ nodes, 3 Kafka brokers), built from the launchers above.
from . import (  # noqa: E402, F401
    _clusters,
    _servicebus,
    _toxiproxy,
)

# PostgreSQL (the Debian package, its own initdb cluster) in its own module, which needs LocalBroker above.
from ._postgresql import PostgreSQL  # noqa: E402

register(PostgreSQL)
