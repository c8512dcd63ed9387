"""Text the CLI prints for ``peerd status`` and ``peerd peers`` (pure formatting)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from peerd.daemon import protocol as p


def _rate(bps: float) -> str:
    if bps <= 0:
        return "-"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def peers_table(peers: tuple[p.PeerInfo, ...]) -> str:
    if not peers:
        return "no peers connected"
    rows = [("PEER", "ADDRESS", "PATH", "THROUGHPUT", "SEES US AT", "CIPHER")]
    rows += [(x.peer_id, x.address, x.path, _rate(x.throughput_bps), x.observed or "-",
              x.cipher or "-") for x in peers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def status_text(s: p.StatusReply) -> str:
    lines = [
        f"peer id:    {s.peer_id}",
        f"swarm:      {s.swarm} (swarm key fingerprint)",
        f"pid:        {s.pid}   uptime {s.uptime_s:.0f} s",
        f"listening:  {', '.join(s.listen) or '-'}",
        f"observed:   {', '.join(s.observed) or '-'}",
        f"NAT:        {s.nat or 'unknown'}",
        f"runs:       {', '.join(s.runs) or '-'}",
        f"metrics:    {s.metrics or 'off'}",
        f"peers:      {len(s.peers)}",
    ]
    if s.peers:
        lines += ["", peers_table(s.peers)]
    return "\n".join(lines)


def as_json(value: Any) -> str:
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)
                    if f.name != "req_id"}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, bytes):
            return v.hex()
        return v

    return json.dumps(plain(value), indent=2, sort_keys=True)
