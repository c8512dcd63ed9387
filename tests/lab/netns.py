"""Network-namespace NAT lab: real kernels, real NATs (nftables), as root.

Topology: one ``inet`` namespace holds a bridge that plays the internet
(203.0.113.0/24, documentation addresses). Public hosts and the WAN side of
each NAT router attach to it by veth pairs. Each router owns a LAN bridge
(10.K.0.1/24) and hosts behind it route through it. Routers are nftables NATs:

* ``NatKind.EIM`` - masquerade (endpoint-independent mapping, port kept when
  free) with address-and-port-dependent filtering: the home router.
* ``NatKind.SYMMETRIC`` - ``masquerade fully-random``: a new random public port
  for every destination.

Both drop unsolicited new connections arriving on the WAN in the *input* hook,
as real routers do; without it a punch packet that beats the host's own
outbound packet leaves a conntrack entry and the host's mapping gets another
port (see docs/networking.md section 7).

Every namespace is named ``pdlab<pid>n<k>-<name>``, so concurrent runs never
collide; veth ends are created directly inside namespaces so their names never
touch the root namespace. ``Lab.close()`` stops every process it started (by
pid) and deletes every namespace; it runs from fixture teardown and, as a last
resort, from ``atexit``. ``sweep_stale()`` removes namespaces left by runs whose
process is gone.

Processes: ``spawn`` starts any argv inside a namespace with ``ip netns exec``;
``spawn_py``/``run_py`` run a top-level function of a Python file there
(JSON arguments and result; ``async def`` functions run under trio).
"""

from __future__ import annotations

import atexit
import enum
import ipaddress
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAB_TAG = "pdlab"
INTERNET = ipaddress.ip_network("203.0.113.0/24")
READY = "LAB-READY"
RESULT = "LAB-RESULT "
_CHILD = Path(__file__).with_name("_child.py")
_counter = itertools.count()


class LabError(RuntimeError):
    """A lab command failed; the message holds the command and its stderr."""


class NatKind(enum.Enum):
    EIM = "eim"  # endpoint-independent mapping + address-and-port-dependent filtering
    SYMMETRIC = "symmetric"  # address-and-port-dependent mapping


@dataclass(frozen=True)
class Node:
    """A host. ``ip`` is its own address; ``public_ip`` what the internet sees."""

    name: str
    ns: str
    ip: str
    public_ip: str
    iface: str = "eth0"


@dataclass(frozen=True)
class Router:
    name: str
    ns: str
    kind: NatKind
    wan_ip: str
    lan_net: str  # e.g. "10.3.0"


def missing_tools() -> list[str]:
    return [t for t in ("ip", "nft", "tc") if shutil.which(t) is None]


def require_lab() -> None:
    """Skip (saying why) unless root; as root, fail if a tool is missing, so a
    CI runner that should run lab tests can never skip them silently."""
    import pytest  # here, not at the top: benchmarks use this module without pytest

    if os.geteuid() != 0:
        reason = "NAT lab tests need root (network namespaces, nftables); run the suite as root"
        print(f"\nSKIP lab: {reason}", file=sys.stderr)
        pytest.skip(reason)
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"running as root but {', '.join(missing)} not installed: "
            "apt-get install -y nftables iproute2",
            pytrace=False,
        )


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _router_rules(kind: NatKind) -> str:
    masq = "masquerade fully-random" if kind is NatKind.SYMMETRIC else "masquerade"
    return f"""
table ip nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masq}
  }}
}}
table inet filter {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname != "wan" accept
  }}
}}
"""


class Lab:
    """One lab instance; build it, use it, ``close()`` it (idempotent)."""

    def __init__(self) -> None:
        self.prefix = f"{LAB_TAG}{os.getpid()}n{next(_counter)}"
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._next_public = itertools.count(10)
        self._next_lan = itertools.count(1)
        self._veth = itertools.count()
        self._lan_hosts: dict[str, itertools.count[int]] = {}
        self._closed = False
        atexit.register(self.close)
        self.inet = self._add_ns("inet")
        self._sh(self.inet, "ip", "link", "add", "br0", "type", "bridge")
        self._sh(self.inet, "ip", "link", "set", "br0", "up")

    # ------------------------------------------------------------ building

    def _add_ns(self, name: str) -> str:
        if not re.fullmatch(r"[a-z0-9]{1,16}", name):
            raise ValueError(f"bad lab name {name!r}")
        ns = f"{self.prefix}-{name}"
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._sh(ns, "ip", "link", "set", "lo", "up")
        return ns

    def _sh(self, ns: str, *argv: str, stdin: str | None = None) -> str:
        return _run(["ip", "netns", "exec", ns, *argv], stdin=stdin)

    def _uplink(self, ns: str, iface: str) -> None:
        """A veth from the internet bridge to ``iface`` inside ``ns``."""
        port = f"v{next(self._veth)}"
        _run(["ip", "-n", self.inet, "link", "add", port, "type", "veth",
              "peer", "name", iface, "netns", ns])
        _run(["ip", "-n", self.inet, "link", "set", port, "master", "br0", "up"])

    def _public_ip(self, ip: str | None) -> str:
        chosen = ip or str(INTERNET[next(self._next_public)])
        if ipaddress.ip_address(chosen) not in INTERNET:
            raise ValueError(f"{chosen} is outside the lab internet {INTERNET}")
        return chosen

    def public_host(self, name: str, ip: str | None = None) -> Node:
        ns = self._add_ns(name)
        addr = self._public_ip(ip)
        self._uplink(ns, "eth0")
        self._sh(ns, "ip", "addr", "add", f"{addr}/{INTERNET.prefixlen}", "dev", "eth0")
        self._sh(ns, "ip", "link", "set", "eth0", "up")
        return Node(name, ns, addr, addr)

    def nat(self, name: str, kind: NatKind, wan_ip: str | None = None) -> Router:
        ns = self._add_ns(name)
        wan = self._public_ip(wan_ip)
        lan = f"10.{next(self._next_lan)}.0"
        self._uplink(ns, "wan")
        self._sh(ns, "ip", "addr", "add", f"{wan}/{INTERNET.prefixlen}", "dev", "wan")
        self._sh(ns, "ip", "link", "set", "wan", "up")
        self._sh(ns, "ip", "link", "add", "lanbr", "type", "bridge")
        self._sh(ns, "ip", "addr", "add", f"{lan}.1/24", "dev", "lanbr")
        self._sh(ns, "ip", "link", "set", "lanbr", "up")
        self._sh(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._sh(ns, "nft", "-f", "-", stdin=_router_rules(kind))
        return Router(name, ns, kind, wan, lan)

    def host_behind(self, router: Router, name: str) -> Node:
        ns = self._add_ns(name)
        hosts = self._lan_hosts.setdefault(router.name, itertools.count(2))
        ip = f"{router.lan_net}.{next(hosts)}"
        port = f"l{next(self._veth)}"
        _run(["ip", "-n", router.ns, "link", "add", port, "type", "veth",
              "peer", "name", "eth0", "netns", ns])
        _run(["ip", "-n", router.ns, "link", "set", port, "master", "lanbr", "up"])
        self._sh(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        self._sh(ns, "ip", "link", "set", "eth0", "up")
        self._sh(ns, "ip", "route", "add", "default", "via", f"{router.lan_net}.1")
        return Node(name, ns, ip, router.wan_ip)

    def limit_rate(self, node: Node, rate: str = "200mbit") -> None:
        """Shape ``node``'s egress with a token bucket filter (tc tbf)."""
        self._sh(node.ns, "tc", "qdisc", "replace", "dev", node.iface, "root", "tbf",
                 "rate", rate, "burst", "256kb", "latency", "50ms")

    def limit_rate_to(self, node: Node, destinations: list[Node], rate: str) -> None:
        """Shape only ``node``'s egress towards ``destinations`` (one slow link
        among fast ones): an htb root whose one class is limited to ``rate``,
        a u32 filter per destination address feeding it, and everything else
        unclassified, which htb sends on unshaped. (htb and u32 are what the
        lab's kernels offer: prio, netem and the police action may be missing.)"""
        dev = ("dev", node.iface)
        self._sh(node.ns, "tc", "qdisc", "replace", *dev, "root", "handle", "1:", "htb")
        self._sh(node.ns, "tc", "class", "replace", *dev, "parent", "1:", "classid", "1:30",
                 "htb", "rate", rate)
        for dst in destinations:
            self._sh(node.ns, "tc", "filter", "add", *dev, "parent", "1:", "protocol", "ip",
                     "prio", "1", "u32", "match", "ip", "dst", f"{dst.public_ip}/32",
                     "flowid", "1:30")

    def drop_percent(self, ns: str, percent: int) -> None:
        """Drop ``percent``% of the packets entering namespace ``ns`` on its
        links (nft numgen); loopback is exempt so local control still works."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be in 0..100")
        rule = 'iifname != "lo" ' + (
            "drop" if percent == 100 else f"numgen random mod 100 < {percent} drop"
        )
        self.clear_loss(ns)
        self._sh(ns, "nft", "-f", "-", stdin=f"""
table inet labloss {{
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    {rule}
  }}
}}
""")

    def clear_loss(self, ns: str) -> None:
        _run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "labloss"],
             check=False)

    def block(self, node: Node, far: list[Node]) -> None:
        """Drop every packet between ``node`` and each of ``far`` (rules in
        ``node``'s namespace, both directions, so neither side hears the
        other); further calls add to the set."""
        addrs = ", ".join(f.ip for f in far)
        self._sh(node.ns, "nft", "-f", "-", stdin=f"""
table inet labblock {{
  chain in {{
    type filter hook input priority -300; policy accept;
    ip saddr {{ {addrs} }} drop
  }}
  chain out {{
    type filter hook output priority -300; policy accept;
    ip daddr {{ {addrs} }} drop
  }}
}}
""")

    def unblock(self, node: Node) -> None:
        """Remove every ``block`` rule of ``node``'s namespace."""
        self._sh(node.ns, "nft", "delete", "table", "inet", "labblock")

    def add_delay(self, node: Node, ms: int) -> bool:
        """netem delay when the kernel has it; returns False (and changes
        nothing) where it does not."""
        proc = subprocess.run(
            ["ip", "netns", "exec", node.ns, "tc", "qdisc", "replace", "dev", node.iface,
             "root", "netem", "delay", f"{ms}ms"], capture_output=True, text=True, timeout=30)
        return proc.returncode == 0

    # ------------------------------------------------------------ processes

    def spawn(self, node: Node | str, argv: list[str]) -> subprocess.Popen[str]:
        """Start ``argv`` inside the namespace; it is stopped by pid in ``close``."""
        ns = node.ns if isinstance(node, Node) else node
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._procs.append(proc)
        return proc

    def spawn_py(self, node: Node | str, fn: Callable[..., Any], *args: Any) -> PyProcess:
        """Run top-level function ``fn`` of its source file inside the namespace."""
        path = sys.modules[fn.__module__].__file__
        if path is None or "." in fn.__qualname__:
            raise ValueError("spawn_py needs a top-level function defined in a file")
        argv = [sys.executable, str(_CHILD), path, fn.__name__, json.dumps(list(args))]
        return PyProcess(self.spawn(node, argv), fn.__name__)

    def run_py(self, node: Node | str, fn: Callable[..., Any], *args: Any,
               timeout: float = 30.0) -> Any:
        return self.spawn_py(node, fn, *args).result(timeout)

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            _stop(proc)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._namespaces.clear()
        atexit.unregister(self.close)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class PyProcess:
    """A Python function running in a namespace; read its READY line and result."""

    def __init__(self, proc: subprocess.Popen[str], name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []

    def _read_until(self, stop: Callable[[str], bool], timeout: float) -> bool:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = self.proc.stdout.readline()
                if not line:  # EOF: the child is exiting; reap it for its status
                    self.proc.wait(timeout=5)
                    return False
                self.lines.append(line.rstrip("\n"))
                if stop(self.lines[-1]):
                    return True
        return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        if not self._read_until(lambda line: line == READY, timeout):
            raise LabError(f"{self.name} never became ready: {self._diagnostics()}")

    def result(self, timeout: float = 30.0) -> Any:
        if not any(line.startswith(RESULT) for line in self.lines):
            self._read_until(lambda line: line.startswith(RESULT), timeout)
        for line in self.lines:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        diagnostics = self._diagnostics()
        _stop(self.proc)
        raise LabError(f"{self.name} gave no result within {timeout}s: {diagnostics}")

    def _diagnostics(self) -> str:
        err = ""
        if self.proc.poll() is not None and self.proc.stderr and not self.proc.stderr.closed:
            err = self.proc.stderr.read()[-3000:]
        return f"rc={self.proc.poll()} stdout={self.lines[-5:]} stderr={err}"


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process no longer exists."""
    removed = []
    out = _run(["ip", "netns", "list"], check=False)
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{LAB_TAG}(\d+)n\d+-[a-z0-9]+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed
