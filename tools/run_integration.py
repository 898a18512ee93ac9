"""Run the integration test files, one pytest process each, in lanes that own their brokers, then the rest.

``make integration`` used to run ~25 files one after the other (about 35 minutes with the failure suite). Most
of that time is waiting (locks running out, brokers restarting), so two lanes run at once: each holds the files
of its own brokers, and a file may restart only a broker of its lane. Files that use several brokers run after
both lanes, alone. Output lines are prefixed with their file as they come (progress on a long run); a summary
gives each file's seconds and result. A file whose pytest finds no tests (exit code 5) fails, as any other.

usage: run_integration.py [PYTEST_ARG ...]   (passed to every pytest, after the file)
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

# Each lane: the files whose brokers it owns (contract tests restart their broker; adapter tests may too).
# The Kafka, Service Bus, Pub/Sub and SQS contracts run alone, after the lanes: under the load of parallel runs
# on two cores, "stop() hands back" (bound: half a 2 s lock) saw Kafka's group rebalance after 3.2 s and
# Pub/Sub's redelivery late, and Service Bus's 3 s entity lock ran out under "bulk acks", each twice. SQS's
# contract has the same half-lock bound and was not yet seen under a lane's load.
LANES = {
    "A": [
        "integration/test_kafka_rebalance.py",
        "adapters/kafka/tests",
        "integration/test_contract_rabbitmq.py",
        "adapters/rabbitmq/tests",
        "integration/test_contract_nats.py",
        "adapters/nats/tests",
        "adapters/pubsub/tests",
        "adapters/sqs/tests",
    ],
    "B": [
        "integration/test_sbbroker_journal.py",
        "adapters/servicebus/tests",
        "integration/test_contract_redis.py",
        "integration/test_inbox_redis.py",
        "adapters/redis/tests",
        "integration/test_contract_postgresql.py",
        "integration/test_outbox_postgresql.py",
        "adapters/postgresql/tests",
    ],
}
# Run by make's chaos-ci target, after these.
EXCLUDED = {"integration/test_chaos.py"}
_print = threading.Lock()


def _all_files() -> list[str]:
    found = [str(p) for p in sorted(Path("integration").glob("test_*.py"))]
    found += [str(p) for p in sorted(Path("adapters").glob("*/tests")) if p.is_dir()]
    return [f for f in found if f not in EXCLUDED]


def _run(path: str, args: list[str], results: list[tuple[str, int, float]]) -> None:
    """One pytest process for ``path``, its output prefixed line by line; appends (path, code, seconds)."""
    start = time.monotonic()
    argv = [sys.executable, "-m", "pytest", "--import-mode=importlib", path, *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        tag = Path(path).stem if path.startswith("integration") else path.split("/")[1] + "/tests"
        for line in proc.stdout:
            with _print:
                sys.stdout.write(f"[{tag}] {line}")
                sys.stdout.flush()
    results.append((path, proc.returncode, time.monotonic() - start))


def _lane(files: list[str], args: list[str], results: list[tuple[str, int, float]]) -> None:
    for path in files:
        _run(path, args, results)


def main(args: list[str]) -> int:
    files = _all_files()
    laned = {f for lane in LANES.values() for f in lane}
    missing = sorted(laned - set(files))
    if missing:
        print(f"run_integration: lanes name files that do not exist: {', '.join(missing)}", file=sys.stderr)
        return 2
    results: list[tuple[str, int, float]] = []
    start = time.monotonic()
    threads = [threading.Thread(target=_lane, args=(lane, args, results)) for lane in LANES.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lanes_done = time.monotonic() - start
    _lane([f for f in files if f not in laned], args, results)
    print(f"\n== integration: {len(results)} files, lanes {lanes_done:.0f}s, total {time.monotonic() - start:.0f}s")
    for path, code, seconds in results:
        print(f"   {'ok  ' if code == 0 else f'FAIL (exit {code})'} {seconds:6.0f}s  {path}")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
