"""PostgreSQL from the Debian package as a local test server: its own cluster (initdb), port and data dir.

The server refuses to run as root, so as root (CI) the cluster belongs to the ``postgres`` account the
Debian package creates and the server is started through ``setpriv`` (which execs: the recorded PID is the
postmaster itself). Password authentication (scram) with the test account ``msgbus:msgbus``, so URLs carry a
password as in production.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._launchers import HOST, LauncherError, LocalBroker
from ._process import read_pid, start_time

USER = PASSWORD = "msgbus"


def _bin_dir() -> Path | None:
    """The newest installed server's bin directory (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PostgreSQL(LocalBroker):
    """postgres with fsync and synchronous commit on (the defaults): a commit survives a SIGKILL of the server."""

    name = "postgresql"
    port = 15432
    apt_packages = ("postgresql",)
    start_timeout = 60.0
    image = "postgres:15-alpine"
    container_env = {"POSTGRES_USER": USER, "POSTGRES_PASSWORD": PASSWORD}

    def url_for(self, host: str, port: Callable[[int], int]) -> str:
        return f"postgresql://{USER}:{PASSWORD}@{host}:{port(self.port)}/postgres"

    def probe_for(self, host: str, port: Callable[[int], int]) -> str | None:
        return _probe(self.url_for(host, port), host, port(self.port))

    def executable(self) -> str | None:
        bin_dir = _bin_dir()
        return str(bin_dir / "postgres") if bin_dir is not None else None

    def _as_server_user(self) -> list[str]:
        """The argv prefix that runs a command as the account owning the cluster (none unless we are root)."""
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def argv(self) -> list[str]:
        return [
            *self._as_server_user(),
            str(self.executable()),
            *("-D", str(self.dir / "data"), "-p", str(self.port)),
            *("-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="),
            *("-c", "max_connections=300", "-c", "log_min_messages=warning"),
        ]

    def prepare(self) -> None:
        data = self.dir / "data"
        if (data / "PG_VERSION").exists():
            self._drop_stale_lock(data / "postmaster.pid")
            return
        bin_dir = _bin_dir()
        assert bin_dir is not None
        data.mkdir(mode=0o700, exist_ok=True)
        secret = self.dir / "pwfile"
        secret.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (data, secret):
                os.chown(path, account.pw_uid, account.pw_gid)
        done = subprocess.run(
            [
                *self._as_server_user(),
                str(bin_dir / "initdb"),
                *("-D", str(data), "-U", USER, f"--pwfile={secret}", "--auth=scram-sha-256"),
                *("-E", "UTF8", "--locale=C.UTF-8", "--no-sync"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        secret.unlink(missing_ok=True)
        if done.returncode != 0:
            raise LauncherError(f"postgresql: initdb failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")

    @staticmethod
    def _drop_stale_lock(lock: Path) -> None:
        """A killed postmaster stays a zombie until init reaps it; PostgreSQL then takes its lock file's PID for
        a live server and refuses to start ("lock file already exists"). Ours is stopped: drop the file."""
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        if start_time(pid) is None:  # gone, or a zombie
            lock.unlink(missing_ok=True)

    def _stop_locked(self, *, hard: bool) -> bool:
        # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to leave; SIGINT ("fast")
        # disconnects them and shuts down cleanly, as a restart by an operator would.
        record = read_pid(self.pid_file)
        if not hard and record is not None and record.alive():
            os.kill(record.pid, signal.SIGINT)
            deadline = time.monotonic() + self.stop_timeout
            while record.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        return super()._stop_locked(hard=hard)


def _probe(url: str, host: str, port: int) -> str | None:
    """Ready when a login with the test account answers ``SELECT 1`` (asyncpg), else on ``pg_isready``."""
    if importlib.util.find_spec("asyncpg") is None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            return "pg_isready not found"
        done = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", host, "-p", str(port), "-t", "5"],
            capture_output=True,
            text=True,
            check=False,
        )
        return None if done.returncode == 0 else f"pg_isready: {done.stdout.strip() or done.returncode}"
    import asyncio

    import asyncpg

    async def login() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.fetchval("SELECT 1", timeout=5)
        finally:
            await conn.close()

    # A fresh thread owns its own event loop, so this works even when called from async test code.
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, login()).result()
    except Exception as exc:  # any failure to log in means "not ready yet", with the reason
        return f"login failed: {type(exc).__name__}: {exc}"
    return None
