"""The lab cleans up after itself and its shaping knobs work."""

from __future__ import annotations

import os
import subprocess

import lab_agents as agents
import pytest
from netns import LAB_TAG, Lab, LabError, NatKind, sweep_stale

pytestmark = pytest.mark.lab


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_close_stops_processes_and_removes_namespaces(lab: Lab) -> None:
    host = lab.public_host("h1")
    router = lab.nat("r1", NatKind.EIM)
    behind = lab.host_behind(router, "h2")
    assert set(lab.namespaces()) <= netns_names()
    proc = lab.spawn(host, ["sleep", "300"])
    probe = lab.spawn_py(behind, agents.count_udp, 40500, 300.0)
    probe.wait_ready()
    names = lab.namespaces()
    lab.close()
    assert proc.poll() is not None and probe.proc.poll() is not None
    assert not set(names) & netns_names()
    lab.close()  # idempotent


def test_a_failing_body_still_tears_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        lab = Lab()
        try:
            lab.public_host("x")
            names = lab.namespaces()
            raise RuntimeError("boom")
        finally:
            lab.close()
    assert names and not set(names) & netns_names()


def test_sweep_removes_only_namespaces_of_dead_runs(lab: Lab) -> None:
    dead = f"{LAB_TAG}999999999n0-old"  # no such pid
    subprocess.run(["ip", "netns", "add", dead], check=True)
    try:
        removed = sweep_stale()
        assert dead in removed
        assert set(lab.namespaces()) <= netns_names()  # our live lab is untouched
    finally:
        subprocess.run(["ip", "netns", "del", dead], capture_output=True)


def test_run_py_reports_errors_with_diagnostics(lab: Lab) -> None:
    host = lab.public_host("h1")
    # A bad argument makes the child raise; the error carries its traceback.
    with pytest.raises(LabError, match="gave no result") as info:
        lab.run_py(host, agents.observe, "not-a-port", [], timeout=10)
    assert "Traceback" in str(info.value) and "rc=1" in str(info.value)


def test_tbf_limits_throughput(lab: Lab) -> None:
    sender = lab.public_host("s")
    sink = lab.public_host("k")
    lab.limit_rate(sender, "20mbit")
    server = lab.spawn_py(sink, agents.tcp_sink, 40600, 30.0)
    server.wait_ready()
    seconds = lab.run_py(sender, agents.tcp_source, [sink.ip, 40600], 2_500_000)
    received = server.result(30)
    assert received == 2_500_000
    # 20 Mbit/s is 2.5 MB/s: 2.5 MB minus the 256 kB burst needs ~0.9 s.
    assert seconds >= 0.8, seconds


def test_gate_skips_non_root_and_fails_root_without_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        netns.require_lab()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "missing_tools", lambda: ["nft"])
    with pytest.raises(pytest.fail.Exception, match="nft not installed"):
        netns.require_lab()
