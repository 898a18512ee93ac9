"""Service Bus for the integration tests: the local test broker (integration/sbbroker), or the official
emulator in containers where a Docker daemon answers.

The test broker is an AMQP 1.0 server on python-qpid-proton that speaks the Service Bus dialect the
azure-servicebus SDK expects (see integration/sbbroker/README.md for what it does and does not prove).
It runs with this interpreter on 127.0.0.1:5682 (5672 is RabbitMQ's), keeps its state in
``<state dir>/servicebus/state.json`` and a journal beside it (``state.journal``), so a restart, even after a
SIGKILL, keeps everything it acknowledged, and checks token signatures against a fixed test key.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from ._install import importable, pip_install
from ._launchers import HOST, LauncherError, LocalBroker, register
from ._process import port_open, progress

_REPO = Path(__file__).resolve().parent.parent
KEY_NAME = "RootManageSharedAccessKey"
# A well-known test key, like RabbitMQ's guest:guest; base64 like a real one so quoting is exercised.
TEST_KEY = "bXNnYnVzLXRlc3Qta2V5LW5vdC1hLXNlY3JldA+/="
LOCK_DURATION = 3  # seconds, every entity: matches lock_duration in the URL so lock checks take seconds
# Entities the test broker creates with RequiresDuplicateDetection (name pattern -> history window, seconds): it
# has no administration API to ask for it. The contract's dedup check (the names its ContractContext.name() makes,
# asserted in test_contract_servicebus.py) and the broker's own tests (integration/test_sbbroker_dedup.py).
DEDUP_CHECK_ENTITIES = "ct-a-send-retried-with-the-*"
DUPLICATE_DETECTION = {DEDUP_CHECK_ENTITIES: 600, "dd-*": 600, "ddw-*": 2, "ddp-*": 600}
PARTITIONED = ("ddp-*",)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@register
class ServiceBus(LocalBroker):
    """The Service Bus test broker (``python -m integration.sbbroker``), installed with pip on first start."""

    name = "servicebus"
    port = 5682
    start_timeout = 30.0
    stop_timeout = 15.0
    requirement: ClassVar[str] = "python-qpid-proton==0.40.*"

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return (
            f"servicebus://{KEY_NAME}:{_quote(TEST_KEY)}@{host}:{port(self.port)}"
            f"?emulator=true&management=none&lock_duration={LOCK_DURATION}"
        )

    def url_from_env(self, variable: str, value: str) -> str:
        if value.lower().startswith("endpoint="):  # a connection string (a real namespace or the emulator)
            from msgbus_servicebus import url_from_connection_string

            return url_from_connection_string(value)
        return value

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        if not port_open(port(self.port), host):
            return f"nothing listens on {host}:{port(self.port)}"
        return _sdk_probe(self.url_for(host, port))

    def executable(self) -> str | None:
        return sys.executable if importable("proton") else None

    def install(self) -> None:
        pip_install("proton", self.requirement)

    def argv(self) -> list[str]:
        key_file = self.dir / "key"
        return [
            sys.executable, "-m", "integration.sbbroker",
            "--host", HOST, "--port", str(self.port),
            "--state", str(self.dir / "state.json"),
            "--lock-duration", str(LOCK_DURATION),
            "--key-name", KEY_NAME, "--key-file", str(key_file),
            *(f"--duplicate-detection={p}={s}" for p, s in DUPLICATE_DETECTION.items()),
            *(f"--partitioned={p}" for p in PARTITIONED),
        ]  # fmt: skip

    def prepare(self) -> None:
        (self.dir / "key").write_text(TEST_KEY)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
        return env


def _sdk_probe(url: str) -> str | None:
    """Ready when the SDK can authenticate and attach a receiver (stdlib-only fallback: the port is open)."""
    if not importable("azure.servicebus") or not importable("msgbus_servicebus"):
        return None
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import msgbus

    async def attach() -> None:
        async with msgbus.connect(url) as bus:
            await bus.consumer("msgbus-probe").receive(timeout=0.1)

    with ThreadPoolExecutor(1) as pool:  # own event loop: works when called from async test code
        try:
            pool.submit(asyncio.run, attach()).result(timeout=20)
        except Exception as exc:  # any failure means "not ready yet", with the reason
            return f"SDK attach failed: {type(exc).__name__}: {exc}"
    return None


# --- the official emulator, where Docker exists (not runnable on this project's CI) ---

EMULATOR_IMAGE = "mcr.microsoft.com/azure-messaging/servicebus-emulator:latest"
SQL_IMAGE = "mcr.microsoft.com/azure-sql-edge:latest"
EMULATOR_KEY = "SAS_KEY_VALUE"  # the emulator's documented fixed key


class EmulatorContainers:
    """Microsoft's Service Bus emulator plus the SQL Edge container it stores into, on one Docker network.

    Same shape as ``_containers.ContainerBroker`` (``start``, ``stop``, ``restart``, ``url``). The emulator
    creates entities only from its ``Config.json`` (written here with the names in ``entities``); the
    contract suite needs fresh names per check, so it runs against the emulator only where that emulator
    version serves the administration API (``management=admin``) — see docs/adapters/servicebus.md.
    """

    def __init__(self, config: dict[str, Any] | None = None, password: str = "Msgbus-Test-1") -> None:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        self._dir = Path(os.environ.get("MSGBUS_TEST_STATE_DIR") or _REPO / "integration" / ".state") / "sb-emulator"
        self._dir.mkdir(parents=True, exist_ok=True)
        config_file = self._dir / "Config.json"
        config_file.write_text(json.dumps(config or _default_config()))
        self._network = Network()
        self._sql: Any = (
            DockerContainer(SQL_IMAGE)
            .with_env("ACCEPT_EULA", "Y")
            .with_env("MSSQL_SA_PASSWORD", password)
            .with_name(f"msgbus-sqledge-{os.getpid()}")
        )
        self._emulator: Any = (
            DockerContainer(EMULATOR_IMAGE)
            .with_env("ACCEPT_EULA", "Y")
            .with_env("SQL_SERVER", f"msgbus-sqledge-{os.getpid()}")
            .with_env("MSSQL_SA_PASSWORD", password)
            .with_volume_mapping(str(config_file), "/ServiceBus_Emulator/ConfigFiles/Config.json", "ro")
            .with_exposed_ports(5672)
        )
        self._host = "127.0.0.1"
        self._port = 5672

    @property
    def url(self) -> str:
        connection = (
            f"Endpoint=sb://{self._host}:{self._port};SharedAccessKeyName=RootManageSharedAccessKey;"
            f"SharedAccessKey={EMULATOR_KEY};UseDevelopmentEmulator=true"
        )
        from msgbus_servicebus import url_from_connection_string

        return url_from_connection_string(connection) + "&lock_duration=60"

    def start(self) -> None:
        progress(f"servicebus: starting {SQL_IMAGE} and {EMULATOR_IMAGE}")
        self._network.create()
        self._sql.with_network(self._network).start()
        self._emulator.with_network(self._network).start()
        self._host = self._emulator.get_container_host_ip()
        self._port = int(self._emulator.get_exposed_port(5672))
        self._wait_ready()

    def stop(self) -> None:
        self._emulator.stop()
        self._sql.stop()
        self._network.remove()

    def restart(self, *, hard: bool = False) -> None:
        wrapped = self._emulator.get_wrapped_container()
        if hard:
            wrapped.kill()
            wrapped.start()
        else:
            wrapped.restart()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while (reason := _sdk_probe(self.url)) is not None:
            if time.monotonic() > deadline:
                raise LauncherError(f"servicebus emulator not ready: {reason}")
            time.sleep(2)


def _default_config() -> dict[str, Any]:
    """The emulator's Config.json with the entities the probe and a smoke test use."""
    queue = {"Name": "msgbus-probe", "Properties": {"LockDuration": "PT1M", "MaxDeliveryCount": 10}}
    return {
        "UserConfig": {
            "Namespaces": [{"Name": "sbemulatorns", "Queues": [queue], "Topics": []}],
            "Logging": {"Type": "File"},
        }
    }
