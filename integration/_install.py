"""Installing what a local broker needs, through the ordinary package clients (apt-get, pip)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._process import progress

_POLICY_RC = Path("/usr/sbin/policy-rc.d")
_DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
_apt_updated = False


class InstallError(RuntimeError):
    """A package a broker needs is missing and could not be installed here."""


def cache_root() -> Path:
    """Where downloaded jars and built programs are kept: ``$MSGBUS_TEST_CACHE_DIR`` or ``integration/.cache``."""
    return Path(os.environ.get("MSGBUS_TEST_CACHE_DIR") or _DEFAULT_CACHE)


def apt_installed(package: str) -> bool:
    """True when the Debian package is installed."""
    if shutil.which("dpkg-query") is None:
        return False
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return done.returncode == 0 and done.stdout.strip().endswith("install ok installed")


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Stop Debian maintainer scripts from starting the system's own broker service during install.

    A system rabbitmq-server/redis-server started by postinst would take the test ports and run as a
    process we did not start. ``policy-rc.d`` exiting 101 is Debian's documented way to forbid that; we only
    add it when none exists and remove only the one we added.
    """
    added = False
    if not _POLICY_RC.exists():
        _POLICY_RC.write_text("#!/bin/sh\n# added by msgbus integration/_install.py while installing\nexit 101\n")
        _POLICY_RC.chmod(0o755)
        added = True
    try:
        yield
    finally:
        if added:
            _POLICY_RC.unlink(missing_ok=True)


def apt_install(packages: Sequence[str]) -> None:
    """Install the missing Debian packages (running ``apt-get update`` once first). Needs root."""
    global _apt_updated
    missing = [p for p in packages if not apt_installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise InstallError(f"missing {' '.join(missing)} and this machine has no apt-get: install them yourself")
    if os.geteuid() != 0:
        raise InstallError(f"missing {' '.join(missing)}: run `sudo apt-get install {' '.join(missing)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _no_service_start():
        if not _apt_updated:
            progress("apt-get update")
            _run(["apt-get", "update", "-q"], env)
            _apt_updated = True
        progress(f"apt-get install {' '.join(missing)}")
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env)


def importable(module: str) -> bool:
    """True when ``module`` (dotted names allowed) can be imported by this interpreter."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def pip_install(module: str, requirement: str) -> None:
    """Install ``requirement`` into this interpreter when ``module`` cannot be imported."""
    if importable(module):
        return
    progress(f"pip install {requirement}")
    _run([sys.executable, "-m", "pip", "install", "-q", requirement], dict(os.environ))


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise InstallError(f"`{' '.join(argv)}` failed with exit code {done.returncode}:\n" + "\n".join(output))
