"""The local Pub/Sub endpoint: Google's ``pstest`` fake, built from ``integration/pstest/`` with ``go build``.

The official emulator ships only with the gcloud SDK or as a container image; ``pstest`` is the fake that
Google's Go client library tests against, served here by a small Go program that adds a journal, so topics,
subscriptions and unacknowledged messages survive a restart (even a SIGKILL). The binary is built on first
start into ``integration/.cache/pstest/`` (gitignored), and rebuilt when the Go sources change; Go modules
come from the Go module proxy through ``go`` itself.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable

from ._go import GoProgram
from ._launchers import HOST, LocalBroker

PROJECT = "msgbus-test"
_PROBE_TIMEOUT = 3.0
SERVER = GoProgram(
    "pstest-server",
    "pstest",
    otherwise="; or set PUBSUB_EMULATOR_HOST / MSGBUS_TEST_PUBSUB_URL to an emulator you run",
)


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
        return str(SERVER.binary) if SERVER.up_to_date() else None

    def install(self) -> None:
        SERVER.build()

    def argv(self) -> list[str]:
        # The journal makes topics, subscriptions and unacked messages survive restart(hard=True).
        return [str(SERVER.binary), "-addr", f"{HOST}:{self.port}", "-journal", str(self.dir / "journal.jsonl")]
