"""Faults on the wire and broker failover, under load, on every backend (promise 14). See docs/reliability.md.

Each test streams messages from paced senders to a consumer through Toxiproxy while one fault strikes (see
``integration/_chaos.py``) and fails on a lost message or a hang; duplicates are counted and reported. A new
backend joins by adding a row to ``ROWS``: the launcher that provides its broker, the URL options it runs
with, how long its client takes to notice a dead connection, and the bounds it promises.

``MSGBUS_CHAOS_MESSAGES`` sets the volume per scenario (default 2000; ``make test`` runs fewer, ``make chaos``
the default). ``MSGBUS_CHAOS_RESULTS`` names a folder where each outcome is appended as JSON lines, from which
``tools/reliability_report.py`` renders docs/reliability.md. Against your own broker:
``MSGBUS_TEST_RABBITMQ_URL=amqp://... make chaos CHAOS_ROWS=rabbitmq`` runs the wire faults through a local
Toxiproxy in front of it (restart scenarios need a broker this suite started, so they skip).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

import msgbus
from integration._chaos import AT_DEFAULTS, DOWN, Outcome, Target, run_scenario, scenarios
from integration._clusters import KafkaCluster, RabbitMQCluster, kill_and_return
from integration._launchers import HOST
from integration._toxiproxy import Toxiproxy, proxy_port
from integration.brokers import Endpoint, endpoint, get

Failover = tuple[str, Callable[[str], Awaitable[None]] | None, Callable[[str], Awaitable[str]]]


def _rabbitmq_cluster(ep: Endpoint) -> Failover:
    """Queue declared through node 1 (so node 1 leads it), clients on node 2; node 1 is killed mid-stream."""
    cluster = ep.handle
    assert isinstance(cluster, RabbitMQCluster)

    async def prepare(queue: str) -> None:
        async with msgbus.connect(cluster.url_of(1)) as bus:
            await bus.consumer(queue).open()

    async def failover(queue: str) -> str:
        leader = await asyncio.to_thread(cluster.leader, queue)
        _, back = await kill_and_return(cluster, leader, down=DOWN)
        now = await asyncio.to_thread(cluster.leader, queue)
        return (
            f"node {leader} (the quorum queue's leader) SIGKILLed, down {DOWN:.0f} s, then back ({back:.1f}s); "
            f"the queue's leader is now node {now}; clients connected to node 2"
        )

    return cluster.url_of(2), prepare, failover


def _kafka_cluster(ep: Endpoint) -> Failover:
    """The broker leading partition 0 of the queue's topic is killed mid-stream; clients know all three."""
    cluster = ep.handle
    assert isinstance(cluster, KafkaCluster)

    async def failover(topic: str) -> str:
        leader = await cluster.leader(topic)
        _, back = await kill_and_return(cluster, leader, down=DOWN)
        now = await cluster.leader(topic)
        return (
            f"broker {leader} (leader of partition 0) SIGKILLed, down {DOWN:.0f} s, then back ({back:.1f}s); "
            f"partition 0 is now led by broker {now}"
        )

    return ep.url, None, failover


@dataclass(frozen=True)
class Row:
    """One backend of the failure suite.

    ``blackhole``: seconds the blackhole lasts, longer than the client's dead-connection detection with
    ``options``. ``send_bound``: seconds one send may take in any fault before it counts as a hang (the
    adapter's send timeout, retries included, plus slack). ``recover_bound``: seconds after a fault healed by
    which everything sent must be delivered. ``limits``: scenario -> why a test double cannot honour it.
    """

    backend: str
    launcher: str
    options: str
    blackhole: float
    send_bound: float
    recover_bound: float
    limits: dict[str, str] = field(default_factory=dict)
    # The same backend with no timeout shortened (``options``: only what it needs to connect at all), for the
    # "blackhole-defaults" scenario: what a user running msgbus's defaults sees. None: the row's own
    # blackhole already runs at the defaults, or the row has no blackhole (clusters).
    defaults: Row | None = None
    # Clusters: the URL, prepare(queue) and failover(queue) hooks for the failover scenario, from the endpoint.
    failover: Callable[[Endpoint], Failover] | None = None

    def url(self, ep: Endpoint, proxied: dict[str, str]) -> str:
        """``ep``'s URL pointed at the proxies (``proxied``: broker host:port -> proxy host:port), with options."""
        url = ep.url
        for address, proxy in proxied.items():
            url = re.sub(rf"(?<=[@/=]){re.escape(address)}\b", proxy, url)
        return url + ("&" if "?" in url else "?") + self.options if self.options else url


_MOTO_KEYS = "access_key_id=testing&secret_access_key=testing"  # moto signs any credentials

ROWS = [
    # Single nodes, every scenario but failover, at msgbus's defaults except the timeout that notices a dead
    # connection, shortened so the blackhole (which must outlast it) takes seconds, not minutes; the scenario
    # "blackhole-defaults" runs it again with no option shortened ("defaults", its blackhole as long as the
    # defaults need).
    # heartbeat=4 (default 60): pika and aiormq drop a connection after 2-3 missed heartbeats. send_timeout=5
    # (default 30): sends caught in the blackhole raise, so the suite's retry with the same message id is used.
    # At the defaults aiormq gives up on a silent connection after 3 x (60 + 1) s, pika after 65-130 s.
    Row(
        "rabbitmq",
        "rabbitmq",
        "heartbeat=4&send_timeout=5",
        blackhole=12,
        send_bound=20,
        recover_bound=60,
        defaults=Row("rabbitmq", "rabbitmq", "", blackhole=200, send_bound=60, recover_bound=120),
    ),
    # socket_timeout=5 (default 10) bounds every command, the blocking read included.
    Row(
        "redis",
        "redis",
        "socket_timeout=5",
        blackhole=8,
        send_bound=30,
        recover_bound=60,
        defaults=Row("redis", "redis", "", blackhole=20, send_bound=45, recover_bound=60),
    ),
    # Its own single-node Kafka whose listener is advertised at the proxy (bootstrap hands out addresses).
    # request_timeout=10 (default 40) bounds a request lost in the blackhole; the group session is 10 s.
    Row(
        "kafka",
        "kafka-proxied",
        "request_timeout=10",
        blackhole=12,
        send_bound=45,
        recover_bound=90,
        defaults=Row("kafka", "kafka-proxied", "", blackhole=50, send_bound=120, recover_bound=120),
    ),
    # moto: any credentials sign. read_timeout=5 (default 30) bounds a request lost in the blackhole; a long
    # poll must be shorter (wait_time=1, default 20). A message whose receive was lost comes back after its
    # visibility timeout (30 s by default).
    Row(
        "sqs",
        "sqs",
        f"{_MOTO_KEYS}&wait_time=1&read_timeout=5",
        blackhole=8,
        send_bound=45,
        recover_bound=60,
        defaults=Row("sqs", "sqs", _MOTO_KEYS, blackhole=40, send_bound=120, recover_bound=120),
    ),
    # A pull's deadline is the receive's wait plus pull_timeout (2 s); a publish retries for 60 s. Messages in a
    # pull response lost on the wire come back when their ack deadline lapses: ack_deadline=10 (default 60; at
    # the default, reset and blackhole each waited 51 s for them).
    Row(
        "pubsub",
        "pubsub",
        "ack_deadline=10",
        blackhole=8,
        send_bound=75,
        recover_bound=90,
        defaults=Row("pubsub", "pubsub", "", blackhole=8, send_bound=75, recover_bound=120),
    ),
    # Defaults: the SDK retries an operation retry_total (3) times.
    Row("servicebus", "servicebus", "", blackhole=10, send_bound=75, recover_bound=90),
    # Defaults: nats-py pings every ping_interval (5 s) and drops a connection after 3 unanswered pings.
    Row("nats", "nats", "", blackhole=20, send_bound=45, recover_bound=60),
    # command_timeout=5 (default 30) drops a connection whose statement went unanswered; the listener is pinged
    # every keepalive_interval (5 s). Rows leased by a reply lost in the blackhole return after the lease (30 s).
    Row(
        "postgresql",
        "postgresql",
        "command_timeout=5",
        blackhole=10,
        send_bound=45,
        recover_bound=60,
        defaults=Row("postgresql", "postgresql", "", blackhole=40, send_bound=90, recover_bound=120),
    ),
    # Clusters: only the failover scenario, at msgbus's defaults, which are the safe settings: quorum queues and
    # publisher confirms; Kafka topics with 3 copies and min.insync.replicas=2 on a cluster of 3, acks=all.
    Row("rabbitmq-cluster", "rabbitmq-cluster", "", 0, 45, 90, failover=_rabbitmq_cluster),
    Row("kafka-cluster", "kafka-cluster", "", 0, 45, 90, failover=_kafka_cluster),
]

# After a dropped connection the azure-servicebus SDK leaves sockets and transports to the GC (see
# test_contract_servicebus.py): their warnings are ignored for its rows only.
_SDK_LEFTOVERS = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning"),
]


# nats-py gives up a reconnect attempt to a silent or restarting server without closing its socket, leaving
# the StreamWriter to the GC (see adapters/nats/tests/test_adapter.py): ignored for its row only.
_NATS_LEFTOVERS = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <function StreamWriter.__del__:pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning"),
]
_LEFTOVERS = {"servicebus": _SDK_LEFTOVERS, "nats": _NATS_LEFTOVERS}


def _rows() -> list[object]:
    return [pytest.param(r, id=r.backend, marks=_LEFTOVERS.get(r.launcher, ())) for r in ROWS]


_CLIENTS = {
    "rabbitmq": ("aio-pika", "pika"),
    "redis": ("redis",),
    "kafka": ("aiokafka",),
    "sqs": ("aiobotocore",),
    "pubsub": ("google-cloud-pubsub",),
    "servicebus": ("azure-servicebus",),
    "nats": ("nats-py",),
    "postgresql": ("asyncpg",),
}


def _go_module(folder: str, module: str) -> str:
    found = re.search(rf"{re.escape(module)} (v[\w.\-]+)", (Path(__file__).parent / folder / "go.mod").read_text())
    return found.group(1) if found else "?"


def _broker_version(backend: str) -> str:
    """What the row ran against, read from the machine and the repo's pins (for docs/reliability.md)."""
    import subprocess

    from integration._kafka import kafka_version

    kind = backend.split("-")[0]
    if kind == "rabbitmq":
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True, text=True)
        return f"RabbitMQ {out.stdout.split('-')[0] or '?'}" + (" x 3 nodes, quorum queues" if "-" in backend else "")
    if kind == "redis":
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        found = re.search(r"v=([\d.]+)", out.stdout)
        return f"Redis {found.group(1) if found else '?'} (AOF, fsync always)"
    if kind == "kafka":
        return f"Apache Kafka {kafka_version()} KRaft" + (" x 3 brokers, RF 3, min ISR 2" if "-" in backend else "")
    if kind == "sqs":
        return f"moto {importlib.metadata.version('moto')} (SQS double)"
    if kind == "pubsub":
        return f"pstest {_go_module('pstest', 'cloud.google.com/go/pubsub/v2')} + journal (Pub/Sub double)"
    if kind == "nats":
        out = subprocess.run(["nats-server", "--version"], capture_output=True, text=True)
        found = re.search(r"v([\d.]+)", out.stdout)
        return f"NATS Server {found.group(1) if found else '?'} (JetStream, file store)"
    if kind == "postgresql":
        server = get("postgresql").executable()
        out = subprocess.run([server or "postgres", "--version"], capture_output=True, text=True)
        found = re.search(r"\) ([\d.]+)", out.stdout)
        return f"PostgreSQL {found.group(1) if found else '?'} (fsync on)"
    return "sbbroker (msgbus's Service Bus double) + journal"


def _row_info(row: Row) -> dict[str, object]:
    clients = _CLIENTS.get(row.backend.split("-")[0], ())
    return {
        "broker": _broker_version(row.backend),
        "clients": ", ".join(f"{c} {importlib.metadata.version(c)}" for c in clients),
        "blackhole": row.blackhole,
        "send_bound": row.send_bound,
        "recover_bound": row.recover_bound,
        "toxiproxy": _go_module("toxiproxy", "github.com/Shopify/toxiproxy/v2"),
    }


def _volume() -> int:
    return int(os.environ.get("MSGBUS_CHAOS_MESSAGES", "2000"))


def _record(outcome: Outcome, row: Row, ep: Endpoint) -> None:
    folder = os.environ.get("MSGBUS_CHAOS_RESULTS")
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    line = {
        **asdict(outcome),
        "options": row.options,
        "source": ep.source,
        "at": time.time(),
        "messages": _volume(),
        "row": _row_info(row),
    }
    with (path / f"{row.backend}.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def _target(row: Row, ep: Endpoint) -> tuple[Target, dict[str, str]]:
    """A proxy in Toxiproxy for each address of ``ep``'s broker; the restart hook when we started the broker."""
    endpoint("toxiproxy")
    api = Toxiproxy()
    proxied: dict[str, str] = {}
    for host, port in _upstreams(row, ep):
        api.create(f"{row.backend}-{port}", proxy_port(port), f"{host}:{port}")
        proxied[f"{host}:{port}"] = f"{HOST}:{proxy_port(port)}"
    restart: Callable[[bool], None] | None = None
    if ep.handle is not None:
        restart = lambda hard: ep.restart(hard=hard)  # noqa: E731
    return Target(api, tuple(f"{row.backend}-{a.rsplit(':', 1)[1]}" for a in proxied), restart), proxied


def _upstreams(row: Row, ep: Endpoint) -> list[tuple[str, int]]:
    """Where the clients would connect: the local broker's port, or the host:port in a URL from the env."""
    if ep.source == "local":
        return [(HOST, get(row.launcher).port)]
    found = re.search(r"(?:@|//|=)([\w.\-]+):(\d+)", ep.url)
    if found is None:
        pytest.skip(f"no host:port to put a proxy in front of in {ep!r}")
    return [(found.group(1), int(found.group(2)))]


_SCENARIOS = [s.name for s in scenarios(0)]


@pytest.mark.parametrize("scenario", _SCENARIOS)
@pytest.mark.parametrize("row", _rows())
async def test_fault(row: Row, scenario: str, record_property: pytest.RecordProperty) -> None:
    wanted = os.environ.get("CHAOS_ROWS")
    if wanted and row.backend not in wanted.split(","):
        pytest.skip(f"CHAOS_ROWS={wanted}")
    if scenario == AT_DEFAULTS:
        if row.defaults is None:
            pytest.skip(
                "no blackhole (clusters run the failover scenario only)"
                if row.failover is not None
                else "this row's blackhole already runs at msgbus's defaults"
            )
        row = row.defaults
    spec = next(s for s in scenarios(row.blackhole) if s.name == scenario)
    if (spec.needs == "failover") != (row.failover is not None):
        pytest.skip(
            "failover: a single node has no leader to fail over from (see the cluster rows)"
            if row.failover is None
            else "clusters run the failover scenario only (the wire faults run on the single-node rows)"
        )
    ep = endpoint(row.launcher)
    if spec.needs != "proxy" and ep.handle is None:
        pytest.skip(f"{scenario}: the broker came from the environment, this suite cannot restart or kill it")
    if row.failover is not None:
        cluster_url, prepare, failover = row.failover(ep)
        target = Target(Toxiproxy(), (), failover=failover, prepare=prepare)
        url = f"{cluster_url}{'&' if '?' in cluster_url else '?'}{row.options}"
    else:
        target, proxied = _target(row, ep)
        url = row.url(ep, proxied)
    outcome = await run_scenario(
        row.backend,
        url,
        spec,
        target,
        messages=_volume(),
        send_bound=row.send_bound,
        recover_bound=row.recover_bound,
        limit=row.limits.get(scenario),
    )
    _record(outcome, row, ep)
    record_property("chaos", outcome.line())
    print(outcome.line())
    if outcome.status == "limit":
        pytest.xfail(outcome.line())
    assert outcome.status == "pass", outcome.line()
