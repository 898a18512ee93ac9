"""Apply one mutant to a copy of the source tree and run the contract checks that must catch it.

A mutant is data (``catalogue.toml``): a file, a piece of its text, what to put there instead, the backends
it applies to and the checks that must fail. The tree is copied (``msgbus/`` and every adapter package) to
a temporary directory, the text is replaced there (it must occur exactly once), and the checks run from the
copy in a fresh process (``mutants.run``: quick volumes, the broker's restart hook) against the backend's
contract URL. A listed check that fails kills the mutant; if all pass it survived: the contract missed a bug.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = Path(__file__).resolve().parent / "catalogue.toml"
EMBEDDED = ("memory", "sqlite")
# Deadlines are set for full volume; mutants run --quick, and one that loses messages fails at its deadline.
DEADLINE_SCALE = "0.5"
_RESULT_ROW = re.compile(r"^(?P<check>.+?)\s+\| fail [\d.]+s\s+\| (?P<detail>.*)$")


@dataclass(frozen=True)
class Mutant:
    """One realistic bug: ``find`` in ``file`` becomes ``replace``; ``checks`` must catch it on ``backends``."""

    name: str
    kind: str  # the class of bug, e.g. "dropped ack"
    backends: tuple[str, ...]
    file: str
    find: str
    replace: str
    checks: tuple[str, ...]
    ci: bool = False  # part of the quick subset that runs in `make test`
    why: str = ""  # what a real bug of this shape looks like, for the table
    options: str = ""  # URL options the checks need (e.g. ordering=per_key), added to the backend's URL

    def apply(self, root: Path) -> None:
        """Mutate ``root / file`` in place; the text must occur exactly once (a stale mutant is an error)."""
        path = root / self.file
        text = path.read_text()
        found = text.count(self.find)
        if found != 1:
            raise ValueError(f"mutant {self.name!r}: the text to replace occurs {found} times in {self.file}")
        path.write_text(text.replace(self.find, self.replace))

    @property
    def module(self) -> str:
        """The module the mutated file is, as imported (``adapters/kafka/msgbus_kafka/_adapter.py`` ->
        ``msgbus_kafka._adapter``)."""
        parts = Path(self.file).with_suffix("").parts
        if parts[0] == "adapters":
            parts = parts[2:]
        return ".".join(p for p in parts if p != "__init__")


def load(path: Path = CATALOGUE) -> list[Mutant]:
    """The catalogue, checked: unique names, known checks, text that is where it says (``find`` once)."""
    from msgbus.testing import CHECKS

    known = {c.name for c in CHECKS}
    mutants: list[Mutant] = []
    for entry in tomllib.loads(path.read_text())["mutant"]:
        fields = dict(entry)
        fields["backends"] = tuple(fields["backends"])
        fields["checks"] = tuple(fields["checks"])
        mutant = Mutant(**fields)
        unknown = set(mutant.checks) - known
        if unknown:
            raise ValueError(f"mutant {mutant.name!r} names unknown checks: {', '.join(sorted(unknown))}")
        if any(m.name == mutant.name for m in mutants):
            raise ValueError(f"mutant {mutant.name!r} is in the catalogue twice")
        mutants.append(mutant)
    return mutants


@dataclass(frozen=True)
class Outcome:
    """A mutant's run on one backend: ``killed`` (by ``check``, with its detail), ``survived`` or ``error``."""

    mutant: str
    kind: str
    backend: str
    status: Literal["killed", "survived", "error"]
    check: str
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _sources() -> list[Path]:
    """The packages a mutant can touch: the core and every adapter's package (relative to ROOT)."""
    return [Path("msgbus"), *sorted(p.relative_to(ROOT) for p in ROOT.glob("adapters/*/msgbus_*") if p.is_dir())]


@contextmanager
def tree_copy(mutant: Mutant | None) -> Iterator[Path]:
    """A temporary copy of the sources with ``mutant`` applied (none: the unmutated baseline)."""
    with tempfile.TemporaryDirectory(prefix="msgbus-mutant-") as tmp:
        root = Path(tmp)
        for src in _sources():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(ROOT / src, root / src, ignore=ignore)
        if mutant is not None:
            mutant.apply(root)
        yield root


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The copy first; the real tree last, for the harness itself and integration/ (never mutated).
    paths = [str(root), *(str(p.parent) for p in sorted(root.glob("adapters/*/msgbus_*"))), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("MSGBUS_CONTRACT_RESULTS", None)  # a sabotaged run is no result for the capability matrix
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MSGBUS_CONTRACT_DEADLINE_SCALE"] = DEADLINE_SCALE
    return env


def _imports_from(root: Path, module: str) -> None:
    """The mutated module must come from the copy (not the installed tree) and still import."""
    code = f"import {module} as m; print(m.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True, timeout=60
    )
    where = out.stdout.strip()
    if out.returncode != 0 or not where.startswith(str(root)):
        raise RuntimeError(f"{module} did not import from the mutated copy ({where or out.stderr.strip()[-300:]})")


def embedded_url(backend: str, root: Path) -> str:
    """A fresh memory:// namespace or sqlite:// file, with the 1 s lock the unit contract tests use."""
    if backend == "memory":
        return f"memory://mutant-{uuid.uuid4().hex[:8]}?visibility_timeout=1&dedup_window=60"
    return f"sqlite:///{root}/contract.db?visibility_timeout=1&dedup_window=60"


def run_mutant(
    mutant: Mutant | None,
    backend: str,
    url: str | Callable[[Path], str],
    checks: tuple[str, ...] | None = None,
) -> Outcome:
    """Run ``checks`` (default: the mutant's) from a mutated copy against ``url``; ``None``: the baseline.

    ``url`` may depend on the copy's location (the sqlite file lives there).
    """
    checks = checks or (mutant.checks if mutant else ())
    name, kind = (mutant.name, mutant.kind) if mutant else ("baseline", "none")
    started = time.monotonic()

    def outcome(status: Literal["killed", "survived", "error"], check: str, detail: str) -> Outcome:
        return Outcome(name, kind, backend, status, check, detail, round(time.monotonic() - started, 1))

    try:
        with tree_copy(mutant) as root:
            if mutant is not None:
                _imports_from(root, mutant.module)
            env = _env(root)
            env["MSGBUS_URL"] = _with_options(url(root) if callable(url) else url, mutant)  # not in argv: it is public
            env["MUTANT_FAIL_FAST"] = "1" if mutant else "0"
            argv = [sys.executable, "-m", "mutants.run", backend, *checks]
            proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    except (ValueError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return outcome("error", "", str(exc))
    if proc.returncode == 0:
        return outcome("survived", "", f"every check passed: {', '.join(checks)}")
    failed = [m for line in proc.stdout.splitlines() if (m := _RESULT_ROW.match(line))]
    if proc.returncode == 1 and failed:
        return outcome("killed", failed[0]["check"].strip(), failed[0]["detail"].strip())
    tail = (proc.stderr.strip() or proc.stdout.strip())[-800:]
    return outcome("error", "", f"msgbus contract exited with {proc.returncode}: {tail}")


def _with_options(url: str, mutant: Mutant | None) -> str:
    """``url`` with the mutant's URL ``options`` (added here for a mutant; a baseline gets them from its caller,
    which knows which options its mutants need, through ``with_options``)."""
    return with_options(url, mutant.options if mutant is not None else "")


def with_options(url: str, options: str) -> str:
    """``url`` with extra URL ``options`` (``a=1&b=2``) appended."""
    if not options:
        return url
    return url + ("&" if "?" in url else "?") + options


def read_results(path: Path) -> list[Outcome]:
    """The outcomes ``write_results`` wrote (none when the file does not exist)."""
    if not path.exists():
        return []
    return [Outcome(**row) for row in json.loads(path.read_text())]


def write_results(outcomes: list[Outcome], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([o.as_dict() for o in outcomes], indent=1) + "\n")
