"""The local Pub/Sub endpoint: Google's ``pstest`` fake, built from ``integration/pstest/`` with ``go build``.

The official emulator ships only with the gcloud SDK or as a container image; ``pstest`` is the fake that
Google's Go client library tests against, served here by a small Go program that adds a journal, so topics,
subscriptions and unacknowledged messages survive a restart (even a SIGKILL). The binary is built on first
start into ``integration/.cache/pstest/`` (gitignored), and rebuilt when the Go sources change; Go modules
come from the Go module proxy through ``go`` itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ._launchers import HOST, LauncherError, LocalBroker
from ._process import progress

SOURCE = Path(__file__).resolve().parent / "pstest"
CACHE = Path(__file__).resolve().parent / ".cache" / "pstest"
PROJECT = "msgbus-test"
_GO_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/go/bin", "/usr/lib/go/bin"])
_PROBE_TIMEOUT = 3.0


def go() -> str | None:
    """The ``go`` command, or None when this machine has no Go toolchain."""
    return shutil.which("go", path=_GO_SEARCH)


def binary() -> Path:
    """Where ``go build`` puts the server."""
    return CACHE / "pstest-server"


def _sources() -> list[Path]:
    return [SOURCE / name for name in ("main.go", "go.mod", "go.sum")]


def up_to_date() -> bool:
    """True when the built server exists and is newer than every Go source file."""
    built = binary()
    if not built.exists():
        return False
    stamp = built.stat().st_mtime
    return all(not src.exists() or src.stat().st_mtime <= stamp for src in _sources())


def build() -> float:
    """``go build`` the server into the cache folder; returns the seconds it took."""
    tool = go()
    if tool is None:
        raise LauncherError(
            "pubsub: building the pstest server needs Go >= 1.26 (`go` on PATH or in /usr/local/go/bin); "
            "or set PUBSUB_EMULATOR_HOST / MSGBUS_TEST_PUBSUB_URL to an emulator you run"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    progress(f"pubsub: go build {SOURCE.name} -> {binary()} (first build downloads Go modules)")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    env.setdefault("GOTOOLCHAIN", "local")
    tmp = binary().with_suffix(".tmp")
    done = subprocess.run(
        [tool, "build", "-trimpath", "-o", str(tmp), "."],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise LauncherError("pubsub: `go build` of integration/pstest failed:\n" + "\n".join(output))
    tmp.replace(binary())
    took = time.monotonic() - began
    progress(f"pubsub: built in {took:.1f}s")
    return took


def probe(host: str, port: int) -> str | None:
    """Ready when a ListTopics call answers (plain TCP connect when grpcio is not installed)."""
    if importlib.util.find_spec("grpc") is None or importlib.util.find_spec("google.pubsub_v1") is None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT):
                return None
        except OSError as exc:
            return f"no Pub/Sub endpoint at {host}:{port}: {exc}"
    import grpc
    from google.pubsub_v1.types import ListTopicsRequest, ListTopicsResponse

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        call = channel.unary_unary(
            "/google.pubsub.v1.Publisher/ListTopics",
            request_serializer=ListTopicsRequest.serialize,
            response_deserializer=ListTopicsResponse.deserialize,
        )
        call(ListTopicsRequest(project=f"projects/{PROJECT}", page_size=1), timeout=_PROBE_TIMEOUT)
    except grpc.RpcError as exc:
        return f"ListTopics failed: {exc.code().name}"
    finally:
        channel.close()
    return None


class PubSubBroker(LocalBroker):
    """Google's pstest Pub/Sub fake wrapped in a small Go program (integration/pstest/) with a journal."""

    name = "pubsub"
    port = 8085
    env_vars = ("PUBSUB_EMULATOR_HOST",)
    start_timeout = 60.0
    stop_timeout = 10.0
    # The official emulator (in-memory: a container restart loses everything).
    image = "gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators"
    container_command = f"gcloud beta emulators pubsub start --host-port=0.0.0.0:8085 --project={PROJECT}"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"pubsub://{PROJECT}?emulator_host={host}:{port(self.port)}"

    def url_from_env(self, variable: str, value: str) -> str:
        if variable == "PUBSUB_EMULATOR_HOST":
            return f"pubsub://{PROJECT}?emulator_host={value}"
        return value

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return probe(host, port(self.port))

    def executable(self) -> str | None:
        return str(binary()) if up_to_date() else None

    def install(self) -> None:
        build()

    def argv(self) -> list[str]:
        # The journal makes topics, subscriptions and unacked messages survive restart(hard=True).
        return [str(binary()), "-addr", f"{HOST}:{self.port}", "-journal", str(self.dir / "journal.jsonl")]
