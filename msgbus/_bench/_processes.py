"""The workloads that run in child processes (``python -m msgbus._bench --child SPEC``): ``consume`` (N messages
preloaded, then consumed with ack by a fresh child, which reports its elapsed time and peak RSS) and ``pipeline``
(send and consume at once: one process on ``memory://``, a producer and a consumer process otherwise).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ._contender import Contender, LostMessages, Tally, load_contender, make_body
from ._workloads import drain, new_tag

CHILD = "--child"  # the first argument of a child process


async def _child_consume(spec: dict[str, Any]) -> dict[str, Any]:
    contender = load_contender(spec["factory"], spec["url"])
    contender.credit = spec.get("credit")
    await contender.open()
    rss_start = _peak_rss_mib()
    tally = Tally(spec["tag"], spec["n"])
    wall, perf = time.time(), time.perf_counter()
    elapsed = await drain(contender, spec["queue"], tally, spec["concurrency"], f"{contender.name} consume")
    await contender.close()
    return {
        "end": wall + (tally.completed_at - perf),
        "seconds": elapsed,
        "received": tally.distinct,
        "rss_start_mib": rss_start,
        "rss_peak_mib": _peak_rss_mib(),
    }


async def _child_produce(spec: dict[str, Any]) -> dict[str, Any]:
    contender = load_contender(spec["factory"], spec["url"])
    await contender.open()
    bodies = [make_body(spec["tag"], i, spec["size"]) for i in range(spec["n"])]
    start = time.time()
    await contender.publish(spec["queue"], bodies, "batch", spec["batch"], 1)
    end = time.time()
    await contender.close()
    return {"start": start, "end": end}


def run_child(spec_json: str) -> int:
    """A child process's work (``SPEC`` from ``--child SPEC``): its figures go to stdout as one JSON line."""
    spec = json.loads(spec_json)
    run = _child_consume if spec["role"] == "consume" else _child_produce
    print(json.dumps(asyncio.run(run(spec))), flush=True)
    return 0


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss across fork+exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _import_root(name: str) -> str:
    """The ``sys.path`` entry this process imported the top-level package of module ``name`` from."""
    module = importlib.import_module(name.split(".")[0])
    path = Path(module.__file__ or "").resolve()
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def _spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    # The child imports msgbus and the contender from where this process found them (a repository's
    # ``benchmarks`` package is not installed), never from whatever the working directory holds.
    roots = [_import_root("msgbus"), _import_root(spec["factory"].partition(":")[0])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *filter(None, [env.get("PYTHONPATH")])]))
    return subprocess.Popen(
        [sys.executable, "-m", "msgbus._bench", CHILD, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env
    )


def _result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise LostMessages(f"{what}: child process failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def consume_run(
    contender: Contender,
    factory: str,
    queue: str,
    n: int,
    size: int,
    batch: int,
    concurrency: int,
    credit: int | None = None,
) -> dict[str, float]:
    """Preload ``n`` messages (untimed), then a fresh process consumes them with ack; msgs/s and its peak RSS."""
    tag = new_tag()
    bodies = [make_body(tag, i, size) for i in range(n)]
    fastest = "batch" if "batch" in contender.modes else contender.modes[-1]
    await contender.publish(queue, bodies, fastest, batch, 16)
    spec = {"role": "consume", "factory": factory, "url": contender.url, "queue": queue, "n": n, "tag": tag}
    spec["concurrency"], spec["credit"] = concurrency, credit
    proc = await asyncio.to_thread(_spawn, spec)
    got = await asyncio.to_thread(_result, proc, f"{contender.name} consume")
    return {
        "msgs_per_s": n / got["seconds"],
        "rss_peak_mib": got["rss_peak_mib"],
        "rss_start_mib": got["rss_start_mib"],
    }


async def pipeline_run(factory: str, url: str, n: int, size: int, batch: int, concurrency: int) -> float:
    """msgs/s from the first send to the last handled message, sending and consuming at once.

    ``memory://`` lives in one process, so both sides run there; any other URL gets a producer process
    and a consumer process (the consumer starts first and is connected before the clock starts).
    """
    tag = new_tag()
    queue = f"bench-pipe-{tag:08x}"
    if url.startswith("memory:"):
        contender = load_contender(factory, url)
        await contender.open()
        try:
            tally = Tally(tag, n)
            bodies = [make_body(tag, i, size) for i in range(n)]
            start = time.perf_counter()
            consumed = asyncio.create_task(drain(contender, queue, tally, concurrency, f"{contender.name} pipeline"))
            await contender.publish(queue, bodies, "batch", batch, 1)
            await consumed  # (its shutdown, up to one receive poll, is not part of the figure)
            return n / (tally.completed_at - start)
        finally:
            await contender.close()
    base = {"factory": factory, "url": url, "queue": queue, "n": n, "tag": tag, "size": size, "batch": batch}
    consumer = await asyncio.to_thread(_spawn, {**base, "role": "consume", "concurrency": concurrency})
    await asyncio.sleep(2.0)  # imports, connect and declare happen outside the clock
    producer = await asyncio.to_thread(_spawn, {**base, "role": "produce"})
    sent = await asyncio.to_thread(_result, producer, "pipeline producer")
    got = await asyncio.to_thread(_result, consumer, "pipeline consumer")
    return float(n / (got["end"] - sent["start"]))
