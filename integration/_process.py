"""Processes we start and only those: PID files that prove ownership, start, stop, lock, wait.

A PID file records the PID *and* the kernel start time of the process, so a PID reused by an unrelated
process after a reboot or a crash is never mistaken for ours and never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# How long a start or stop waits for another one of the same broker, and how many SIGKILL rounds (10 s apart) a
# stop sends before it reports what will not die: a stuck step fails with a reason instead of hanging a test run.
LOCK_TIMEOUT = 900.0
KILL_ROUNDS = 3
# Popen objects of children started by this interpreter, so they are reaped (no zombies) when they exit.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of a live process, or None when it is gone or a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return None
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def _live_where(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose /proc stat ``field`` (1: parent, 2: process group) is ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is not None and fields[0] != "Z" and int(fields[field]) == value:
            found.append(int(entry.name))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (the broker and any helper it forked)."""
    return _live_where(2, pgid)


def children(pid: int) -> list[int]:
    """Live direct children of ``pid``, wherever their process group (PostgreSQL's backends start their own)."""
    return _live_where(1, pid)


@dataclass(frozen=True)
class PidRecord:
    """What we wrote when we started a process: enough to recognise exactly that process later."""

    pid: int
    start_time: int
    argv: tuple[str, ...]

    def alive(self) -> bool:
        """True while the very process we started runs (not a later process that reused the PID)."""
        return start_time(self.pid) == self.start_time


def read_pid(path: Path) -> PidRecord | None:
    """The record in ``path``, or None when there is none or it is unreadable (treated as not ours)."""
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), int(data["start_time"]), tuple(data["argv"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def spawn(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path, pid_file: Path) -> PidRecord:
    """Start ``argv`` in its own session (so its helpers can be stopped as a group) and record it."""
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {argv[0]}\n".encode())
        out.flush()
        child = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[child.pid] = child
    started = start_time(child.pid)
    record = PidRecord(child.pid, started if started is not None else -1, tuple(argv))
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": record.pid, "start_time": record.start_time, "argv": list(argv)}))
    tmp.replace(pid_file)
    return record


def terminate(record: PidRecord, *, timeout: float, hard: bool = False) -> None:
    """Stop the process we started and its process group: SIGTERM (graceful), SIGKILL after ``timeout``.

    ``hard=True`` sends SIGKILL at once, which is how a test simulates a broker crash. Blocks until every
    process of the group is gone. Does nothing when the recorded process is no longer the one we started.
    """
    if not record.alive():
        return
    # A crash takes the broker's own children with it, even those in process groups of their own (a killed
    # postmaster's backends otherwise linger, and a restart meets its "lock file already exists").
    strays = children(record.pid) if hard else []
    with contextlib.suppress(ProcessLookupError):
        if hard:
            os.killpg(record.pid, signal.SIGKILL)
        else:
            os.kill(record.pid, signal.SIGTERM)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    kills = 0
    while record.alive() or group_members(record.pid) or any(start_time(pid) is not None for pid in strays):
        if time.monotonic() > deadline:
            if kills == KILL_ROUNDS:  # something SIGKILL does not end (a process stuck in the kernel): say so
                left = [p for p in [record.pid, *group_members(record.pid), *strays] if start_time(p) is not None]
                states = ", ".join(f"{p} ({(_proc_stat(p) or ['?'])[0]})" for p in sorted(set(left)))
                raise RuntimeError(f"{record.argv[0]}: still running after {KILL_ROUNDS} SIGKILLs: {states}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)
            kills += 1
            deadline = time.monotonic() + 10
        time.sleep(0.1)
    child = _CHILDREN.pop(record.pid, None)
    if child is not None:
        child.wait()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port`` (we could bind it), so a fresh broker can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive advisory lock, so two processes never start or stop the same broker at once.

    Waits at most ``timeout`` seconds (a cold start installs and starts a broker in a few minutes), then raises
    instead of waiting on a holder that is itself stuck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{path} is still held by another process after {timeout:.0f}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_until(ready: Callable[[], str | None], *, record: PidRecord, timeout: float, log: Path, what: str) -> None:
    """Poll ``ready`` (None = ready, else why not) until it succeeds, the process dies, or ``timeout`` passes.

    Raises RuntimeError naming the last reason and showing the end of the broker's log.
    """
    deadline = time.monotonic() + timeout
    delay = 0.1
    reason: str | None = "not checked yet"
    while True:
        reason = ready()
        if reason is None:
            return
        if not record.alive():
            raise RuntimeError(f"{what} exited while starting ({reason}); log {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s ({reason}); log {log}:\n{tail(log)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def progress(message: str) -> None:
    """One line of progress on stderr (stdout stays free for machine-readable output such as URLs)."""
    print(message, file=sys.stderr, flush=True)
