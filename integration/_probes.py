"""Readiness probes: each answers None when the broker really serves clients, else the reason it does not.

An open TCP port is not readiness (RabbitMQ and Redis accept connections while still booting or loading
their data), so each probe speaks the broker's own protocol. Client libraries are used when installed; the
stdlib fallbacks let ``.ci/provision.sh`` run before any client library is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import struct
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

_TIMEOUT = 5.0


def amqp(url: str, host: str, port: int) -> str | None:
    """Ready when an AMQP 0-9-1 connection logs in and opens a channel (aiormq), else on the AMQP greeting."""
    greeting = _amqp_greeting(host, port)
    if greeting is not None or importlib.util.find_spec("aiormq") is None:
        return greeting

    async def login() -> None:
        import aiormq

        connection = await asyncio.wait_for(aiormq.connect(url), _TIMEOUT)
        try:
            await asyncio.wait_for(connection.channel(), _TIMEOUT)
        finally:
            await connection.close()

    # A fresh thread owns its own event loop, so this works even when called from async test code.
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, login()).result()
        except Exception as exc:  # any failure to log in means "not ready yet", with the reason
            return f"AMQP login failed: {type(exc).__name__}: {exc}"
    return None


def _amqp_greeting(host: str, port: int) -> str | None:
    """Send the AMQP 0-9-1 protocol header and expect a Connection.Start method frame back."""
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            head = _recv_exact(sock, 11)
    except OSError as exc:
        return f"AMQP greeting failed: {exc}"
    frame_type, _channel, _size, class_id, method_id = struct.unpack(">BHIHH", head)
    if (frame_type, class_id, method_id) != (1, 10, 10):
        return "no AMQP Connection.Start from the server"
    return None


def redis_ping(host: str, port: int) -> str | None:
    """Ready when PING answers PONG (a Redis still loading its AOF answers -LOADING instead)."""
    if importlib.util.find_spec("redis") is not None:
        import redis

        client = redis.Redis(host=host, port=port, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT)
        try:
            return None if client.ping() else "PING failed"
        except redis.RedisError as exc:
            return f"PING failed: {type(exc).__name__}: {exc}"
        finally:
            client.close()
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"PING failed: {exc}"
    return None if answer.startswith(b"+PONG") else f"PING answered {answer!r}"


def nats_jetstream(host: str, port: int, monitor_port: int) -> str | None:
    """Ready when the client port greets with INFO announcing JetStream and /healthz says JetStream is healthy."""
    try:
        with socket.create_connection((host, port), timeout=_TIMEOUT) as sock:
            line = sock.makefile("rb").readline(65536)
    except OSError as exc:
        return f"no NATS greeting: {exc}"
    if not line.startswith(b"INFO "):
        return f"unexpected NATS greeting {line[:40]!r}"
    if not json.loads(line[5:]).get("jetstream"):
        return "NATS answers but JetStream is not enabled"
    return http_ok(f"http://{host}:{monitor_port}/healthz?js-enabled=true")


def http_ok(url: str) -> str | None:
    """Ready when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}: {exc.read()[:200]!r}"
    except OSError as exc:
        return f"{url} unreachable: {exc}"
    return None if status == 200 else f"{url} answered {status}"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed during the AMQP greeting")
        data += chunk
    return data
