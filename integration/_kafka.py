"""Apache Kafka for the integration tests: a single KRaft node (broker + controller) run from Maven jars.

No tarball and no Docker: ``integration/kafka/pom.xml`` names ``org.apache.kafka:kafka_2.13``; the first
start resolves it and its dependencies from Maven Central with ``mvn dependency:copy-dependencies`` into
``integration/.cache/kafka/<version>/lib`` (``$MSGBUS_TEST_CACHE_DIR`` overrides the root), formats KRaft
storage once with ``kafka.tools.StorageTool``, and runs ``kafka.Kafka`` with ``java``. Data and config live
in the broker's state dir, so ``restart()`` (even after SIGKILL) keeps every acknowledged record.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import re
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from ._install import InstallError, apt_install, cache_root
from ._launchers import HOST, LauncherError, LocalBroker
from ._process import progress

_HERE = Path(__file__).resolve().parent
POM = _HERE / "kafka" / "pom.xml"
_TIMEOUT = 5.0


def kafka_version() -> str:
    """The Kafka version the pom pins (its ``kafka.version`` property)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if found is None:
        raise LauncherError(f"{POM} has no <kafka.version> property")
    return found.group(1).strip()


class Kafka(LocalBroker):
    """Apache Kafka in KRaft mode (no ZooKeeper), its jars from Maven Central through a pom in integration/.

    One JVM plays broker and controller on 127.0.0.1 (client port 9092, controller port 9093) with a small
    heap and few threads: the CI machine has two shared cores. Topics are not auto-created (the adapter
    creates them, and ``topology=verify`` must be able to see a missing one).
    """

    name = "kafka"
    port = 9092
    controller_port = 9093
    extra_ports = (controller_port,)
    apt_packages = ("openjdk-17-jre-headless", "maven")
    start_timeout = 120.0
    # No generic container: Kafka advertises its listener address, which the generic container fallback's
    # remapped host ports break. See docs/adapters/kafka.md (testcontainers' KafkaContainer handles it).
    image: ClassVar[str | None] = None
    heap: ClassVar[str] = "512m"

    @property
    def lib(self) -> Path:
        """The folder of resolved jars for the pinned version."""
        return cache_root() / "kafka" / kafka_version() / "lib"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"kafka://{host}:{port(self.port)}"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return probe(host, port(self.port))

    def executable(self) -> str | None:
        java = shutil.which("java")
        return java if java is not None and (self.lib / ".complete").exists() else None

    def install(self) -> None:
        """Install a JRE and Maven when missing, then resolve the broker's jars from Maven Central."""
        missing = [p for p, tool in zip(self.apt_packages, ("java", "mvn"), strict=True) if shutil.which(tool) is None]
        apt_install(missing)
        self.resolve_jars()

    def resolve_jars(self) -> None:
        """``mvn dependency:copy-dependencies`` into ``self.lib``; a marker file says it completed."""
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InstallError("kafka: `mvn` not found (apt-get install maven)")
        if self.lib.exists():
            shutil.rmtree(self.lib)
        self.lib.mkdir(parents=True)
        progress(f"kafka: resolving Apache Kafka {kafka_version()} jars from Maven Central into {self.lib}")
        argv = [
            mvn,
            *("-B", "-q", "-f", str(POM), "dependency:copy-dependencies"),
            f"-DoutputDirectory={self.lib}",
            "-DincludeScope=runtime",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise InstallError(f"kafka: `{' '.join(argv)}` failed with exit code {done.returncode}:\n{output}")
        (self.lib / ".complete").write_text(kafka_version())

    def _java(self, main: str, *args: str, heap: str) -> list[str]:
        return [
            str(shutil.which("java")),
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",  # one GC thread: the machine is shared
            "-XX:CICompilerCount=2",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            str(self.lib / "*"),
            main,
            *args,
        ]

    def argv(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.dir / "server.properties"), heap=self.heap)

    def node_config(self) -> str:
        """The lines that place this node: its id, the controller quorum, its listeners, replication defaults."""
        return (
            "node.id=1\n"
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}\n"
            f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}\n"
            f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}\n"
            "inter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n" + replication(1, 1)
        )

    def prepare(self) -> None:
        data = self.dir / "data"
        (self.dir / "server.properties").write_text(
            "process.roles=broker,controller\n" + self.node_config() + "controller.listener.names=CONTROLLER\n"
            f"log.dirs={data}\n"
            "auto.create.topics.enable=false\n"
            "num.partitions=1\n"
            "offsets.topic.num.partitions=8\n"
            # Groups form at once, and tests may use short sessions so a killed consumer is noticed quickly.
            "group.initial.rebalance.delay.ms=0\n"
            "group.min.session.timeout.ms=1000\n"
            # Few threads: two shared cores.
            "num.network.threads=2\n"
            "num.io.threads=2\n"
            "background.threads=2\n"
            "num.recovery.threads.per.data.dir=1\n"
            "num.replica.fetchers=1\n"
            "log.cleaner.threads=1\n"
        )
        (self.dir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = out\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = warn\n"
            "rootLogger.appenderRef.out.ref = out\n"
            # One line that says the broker is up, for the log a failed start shows.
            "logger.server.name = kafka.server.KafkaRaftServer\n"
            "logger.server.level = info\n"
        )
        if not (data / "meta.properties").exists():
            self._format(data)

    def cluster_id(self) -> str:
        """The id storage is formatted with: a new one (a cluster's nodes share theirs)."""
        return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")

    def _format(self, data: Path) -> None:
        """Format KRaft storage once (``kafka-storage.sh format``): a new cluster id, this node as voter."""
        if data.exists():
            shutil.rmtree(data)
        cluster_id = self.cluster_id()
        argv = self._java(
            "kafka.tools.StorageTool",
            # "--cluster-id=ID": a base64url id may start with "-", which argparse would read as an option.
            *("format", f"--cluster-id={cluster_id}", "-c", str(self.dir / "server.properties")),
            heap="256m",
        )
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=self.dir)
        if done.returncode != 0:
            raise LauncherError(f"kafka: formatting storage failed:\n{(done.stdout + done.stderr)[-2000:]}")


def replication(factor: int, min_isr: int) -> str:
    """Broker defaults for new topics and the internal ones: ``factor`` copies, ``min_isr`` in sync to write."""
    return (
        f"default.replication.factor={factor}\n"
        f"min.insync.replicas={min_isr}\n"
        f"offsets.topic.replication.factor={factor}\n"
        f"transaction.state.log.replication.factor={factor}\n"
        f"transaction.state.log.min.isr={min_isr}\n"
        f"share.coordinator.state.topic.replication.factor={factor}\n"
        f"share.coordinator.state.topic.min.isr={min_isr}\n"
    )


class ProxiedKafka(Kafka):
    """A second single-node Kafka for the failure suite, whose client listener is advertised at Toxiproxy's port.

    A Kafka client bootstraps, then connects to the addresses the metadata advertises; to keep every byte
    going through the proxy, the EXTERNAL listener (19092, where the proxy forwards) advertises the proxy's
    port (30092). The INTERNAL listener (19094) advertises itself, for the broker and the readiness probe.
    """

    name = "kafka-proxied"
    port = 19092
    controller_port = 19093
    internal_port: ClassVar[int] = 19094
    extra_ports = (controller_port, internal_port)
    heap = "384m"

    def node_config(self) -> str:
        from ._toxiproxy import proxy_port

        return (
            "node.id=1\n"
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}\n"
            f"listeners=EXTERNAL://{HOST}:{self.port},INTERNAL://{HOST}:{self.internal_port},"
            f"CONTROLLER://{HOST}:{self.controller_port}\n"
            f"advertised.listeners=EXTERNAL://{HOST}:{proxy_port(self.port)},INTERNAL://{HOST}:{self.internal_port}\n"
            "inter.broker.listener.name=INTERNAL\n"
            "listener.security.protocol.map=EXTERNAL:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            + replication(1, 1)
        )

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return probe(host, port(self.internal_port))


def probe(host: str, port: int) -> str | None:
    """Ready when a client gets cluster metadata and the group coordinator answers (aiokafka), else on
    an ApiVersions answer (stdlib, before aiokafka is installed). None when ready, else the reason."""
    if importlib.util.find_spec("aiokafka") is None:
        return _api_versions(host, port)

    async def check() -> None:
        from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

        admin = AIOKafkaAdminClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=int(_TIMEOUT * 1000))
        await asyncio.wait_for(admin.start(), _TIMEOUT)
        try:
            await asyncio.wait_for(admin.describe_cluster(), _TIMEOUT)
            # Consumer groups need __consumer_offsets; its coordinator answering means groups work.
            await asyncio.wait_for(admin.find_coordinator("msgbus-readiness-probe"), _TIMEOUT)
        finally:
            await admin.close()

    # aiokafka logs every refused connection while the broker boots; the reason we return says it once.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    # A fresh thread owns its own event loop, so this works even when called from async test code.
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, check()).result()
    except Exception as exc:  # any failure means "not ready yet", with the reason
        return f"Kafka metadata/coordinator request failed: {type(exc).__name__}: {exc}"
    finally:
        quiet.setLevel(level)
    return None


def _api_versions(host: str, port: int) -> str | None:
    """Send an ApiVersions v0 request and expect a response with error code 0."""
    client = b"msgbus-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = sock.recv(10)
    except OSError as exc:
        return f"Kafka ApiVersions failed: {exc}"
    if len(head) < 10:
        return "Kafka closed the connection during ApiVersions"
    _size, correlation, error = struct.unpack(">iih", head)
    return None if (correlation, error) == (7, 0) else f"Kafka ApiVersions answered error {error}"
