"""Prometheus text-format metrics over a tiny HTTP/1.0 server.

``collect`` turns the node's and the daemon's ``statistics()`` into samples,
``render`` writes the text exposition format, ``parse_request`` reads a request
head; all three are pure. ``serve_metrics`` is the trio driver: one request per
connection, bounded head size and a deadline, then close.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from peerd.errors import ConfigError
from peerd.log import event

log = logging.getLogger("peerd.daemon")

MAX_REQUEST_HEAD = 8 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Subsystems whose statistics() are exported when the node has them.
SUBSYSTEMS = ("dht", "store", "collectives", "engine", "nat", "dataplane")
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    kind: str = "gauge"  # "gauge" | "counter"
    help: str = ""


def _numeric_fields(stats: Any) -> list[tuple[str, float]]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        items = [(f.name, getattr(stats, f.name)) for f in dataclasses.fields(stats)]
    elif isinstance(stats, dict):
        items = list(stats.items())
    else:
        return []
    return [(str(k), float(v)) for k, v in items
            if isinstance(v, int | float) and not isinstance(v, bool)]


def collect(node: Any, daemon_counters: Counter[str]) -> list[Sample]:
    """Samples for everything the node and daemon report right now."""
    out = [Sample("peerd_up", 1.0, help="the daemon is running")]
    for name, value in _numeric_fields(node.statistics()):
        kind = "gauge" if name in ("peers", "pending_handshakes") else "counter"
        out.append(Sample(f"peerd_node_{name}", value, kind=kind))
    for sub in SUBSYSTEMS:
        obj = getattr(node, sub, None)
        stats = getattr(obj, "statistics", None)
        if callable(stats):
            for name, value in _numeric_fields(stats()):
                out.append(Sample(f"peerd_{sub}_{name}", value))
    for name, value in sorted(daemon_counters.items()):
        kind = "gauge" if name == "clients" else "counter"
        out.append(Sample(f"peerd_daemon_{name}", float(value), kind=kind))
    path_of = getattr(node, "peer_path", None)
    paths = Counter(str(path_of(peer)) if path_of else "quic" for peer in node.peers())
    for path, count in sorted(paths.items()):
        out.append(Sample("peerd_peers_by_path", float(count), (("path", path),),
                          help="connected peers by the path their data takes"))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def render(samples: list[Sample]) -> str:
    """The Prometheus text exposition format (0.0.4) of ``samples``."""
    lines: list[str] = []
    seen: set[str] = set()
    for s in samples:
        name = _NAME_OK.sub("_", s.name)
        if name not in seen:
            seen.add(name)
            if s.help:
                lines.append(f"# HELP {name} {s.help}")
            lines.append(f"# TYPE {name} {s.kind}")
        labels = ""
        if s.labels:
            labels = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels) + "}"
        lines.append(f"{name}{labels} {_format_value(s.value)}")
    return "\n".join(lines) + "\n"


def parse_request(head: bytes) -> tuple[int, str]:
    """(status, path) for a request head; status 400/405 for bad requests."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return 400, ""
    if parts[0] not in (b"GET", b"HEAD"):
        return 405, ""
    return 200, parts[1].decode("latin-1")


def response(status: int, body: str, content_type: str = CONTENT_TYPE) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    data = body.encode()
    head = (f"HTTP/1.0 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + data


def answer(head: bytes, node: Any, daemon_counters: Counter[str]) -> bytes:
    status, path = parse_request(head)
    if status != 200:
        return response(status, "bad request\n", "text/plain")
    if path.split("?", 1)[0] not in ("/metrics", "/"):
        return response(404, "try /metrics\n", "text/plain")
    return response(200, render(collect(node, daemon_counters)))


async def _serve_one(stream: trio.SocketStream, node: Any, counters: Counter[str]) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            head = b""
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
                if len(head) > MAX_REQUEST_HEAD:
                    break
            await stream.send_all(answer(head, node, counters))
    except (trio.BrokenResourceError, OSError) as exc:
        event(log, "metrics.client_error", logging.DEBUG, error=exc)
    finally:
        await stream.aclose()


async def serve_metrics(host: str, port: int, node: Any, counters: Counter[str],
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics`` on ``host:port``; reports the bound port via ``task_status``."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {host}:{port} ({exc}); choose another "
                          "--metrics address or port") from None
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)

    busy = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            busy.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _serve_one(stream, node, counters)
        finally:
            busy.release()

    await trio.serve_listeners(handler, listeners)
