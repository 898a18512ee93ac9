"""Programs the integration tests build from Go sources in this repo (pstest, Toxiproxy), with ``go build``.

Each lives in its own folder under ``integration/`` with a ``go.mod`` and ``go.sum`` that pin every module; the
binary goes into ``integration/.cache/<folder>/`` (gitignored; ``$MSGBUS_TEST_CACHE_DIR`` overrides the root)
and is rebuilt when the sources' hash (kept beside it) changes. Go modules come from the Go module proxy
through ``go`` itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ._install import cache_root
from ._process import progress

_HERE = Path(__file__).resolve().parent
_GO_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/go/bin", "/usr/lib/go/bin"])


def go() -> str | None:
    """The ``go`` command, or None when this machine has no Go toolchain."""
    return shutil.which("go", path=_GO_SEARCH)


@dataclass(frozen=True)
class GoProgram:
    """A Go program built from ``integration/<folder>``: ``package`` is what ``go build`` builds there."""

    name: str
    folder: str
    package: str = "."
    # What to tell the user when there is no Go toolchain (how else to get an endpoint).
    otherwise: str = ""

    @property
    def source(self) -> Path:
        return _HERE / self.folder

    @property
    def binary(self) -> Path:
        """Where ``go build`` puts the program."""
        return cache_root() / self.folder / self.name

    @property
    def _stamp(self) -> Path:
        return self.binary.with_name(self.binary.name + ".sources")

    def _digest(self) -> str:
        """A hash of the Go sources, so a binary built from the same sources is current in any clone or worktree
        (file times differ between checkouts)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in self.source.iterdir() if p.suffix in (".go", ".mod", ".sum")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()

    def up_to_date(self) -> bool:
        """True when the built program exists and was built from the Go sources as they are now."""
        if not self.binary.exists():
            return False
        if self._stamp.exists():
            return self._stamp.read_text().strip() == self._digest()
        # Built before stamps were written: current when newer than every source file.
        stamp = self.binary.stat().st_mtime
        return all(p.stat().st_mtime <= stamp for p in self.source.iterdir() if p.suffix in (".go", ".mod", ".sum"))

    def build(self) -> float:
        """``go build`` the program into the cache folder; returns the seconds it took."""
        from ._launchers import LauncherError  # not at the top: _launchers imports the launchers that use this

        tool = go()
        if tool is None:
            raise LauncherError(
                f"{self.name}: building needs Go >= 1.26 (`go` on PATH or in /usr/local/go/bin){self.otherwise}"
            )
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        progress(f"{self.name}: go build integration/{self.folder} -> {self.binary} (first build downloads modules)")
        env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        env.setdefault("GOTOOLCHAIN", "local")
        tmp = self.binary.with_suffix(".tmp")
        done = subprocess.run(
            [tool, "build", "-trimpath", "-o", str(tmp), self.package],
            cwd=self.source,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip().splitlines()[-20:]
            raise LauncherError(f"{self.name}: `go build` in integration/{self.folder} failed:\n" + "\n".join(output))
        tmp.replace(self.binary)
        self._stamp.write_text(self._digest())
        took = time.monotonic() - began
        progress(f"{self.name}: built in {took:.1f}s")
        return took
