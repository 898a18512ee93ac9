"""The ``msgbus`` command line, run in-process through ``main([...])`` and as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest

import msgbus
import msgbus.sync
from msgbus.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "send", "consume", "tail", "contract", "redrive", "dlq", "purge", "stats", "info", "schemes")
SECRET = "s3cret-pw"


def memory_url() -> str:
    """A private memory:// namespace: shared by every main() call in this process, and by nobody else."""
    return f"memory://cli-{uuid.uuid4().hex[:8]}"


def cli(*args: str, cwd: Path, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msgbus", *args],
        cwd=cwd,
        env=_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBUS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- help and errors -------------------------------------------------------------------------------


def test_help_lists_every_command_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    for command in COMMANDS:
        assert command in text
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"usage: msgbus {command}" in text
        assert "examples:" in text and f"msgbus {command}" in text.split("examples:")[1]


def test_help_in_a_subprocess(tmp_path: Path) -> None:
    done = cli("consume", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--json-lines" in done.stdout and "SIGTERM" in done.stdout


@pytest.mark.parametrize(
    "url",
    [
        f"nosuch://user:{SECRET}@host/",
        f"amqp://user:{SECRET}@host:notaport/",
        f"memory://?password={SECRET}",
        f"sqlite:///./x.db?token={SECRET}",
    ],
)
def test_bad_url_is_one_line_without_the_secret(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", url, "orders", "hello"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("msgbus: error: ") and err.count("\n") == 1, err
    assert SECRET not in err


def test_bad_url_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    done = cli("consume", f"amqp://user:{SECRET}@host:notaport/", "orders", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("msgbus: error: malformed amqp:// URL") and done.stderr.count("\n") == 1
    assert SECRET not in done.stderr and "Traceback" not in done.stderr


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    assert main(["send", url, "orders", "{oops", "--json"]) == 2
    assert capsys.readouterr().err.startswith("msgbus: error: BODY is not valid JSON")
    assert main(["send", url, "orders", "x", "--header", "no-equals-sign"]) == 2
    assert main(["consume", url, "orders", "--url", url]) == 2
    assert "give the URL once" in capsys.readouterr().err
    assert main(["send", url, "bad name!", "x"]) == 2
    assert main(["consume", url, "orders", "--bogus"]) == 2
    assert main([]) == 2


# --- send / consume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_send_then_consume_roundtrip_exact(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url() if kind == "memory" else f"sqlite:///{tmp_path / 'bus.db'}"
    assert main(["send", url, "orders", '{"n": 7}', "--json", "--count", "5", "--key", "k1", "--header", "a=1"]) == 0
    out, err = capsys.readouterr()
    sent = out.split()
    assert len(sent) == 5 and len(set(sent)) == 5
    assert "sent 5 message(s) to queue 'orders'" in err

    assert main(["consume", url, "orders", "--count", "5", "--json-lines"]) == 0
    out, err = capsys.readouterr()
    got = json_lines(out)
    assert sorted(str(m["id"]) for m in got) == sorted(sent)
    assert all(m["body"] == {"n": 7} and m["key"] == "k1" and m["headers"] == {"a": "1"} for m in got)
    assert all(m["attempt"] == 1 for m in got)
    assert "received 5 message(s)" in err

    # They were acked: nothing is left.
    assert main(["consume", url, "orders", "--idle", "0.3"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "received 0 message(s)" in err


def test_human_output_and_bodies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    assert main(["send", url, "q", "plain text", "--header", "source=cli"]) == 0
    assert main(["send", url, "q", "[1, 2]", "--json"]) == 0
    capsys.readouterr()
    assert main(["consume", url, "q", "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("#1 id=") and "attempt=1 key=- source=cli" in lines[0]
    assert lines[1] == "  plain text"
    assert lines[3] == "  [1, 2]"


def test_send_reads_stdin_in_a_subprocess(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    assert cli("send", url, "q", "-", "--json", cwd=tmp_path, stdin='{"from": "stdin"}').returncode == 0
    assert cli("send", url, "q", "-", cwd=tmp_path, stdin="line one\nline two\n").returncode == 0
    done = cli("consume", url, "q", "--count", "2", "--json-lines", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bodies = [m["body"] for m in json_lines(done.stdout)]
    assert bodies == [{"from": "stdin"}, "line one\nline two\n"]


def test_url_falls_back_to_msgbus_url(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    monkeypatch.setenv("MSGBUS_URL", url)
    assert main(["send", "orders", "hi", "--count", "3"]) == 0
    assert main(["consume", "--url", url, "orders", "--count", "3"]) == 0
    assert main(["consume", "orders", "--idle", "0.2"]) == 0
    err = capsys.readouterr().err
    assert f"sent 3 message(s) to queue 'orders' on {url}" in err
    assert "received 3 message(s)" in err and "received 0 message(s)" in err


def test_no_ack_leaves_messages_for_the_next_consumer(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    assert main(["send", url, "q", "x", "--count", "4"]) == 0
    capsys.readouterr()
    assert main(["consume", url, "q", "--count", "3", "--no-ack", "--json-lines"]) == 0
    out, err = capsys.readouterr()
    assert len(json_lines(out)) == 3 and "3 left on the queue" in err
    assert main(["consume", url, "q", "--count", "4", "--json-lines"]) == 0
    got = json_lines(capsys.readouterr().out)
    assert sorted(int(str(m["attempt"])) for m in got) == [1, 2, 2, 2]


def test_topic_fan_out_and_tail(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    for sub in ("audit", "mail"):  # a subscription receives what is published after it exists
        assert main(["tail", url, "events", "--subscription", sub, "--idle", "0.1"]) == 0
    assert main(["send", url, "events", "hello", "--topic", "--count", "3"]) == 0
    capsys.readouterr()
    assert main(["tail", url, "events", "--subscription", "audit", "--count", "3", "--json-lines"]) == 0
    assert [m["body"] for m in json_lines(capsys.readouterr().out)] == ["hello"] * 3
    assert main(["consume", url, "events", "--subscription", "mail", "--idle", "0.3", "--json-lines"]) == 0
    assert len(json_lines(capsys.readouterr().out)) == 3


def test_dead_letters_show_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with msgbus.sync.connect(url) as bus:
        bus.producer("q").send("bad order")
        (msg,) = bus.consumer("q").receive(timeout=5)
        msg.reject("no such customer")
    assert main(["consume", url, "q", "--dead-letters", "--count", "1", "--json-lines"]) == 0
    (dead,) = json_lines(capsys.readouterr().out)
    assert dead["body"] == "bad order"
    assert isinstance(dead["headers"], dict)
    assert dead["headers"][msgbus.HEADER_DEAD_LETTER_REASON] == "no such customer"


# --- graceful stop in a real process ----------------------------------------------------------------


def start_consumer(url: str, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "msgbus", "consume", url, "jobs", "--json-lines", *extra],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_releases_held_messages_for_the_next_consumer(tmp_path: Path) -> None:
    # A long lease: a message seen again right away was released by the stopped consumer, not expired.
    url = f"sqlite:///{tmp_path / 'bus.db'}?visibility_timeout=120"
    assert cli("send", url, "jobs", "x", "--count", "10", cwd=tmp_path).returncode == 0
    proc = start_consumer(url, tmp_path, "--no-ack")
    assert proc.stdout is not None
    first = [json.loads(proc.stdout.readline()) for _ in range(10)]  # all 10 held, none acked
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err
    assert "received 10 message(s) from queue 'jobs'; 10 left on the queue" in err

    done = cli("consume", url, "jobs", "--count", "10", "--json-lines", cwd=tmp_path)
    again = json_lines(done.stdout)
    assert sorted(str(m["id"]) for m in again) == sorted(str(m["id"]) for m in first)
    assert {m["attempt"] for m in again} == {2}


def test_sigterm_while_consuming_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bus.db'}?visibility_timeout=120"
    sent = cli("send", url, "jobs", "x", "--count", "200", cwd=tmp_path).stdout.split()
    assert len(sent) == 200
    with start_consumer(url, tmp_path) as proc:  # closes the pipes on exit
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline())  # it is consuming
        proc.send_signal(signal.SIGTERM)
        # Read through the same buffered file object as readline() above: communicate() would read the raw
        # pipe and miss lines already sitting in that buffer.
        out = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, err
    printed = [str(first["id"])] + [str(m["id"]) for m in json_lines(out)]
    acked = len(printed)  # every printed message was acked, the rest released
    assert f"received {acked} message(s)" in err and "Traceback" not in err

    rest = cli("consume", url, "jobs", "--idle", "0.5", "--json-lines", cwd=tmp_path)
    left = [str(m["id"]) for m in json_lines(rest.stdout)]
    assert len(left) == 200 - acked  # exactly the unconsumed ones, and no message twice
    assert not set(left) & set(printed)


# --- info, schemes, contract ------------------------------------------------------------------------


def test_info_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "memory://"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:] if line.strip()}
    assert rows["ordering"] == ["per_key"] and rows["persistence"] == ["none"]
    assert main(["info", "sqlite:///./x.db?visibility_timeout=7", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["capabilities"]["lock_duration"] == 7.0 and data["capabilities"]["persistence"] == "disk"


def test_schemes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemes"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "msgbus._memory:create" in rows["memory"] and "msgbus._sqlite:create" in rows["sqlite"]
    assert set(msgbus.schemes()) <= set(rows)


def test_contract_delegates_to_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 1

    fake = types.ModuleType("msgbus.testing._cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msgbus.testing._cli", fake)
    assert main(["contract", "memory://", "--quick", "--only", "fan_out", "--extra-flag"]) == 1
    assert main(["contract", "memory://", "--jobs", "4"]) == 1
    assert seen == [["memory://", "--quick", "--only", "fan_out", "--extra-flag"], ["memory://", "--jobs", "4"]]


def test_contract_runs_the_real_suite(capsys: pytest.CaptureFixture[str]) -> None:
    # A 1 s lock: the checks' quiet windows wait out the lock (36 s each at memory's 30 s default).
    url = memory_url() + "?visibility_timeout=1"
    assert main(["contract", url, "--quick", "--only", "fan-out"]) == 0
    out = capsys.readouterr().out
    assert "1 passed, 0 failed" in out
    # It says what it proved the promise with: the options given and the adapter's defaults.
    assert out.count("options: topology=declare (default), visibility_timeout=1") == 2
    assert "max_message_size=1048576 (default)" in out
    assert main(["contract", url, "--quick", "--jobs", "3", "--only", "fan-out", "--only", "batches"]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out
    assert main(["contract", memory_url(), "--jobs", "0"]) == 2
    assert main(["contract", memory_url(), "--only", "no-such-check"]) == 2
    assert main(["contract"]) == 2  # the URL is required


# --- nothing from the wire reaches the terminal raw; no password reaches it at all ----------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202etxt.exe\r\n#2 id=forged"


def test_consume_escapes_control_characters_and_terminal_sequences(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with msgbus.sync.connect(url) as bus:
        bus.producer("q").send(ESCAPES, headers={"h\x1b[1m": ESCAPES}, key=ESCAPES, message_id="id\x1b[5m")
        bus.producer("q").send(ESCAPES.encode() + b"\xff")  # bytes shown as text where they decode
        bus.producer("q").send({"json": ESCAPES})
    assert main(["consume", url, "q", "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e\r"), repr(out)
    assert out.count("\n") == 6, "each message is its meta line and its body line, whatever it holds"
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out


def test_json_lines_escape_what_a_terminal_would_act_on(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with msgbus.sync.connect(url) as bus:
        bus.producer("q").send(ESCAPES, headers={"h": ESCAPES})
        [msg] = bus.consumer("q").receive(1, 1.0)
        msg.reject(ESCAPES)
    assert main(["consume", url, "q", "--dead-letters", "--count", "1", "--json-lines"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e\r")
    [record] = json_lines(out)
    assert record["body"] == ESCAPES and record["headers"]["h"] == ESCAPES  # type: ignore[index]
    reason = str(record["headers"]["x-msgbus-dead-letter-reason"])  # type: ignore[index]
    assert reason.startswith("\ufffd]0;pwned\ufffd") and "\x9b31m\u202etxt.exe\ufffd\n#2" in reason


def test_log_lines_are_escaped_too(capsys: pytest.CaptureFixture[str]) -> None:
    url = memory_url()
    with msgbus.sync.connect(url) as bus:
        bus.producer("q").send(b"[[[", content_type="application/json", message_id="evil\x1b[2Jid")
    assert main(["consume", url, "q", "--idle", "0.5"]) == 0  # undecodable: dead-lettered, logged
    err = capsys.readouterr().err
    assert "evil\\x1b[2Jid" in err and "\x1b" not in err


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://svc:12345/{SECRET}@host/",  # '/' in the password: the host was taken to be 'svc'
        f"redis://:{SECRET}#frag@host/0",  # '#': the password was echoed as a bad port
        f"amqp://user:a@{SECRET}@host/",
        f"amqp://user:{SECRET}?x@host/",
        f"amqp://user:{SECRET}@host:notaport/",
        f"amqp://user:{SECRET}@host:99999/",
        f"amqp://user:[{SECRET}@host/",
        f"memory://x?password={SECRET}",
        f"memory://x?sasl_password={SECRET}&visibility_timeout=bad",
    ],
)
def test_info_never_shows_a_password(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["info", url])
    out, err = capsys.readouterr()
    assert status in (0, 2) and SECRET not in out + err, out + err
    status = main(["info", url, "--json"])
    out, err = capsys.readouterr()
    assert SECRET not in out + err
