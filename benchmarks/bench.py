"""The benchmark harness: msgbus vs the raw client vs kombu and FastStream, on one broker, in one run.

    python -m benchmarks.bench rabbitmq redis memory sqlite      # full runs, results/*.json + docs/benchmarks.md
    python -m benchmarks.bench sqs pubsub servicebus              # the cloud brokers' local stand-ins
    python -m benchmarks.bench --smoke memory sqlite               # seconds: proves the harness works
    python -m benchmarks.bench --workload ordering --merge kafka   # ordered vs unordered consume, one broker

Each broker in ``BROKERS`` names its URL (``MSGBUS_TEST_<NAME>_URL`` wins) and its contenders as
``module:Class`` (a ``msgbus._bench.Contender``). Adding a broker is one entry here plus, for its raw
client, a small module in ``benchmarks/contenders/``. Workloads and counting live in ``msgbus._bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from msgbus._bench import LostMessages, Plan, bench, render_text

from .render import render

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
MSGBUS = "msgbus._bench:MsgbusContender"


@dataclass(frozen=True)
class Broker:
    """One broker: where it is and who competes on it."""

    url: str
    contenders: dict[str, str]
    # "ordering": msgbus with ordering=none vs ordering=per_key; a backend whose adapter refuses per_key (yet) is
    # listed as not measured, with the reason, so every broker keeps it and new adapters appear once they can.
    workloads: tuple[str, ...] = ("publish", "consume", "latency", "ordering")
    notes: list[str] = field(default_factory=list)
    ordering_url: str | None = None  # where the ordering workload runs, if not on ``url`` (both options alike)


BROKERS: dict[str, Broker] = {
    "rabbitmq": Broker(
        "amqp://guest:guest@127.0.0.1:5672/?queue_type=classic",
        {
            "msgbus": MSGBUS,
            "raw": "benchmarks.contenders.rabbitmq:AioPika",
            "kombu": "benchmarks.contenders.kombu_:Kombu",
            "faststream": "benchmarks.contenders.rabbitmq:FastStream",
            "aiormq": "benchmarks.contenders.rabbitmq:AiormqFloor",
        },
        notes=[
            "durable classic queues, persistent messages, publisher confirms for every contender",
            "aiormq: the asyncio AMQP protocol layer consuming with nothing on top (a floor, not a contender)",
        ],
        ordering_url="amqp://guest:guest@127.0.0.1:5672/?queue_type=quorum",
    ),
    "redis": Broker(
        "redis://127.0.0.1:6379/0",
        {
            "msgbus": MSGBUS,
            "raw": "benchmarks.contenders.redis:RedisPy",
            "kombu": "benchmarks.contenders.kombu_:Kombu",
            "faststream": "benchmarks.contenders.redis:FastStream",
        },
        notes=["streams + consumer groups (kombu: its list-based transport)"],
    ),
    "kafka": Broker(
        "kafka://127.0.0.1:9092",
        {
            "msgbus": MSGBUS,
            "raw": "benchmarks.contenders.kafka:AioKafka",
            "faststream": "benchmarks.contenders.kafka:FastStream",
        },
        notes=[
            "acks=all idempotent producers, consumer groups with manual commits",
            "FastStream consumes with AckPolicy.ACK, its at-least-once mode (a commit after each message);"
            " kombu's Kafka transport (confluent-kafka) is a blocking one for Celery's worker",
        ],
    ),
    "nats": Broker(
        "nats://127.0.0.1:4222",
        {
            "msgbus": MSGBUS,
            "raw": "benchmarks.contenders.nats:NatsPy",
            "faststream": "benchmarks.contenders.nats:FastStream",
        },
        notes=[
            "work-queue streams on the file store, one durable pull consumer; every send waits for the stream's"
            " ack; messages carry a Nats-Msg-Id and a timestamp (raw too)",
            "FastStream's NatsBroker has no batch publish",
        ],
    ),
    "sqs": Broker(
        # moto's server (integration/_moto.py); it takes any credentials, but botocore must sign with some.
        "sqs://us-east-1?endpoint_url=http://127.0.0.1:4566&access_key_id=testing&secret_access_key=testing",
        {"msgbus": MSGBUS, "raw": "benchmarks.contenders.sqs:Aiobotocore"},
        notes=[
            "standard queues; a send returns on SQS's success response, a consumer long-polls (1 s) and deletes",
            "moto serialises every request (integration/_moto.py): the endpoint, not the client, sets the pace",
            "raw client only: kombu's SQS transport is a blocking one for Celery's worker; FastStream has no"
            " SQS broker",
        ],
    ),
    "pubsub": Broker(
        "pubsub://msgbus-bench?emulator_host=127.0.0.1:8085",
        {"msgbus": MSGBUS, "raw": "benchmarks.contenders.pubsub:GoogleCloudPubSub"},
        notes=[
            "a topic with one subscription per queue; sends return on the publish response (batching of 5 ms)",
            "both consume with Pull + Acknowledge: pstest feeds a streaming pull one message per 10 ms tick"
            " (benchmarks/contenders/pubsub.py), and waits a fixed 500 ms on an empty Pull (the latency rows)",
            "raw client only: kombu's gcpubsub transport is a blocking one for Celery's worker; FastStream has no"
            " Pub/Sub broker",
        ],
    ),
    "servicebus": Broker(
        # The local test double (integration/sbbroker) and its well-known test key, like RabbitMQ's guest:guest.
        "servicebus://RootManageSharedAccessKey:bXNnYnVzLXRlc3Qta2V5LW5vdC1hLXNlY3JldA%2B%2F%3D@127.0.0.1:5682"
        "?emulator=true&management=none&lock_duration=3",
        {"msgbus": MSGBUS, "raw": "benchmarks.contenders.servicebus:AzureServiceBus"},
        notes=[
            "queues, peek-lock receivers completing each message; against sbbroker, a Python test double of the"
            " service: the figures compare client overheads, not Azure",
            "raw client only: kombu's azureservicebus transport is a blocking one (the sync SDK) for Celery's"
            " worker; FastStream has no Service Bus broker",
        ],
    ),
    "postgresql": Broker(
        # The launchers' local server (integration/_postgresql.py) and its test account.
        "postgresql://msgbus:msgbus@127.0.0.1:15432/postgres?schema=bench",
        {"msgbus": MSGBUS, "raw": "benchmarks.contenders.postgresql:Asyncpg"},
        notes=[
            "PostgreSQL 15 with fsync and synchronous commit on (its defaults): every send is a commit",
            "raw: asyncpg with the same FOR UPDATE SKIP LOCKED lease and batched DELETE, polling every 5 ms"
            " instead of LISTEN/NOTIFY, no per-key ordering check; kombu's SQLAlchemy transport is a blocking"
            " poller for Celery's worker and FastStream has no PostgreSQL broker",
        ],
    ),
    "memory": Broker("memory://bench", {"msgbus": MSGBUS}, ("publish", "latency", "pipeline", "ordering")),
    "sqlite": Broker(
        "sqlite:///{tmp}/bench.db", {"msgbus": MSGBUS}, ("publish", "consume", "latency", "pipeline", "ordering")
    ),
}

SMOKE = Plan(
    messages=300,
    single_messages=100,
    latency_messages=50,
    latency_rate=1000.0,
    ordering_messages=200,
    keys=8,
    runs=1,
    workloads=("publish", "consume", "latency", "ordering"),
    batch=50,
    concurrency=4,
)


def url_for(name: str, tmp: str) -> str:
    return os.environ.get(f"MSGBUS_TEST_{name.upper()}_URL") or BROKERS[name].url.format(tmp=tmp)


async def run_broker(name: str, plan: Plan, tmp: str, only: set[str] | None = None) -> dict[str, object]:
    """Run ``plan`` on broker ``name`` with its contenders (``only`` those named, and msgbus, if given)."""
    broker = BROKERS[name]
    url = url_for(name, tmp)
    plan = replace(plan, workloads=tuple(w for w in plan.workloads if w in broker.workloads))
    contenders = {k: v for k, v in broker.contenders.items() if only is None or k in only or k == "msgbus"}

    def log(text: str) -> None:
        print(f"[{name}] {text}", file=sys.stderr)

    # The ordering workload is msgbus against itself (the peers' clients are not needed), on its own URL where the
    # broker's cannot take ordering=per_key (RabbitMQ's benchmark queues are classic; per_key needs quorum).
    ordered_url = url if f"MSGBUS_TEST_{name.upper()}_URL" in os.environ else (broker.ordering_url or url)
    ordering = replace(plan, workloads=("ordering",)) if "ordering" in plan.workloads else None
    rest = replace(plan, workloads=tuple(w for w in plan.workloads if w != "ordering"))
    if ordering is not None and ordered_url == url and not rest.workloads:
        contenders = {"msgbus": broker.contenders["msgbus"]}
    if ordering is None or ordered_url == url:
        result = await bench(url, contenders, plan, log)
    else:
        extra = await bench(ordered_url.format(tmp=tmp), {"msgbus": broker.contenders["msgbus"]}, ordering, log)
        result = await bench(url, contenders, rest, log) if rest.workloads else extra
        if result is not extra:
            result["figures"] += extra["figures"]
            result["skipped"] += extra["skipped"]
        broker = replace(broker, notes=[*broker.notes, f"ordering measured on `{extra['url']}`, both options"])
    result["broker"] = name
    result["notes"] = broker.notes
    return result


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with every case ``new`` measured replaced by ``new``'s figures (and a note saying so)."""
    redone = {(f["workload"], f["case"]) for f in new["figures"]}
    kept = [f for f in old["figures"] if (f["workload"], f["case"]) not in redone]
    m = new["machine"]
    load = f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}"
    what = ", ".join(sorted({w for w, _ in redone}))
    credit = new["plan"].get("prefetch")
    what += f" (prefetch {credit})" if credit else ""
    plan = new["plan"]
    count = plan.get("ordering_messages", plan["messages"]) if what == "ordering" else plan["messages"]
    note = f"{what} re-measured with {count} messages {new['started']} ({load})"
    return {
        **old,
        "contenders": {**old["contenders"], **new["contenders"]},  # a contender added since the first run
        "libraries": {**old["libraries"], **new["libraries"]},
        "figures": kept + new["figures"],
        "notes": [*old.get("notes", []), note],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("brokers", nargs="*", default=["memory", "sqlite", "rabbitmq", "redis"], choices=BROKERS)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run, nothing written")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, help="per batch/concurrent/consume run (default 10000)")
    parser.add_argument(
        "--workload", action="append", choices=("publish", "consume", "latency", "pipeline", "ordering")
    )
    parser.add_argument("--ordering-messages", type=int, help="per ordering run (default 2000)")
    parser.add_argument("--prefetch", type=int, help="consume credit for every contender (default: max(2C, 16))")
    parser.add_argument(
        "--contenders",
        help="comma-separated contenders to run besides msgbus (default: all of the broker's), e.g. raw,kombu",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ and docs alone")
    parser.add_argument(
        "--merge", action="store_true", help="replace only the re-measured cases in the existing results"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan(runs=args.runs, workloads=("publish", "consume", "latency", "ordering"))
    if args.messages:
        plan = replace(plan, messages=args.messages)
    if args.ordering_messages:
        plan = replace(plan, ordering_messages=args.ordering_messages)
    if args.prefetch:
        plan = replace(plan, prefetch=args.prefetch)
    if args.workload:
        plan = replace(plan, workloads=tuple(args.workload))
    if not args.smoke:
        plan = replace(plan, workloads=(*plan.workloads, "pipeline") if not args.workload else plan.workloads)
    write = not (args.smoke or args.no_write)
    only = {c.strip() for c in args.contenders.split(",")} if args.contenders else None
    if only is not None:
        unknown = only - {c for name in args.brokers for c in BROKERS[name].contenders}
        if unknown:
            parser.error(f"no such contender for {', '.join(args.brokers)}: {', '.join(sorted(unknown))}")
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.brokers:
            try:
                result = asyncio.run(run_broker(name, plan, tmp, only))
            except LostMessages as exc:
                print(f"[{name}] FAILED: {exc}", file=sys.stderr)
                status = 1
                continue
            print(render_text(result))
            if write:
                RESULTS.mkdir(exist_ok=True)
                if args.merge and (RESULTS / f"{name}.json").exists():
                    result = merge(json.loads((RESULTS / f"{name}.json").read_text()), result)
                (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
                print(f"[{name}] wrote benchmarks/results/{name}.json", file=sys.stderr)
    if write:
        DOC.write_text(render(sorted(RESULTS.glob("*.json"))))
        print(f"rendered {DOC}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
