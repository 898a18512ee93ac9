"""Clustered brokers for the failure suite's failover scenario: 3 RabbitMQ nodes, 3 Apache Kafka KRaft brokers.

Each node is a ``LocalBroker`` of its own (folder, PID file and ports under ``<state>/<cluster>/nodeN``); the
cluster is a ``LocalBroker`` whose start, stop and restart act on every node, so ``integration/brokers.py``
resolves, leases and stops a cluster like any broker, and ``node(i)`` reaches one node to kill it.

Sized for a 2-core, shared machine: Erlang schedulers do not spin (as for the single RabbitMQ), each Kafka JVM
has a 256 MiB heap and the serial GC.

- ``rabbitmq-cluster``: nodes ``msgbus-c1..3@localhost`` on 5701-5703 (distribution 25701-25703), one Erlang
  cookie, nodes 2 and 3 joined to node 1 on first start (``rabbitmqctl join_cluster``). msgbus declares quorum
  queues by default: a queue's leader is the node it was declared through, with a replica on each node.
- ``kafka-cluster``: brokers 1-3 on 9101-9103, each also a KRaft controller (quorum on 9111-9113), every topic
  and internal topic replicated 3 times with ``min.insync.replicas=2``: an ``acks=all`` write is on two brokers
  before it is acknowledged, and one broker can die without losing it or stopping writes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from ._kafka import Kafka, replication
from ._launchers import HOST, LauncherError, LocalBroker, RabbitMQ, register
from ._process import PidRecord, progress, spawn, terminate


class _Cluster(LocalBroker):
    """Three nodes started and stopped together; the cluster's own folder holds only what they share."""

    size: ClassVar[int] = 3
    start_timeout = 240.0

    def __init__(self, root: Path | None = None) -> None:
        super().__init__(root)
        self.nodes = [self.node_class(i)(self.dir) for i in range(1, self.size + 1)]

    def node_class(self, index: int) -> type[LocalBroker]:
        raise NotImplementedError

    def node(self, index: int) -> LocalBroker:
        """Node ``index`` (1-based), to stop or kill on its own."""
        return self.nodes[index - 1]

    def executable(self) -> str | None:
        return self.nodes[0].executable()

    def install(self) -> None:
        self.nodes[0].install()

    def running(self) -> PidRecord | None:
        records = [n.running() for n in self.nodes]
        return records[0] if all(records) else None

    def ready(self) -> str | None:
        for node in self.nodes:
            reason = node.ready()
            if reason is not None:
                return f"{node.name}: {reason}"
        return None

    def _stop_locked(self, *, hard: bool) -> bool:
        # The last node to stop must start first (it has the latest cluster state): stop 3, 2, 1; start 1, 2, 3.
        stopped = [node.stop(hard=hard) for node in reversed(self.nodes)]
        return any(stopped)


def _rabbit_node(index: int) -> type[RabbitMQ]:
    class Node(RabbitMQ):
        name = f"node{index}"
        port = 5700 + index
        dist_port = 25700 + index
        extra_ports = (dist_port,)
        node = f"msgbus-c{index}@localhost"

        def prepare(self) -> None:
            home = self.dir / "home"
            home.mkdir(exist_ok=True)
            cookie = home / ".erlang.cookie"
            if not cookie.exists():  # every node of the cluster has the cluster's cookie
                cookie.write_text((self.dir.parent / "cookie").read_text())
                cookie.chmod(0o400)
            super().prepare()

    Node.__name__ = Node.__qualname__ = f"RabbitMQNode{index}"
    return Node


@register
class RabbitMQCluster(_Cluster):
    """Three RabbitMQ nodes in one cluster; the bus URL names node 1 (``url_of(i)`` names another)."""

    name = "rabbitmq-cluster"
    port = 5701
    extra_ports = (5702, 5703, 25701, 25702, 25703)
    apt_packages = RabbitMQ.apt_packages

    def node_class(self, index: int) -> type[LocalBroker]:
        return _rabbit_node(index)

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"amqp://guest:guest@{host}:{port(self.port)}/"

    def url_of(self, index: int) -> str:
        return f"amqp://guest:guest@{HOST}:{5700 + index}/"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return self.ready()

    def _start_locked(self, *, install: bool) -> bool:
        if self.running() is not None and self.ready() is None:
            progress(f"{self.name}: already running on {HOST}:5701-5703")
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        cookie = self.dir / "cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex().upper())
        began = time.monotonic()
        started = [node.start(install=install) for node in self.nodes]
        joined = self.dir / "joined"
        if not joined.exists():
            for node in self.nodes[1:]:
                for args in (["stop_app"], ["join_cluster", "msgbus-c1@localhost"], ["start_app"]):
                    self.ctl(node, *args)
            joined.write_text("msgbus-c1@localhost msgbus-c2@localhost msgbus-c3@localhost\n")
        progress(f"{self.name}: 3 nodes clustered in {time.monotonic() - began:.1f}s")
        return any(started)

    def ctl(self, node: LocalBroker, *args: str) -> str:
        """``rabbitmqctl -n <node> ARGS`` with that node's environment (its cookie); returns its output."""
        assert isinstance(node, RabbitMQ)
        ctl = Path(str(node.executable())).with_name("rabbitmqctl")
        done = subprocess.run(
            [str(ctl), "-n", node.node, "-q", *args],
            env=node.environment(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise LauncherError(
                f"{self.name}: rabbitmqctl {' '.join(args)} on {node.node} failed: {done.stderr[-500:]}"
            )
        return done.stdout

    def leader(self, queue: str) -> int:
        """The node (1-3) that leads quorum queue ``queue``."""
        for node in self.nodes:
            if node.running() is None:
                continue
            for line in self.ctl(node, "list_queues", "name", "leader", "--no-table-headers").splitlines():
                name, _, leader = line.partition("\t")
                if name == queue and leader.startswith("msgbus-c"):
                    return int(leader.removeprefix("msgbus-c").split("@")[0])
            break
        raise LauncherError(f"{self.name}: no leader found for queue {queue!r}")


def _kafka_node(index: int, cluster: Path) -> type[Kafka]:
    class Node(Kafka):
        name = f"node{index}"
        port = 9100 + index
        controller_port = 9110 + index
        extra_ports = (controller_port,)
        heap = "256m"
        node_id: ClassVar[int] = index

        def node_config(self) -> str:
            voters = ",".join(f"{i}@{HOST}:{9110 + i}" for i in range(1, 4))
            return (
                f"node.id={index}\n"
                f"controller.quorum.voters={voters}\n"
                f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}\n"
                f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}\n"
                "inter.broker.listener.name=PLAINTEXT\n"
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
                + replication(3, 2)
                # A killed broker's replicas leave the ISR after this long, so writes go on with two.
                + "replica.lag.time.max.ms=10000\n"
            )

        def cluster_id(self) -> str:
            shared = cluster / "cluster-id"
            if not shared.exists():
                shared.write_text(super().cluster_id())
            return shared.read_text().strip()

    Node.__name__ = Node.__qualname__ = f"KafkaNode{index}"
    return Node


@register
class KafkaCluster(_Cluster):
    """Three Kafka brokers (each a KRaft controller too) with replication factor 3 and min.insync.replicas=2."""

    name = "kafka-cluster"
    port = 9101
    extra_ports = (9102, 9103, 9111, 9112, 9113)
    apt_packages = Kafka.apt_packages

    def node_class(self, index: int) -> type[LocalBroker]:
        return _kafka_node(index, self.dir)

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"kafka://{host}:{port(9101)}?bootstrap={host}:{port(9102)},{host}:{port(9103)}"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return self.ready()

    def _start_locked(self, *, install: bool) -> bool:
        # A KRaft quorum of three elects a leader only once two controllers run: start every node, then wait.
        if self.running() is not None and self.ready() is None:
            progress(f"{self.name}: already running on {HOST}:9101-9103")
            return False
        if not self.installed():
            if not install:
                raise LauncherError(f"{self.name}: Kafka is not installed")
            self.install()
        self.dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        records: list[tuple[LocalBroker, PidRecord]] = []
        for node in self.nodes:
            if node.running() is not None:
                continue
            node.dir.mkdir(parents=True, exist_ok=True)
            node.prepare()
            progress(f"{self.name}: starting {node.name} on {HOST}:{node.port}")
            records.append(
                (node, spawn(node.argv(), env=node.environment(), cwd=node.dir, log=node.log, pid_file=node.pid_file))
            )
        try:
            for node, record in records:
                node._wait_ready(record)
        except LauncherError:
            for node, record in records:
                terminate(record, timeout=5, hard=True)
                node.pid_file.unlink(missing_ok=True)
            raise
        progress(f"{self.name}: 3 brokers ready in {time.monotonic() - began:.1f}s")
        return bool(records)

    async def leader(self, topic: str, partition: int = 0) -> int:
        """The broker (1-3) that leads ``partition`` of ``topic``."""
        from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]

        live = [n for n in self.nodes if n.running() is not None]
        admin = AIOKafkaAdminClient(bootstrap_servers=[f"{HOST}:{n.port}" for n in live])
        await admin.start()
        try:
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        for p in described[0]["partitions"]:
            if p["partition"] == partition:
                return int(p["leader"])
        raise LauncherError(f"{self.name}: no leader for {topic}[{partition}]")


async def kill_and_return(cluster: _Cluster, index: int, *, down: float) -> tuple[float, float]:
    """SIGKILL node ``index``, leave it down ``down`` seconds, start it again; returns (kill s, restart s)."""
    node = cluster.node(index)
    began = time.monotonic()
    await asyncio.to_thread(node.stop, hard=True)
    killed = time.monotonic() - began
    await asyncio.sleep(down)
    began = time.monotonic()
    await asyncio.to_thread(node.start, install=False)
    return killed, time.monotonic() - began
