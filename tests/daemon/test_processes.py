"""Real ``peerd`` processes on loopback: start, bootstrap, status, signals, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import peerd
from peerd import aead
from peerd.client import DaemonUnavailable
from peerd.daemon.launcher import DaemonProcess, start_daemon, stop_all
from peerd.errors import ConfigError, Timeout
from peerd.identity import SwarmKey


def test_keygen_writes_private_identity_and_never_overwrites(cli, short_dir: Path) -> None:
    out = short_dir / "id"
    r = cli("keygen", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    before = out.read_bytes()
    r = cli("keygen", "--out", str(out))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert out.read_bytes() == before


def test_status_and_peers_show_the_whole_swarm(cli, swarm: list[DaemonProcess]) -> None:
    ids = {d.peer_id for d in swarm}
    for d in swarm:
        r = cli("status", "--json", "--socket", str(d.socket))
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["peer_id"] == d.peer_id
        assert status["listen"] == [d.listen]
        assert {x["peer_id"] for x in status["peers"]} == ids - {d.peer_id}
        assert all(x["path"] for x in status["peers"])
    r = cli("peers", "--socket", str(swarm[0].socket))
    assert r.returncode == 0, r.stderr
    assert swarm[1].peer_id in r.stdout and swarm[2].peer_id in r.stdout
    r = cli("status", "--socket", str(swarm[0].socket))
    assert f"peer id:    {swarm[0].peer_id}" in r.stdout
    # Every member shows the fingerprint that `swarm-key show` prints for the file.
    key = swarm[0].data_dir.parent / "swarm.key"
    shown = cli("swarm-key", "show", str(key))
    assert shown.returncode == 0, shown.stderr
    fingerprint = SwarmKey.load(key).fingerprint
    assert shown.stdout == f"{fingerprint}  {key}\n"
    assert f"swarm:      {fingerprint} " in r.stdout
    for d in swarm:
        r = cli("status", "--json", "--socket", str(d.socket))
        assert json.loads(r.stdout)["swarm"] == fingerprint


def test_dial_to_a_silent_address_blames_the_address_not_the_daemon(
        cli, swarm: list[DaemonProcess]) -> None:
    # A UDP port that is bound (so nobody else takes it) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        # The client's default timeout (10 s) equals the daemon's handshake
        # timeout: the daemon's reason must still be what the user reads.
        r = cli("connect", addr, "--socket", str(swarm[0].socket))
    assert r.returncode == 1
    assert r.stderr.startswith(f"peerd: Timeout: no answer from {addr} within 10 s: check the "
                               "address and port"), r.stderr
    assert "UDP" in r.stderr and "peerd daemon" not in r.stderr


def test_dial_to_another_swarm_names_both_fingerprints_to_compare(
        cli, swarm: list[DaemonProcess], short_dir: Path) -> None:
    other_key = short_dir / "other.key"
    SwarmKey.generate().save(other_key)
    stranger = start_daemon(short_dir / "stranger", other_key)
    try:
        r = cli("connect", stranger.listen, "--socket", str(swarm[0].socket))
        assert r.returncode == 1
        ours = SwarmKey.load(swarm[0].data_dir.parent / "swarm.key").fingerprint
        assert "a node of another swarm" in r.stderr, r.stderr
        assert f"this node's has fingerprint {ours}" in r.stderr
        assert "peerd swarm-key show" in r.stderr
        with swarm[0].client() as c:
            assert stranger.peer_id not in {x.peer_id for x in c.peers()}
    finally:
        assert stranger.stop() == 0


def test_client_status_and_peers(swarm: list[DaemonProcess]) -> None:
    with peerd.connect(swarm[1].socket) as client:
        assert client.peer_id == swarm[1].peer_id
        status = client.status()
        assert status.pid == swarm[1].pid
        assert {x.peer_id for x in client.peers()} == {swarm[0].peer_id, swarm[2].peer_id}
        # Every daemon here has pyaegis, so each session chose this CPU's fastest.
        assert {x.cipher for x in client.peers()} == {aead.built()[0]}
    with peerd.connect(swarm[0].socket) as client:
        # node0 dialled both others, and each told it the address it saw
        assert all(x.observed.startswith("127.0.0.1:") for x in client.peers())


def test_default_socket_comes_from_environment(swarm: list[DaemonProcess],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERD_SOCKET", str(swarm[2].socket))
    with peerd.connect() as client:
        assert client.peer_id == swarm[2].peer_id


def test_metrics_endpoint_serves_prometheus_text(swarm: list[DaemonProcess]) -> None:
    with swarm[0].client() as client:
        host, _, port = client.status().metrics.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200")
    assert "peerd_node_peers 2" in body.splitlines()
    assert 'peerd_peers_by_path{path="direct"} 2' in body
    assert "# TYPE peerd_node_handshakes_ok" in body


def test_bootstrap_then_sigterm_leaves_cleanly(swarm: list[DaemonProcess], short_dir: Path,
                                                wait_until) -> None:
    key = swarm[0].data_dir.parent / "swarm.key"
    d = start_daemon(short_dir / "late", key, bootstrap=(swarm[0].listen,))
    try:
        def seen_by_first() -> bool:
            with swarm[0].client() as c:
                return d.peer_id in {x.peer_id for x in c.peers()}

        wait_until(seen_by_first)
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(d.data_dir.stat().st_mode) == 0o700
        assert d.stop(signal.SIGTERM) == 0
        assert not d.socket.exists()
        log = d.log_path.read_text()
        assert "daemon.stopping signal=SIGTERM" in log and "daemon.stopped" in log
        # peerd's events, not aioquic's chatter about each connection it made
        assert "peer.connected" in log and " quic " not in log, log
        # the survivor learns of the departure from the close, not from a timeout
        wait_until(lambda: not seen_by_first(), timeout=5.0)
    finally:
        d.stop(signal.SIGKILL)


def test_join_nobody_admits_says_how_to_join_or_found_and_leaves_no_phantom_run(
        swarm: list[DaemonProcess], short_dir: Path) -> None:
    key = swarm[0].data_dir.parent / "swarm.key"
    d = start_daemon(short_dir / "lone", key)
    try:
        with d.client(run="lonely") as client:
            for _ in range(2):  # the second join must wait again, not pass for joined
                with pytest.raises(Timeout) as caught:
                    client.join(timeout=1.0)
                text = str(caught.value)
                assert "not admitted to run 'lonely' within 1 s: no peer is connected" in text
                assert "members=[...]" in text
                assert client.status().runs == ()
            with pytest.raises(ConfigError, match=r"join it first \(client.join\(\)"):
                client.all_reduce(np.ones(3, np.float32))
            client.connect_peer(swarm[0].listen)  # peers (the DHT finds the rest), none a member
            with pytest.raises(Timeout, match=r"none of the \d+ connected peer\(s\) admitted it"):
                client.join(timeout=1.0)
            # Founding alone works after all that, and averages over exactly itself.
            view = client.join([d.peer_id])
            assert view.members == (d.peer_id,)
            data = np.arange(5, dtype=np.float32)
            result = client.all_reduce(data)
            assert result.participants == (d.peer_id,)
            assert np.array_equal(data, np.arange(5, dtype=np.float32))
    finally:
        assert d.stop() == 0


def test_killed_daemon_makes_client_fail_fast(swarm: list[DaemonProcess],
                                              short_dir: Path) -> None:
    key = swarm[0].data_dir.parent / "swarm.key"
    d = start_daemon(short_dir / "victim", key)
    try:
        client = d.client()
        os.kill(d.pid, signal.SIGSTOP)  # the next request is surely in flight at the kill
        fut = client._conn.request(lambda r: peerd.client.conn.p.StatusRequest(r))
        time.sleep(0.1)
        assert not fut.done()
        t0 = time.monotonic()
        os.kill(d.pid, signal.SIGKILL)
        with pytest.raises(DaemonUnavailable, match="stopped or crashed"):
            fut.result(timeout=10)
        with pytest.raises(DaemonUnavailable):
            client.status()
        assert time.monotonic() - t0 < 2.0
        client.close()
    finally:
        d.stop(signal.SIGKILL)
    with pytest.raises(DaemonUnavailable, match="no peerd daemon"):
        peerd.connect(d.socket)


def test_other_user_cannot_connect(swarm: list[DaemonProcess]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another uid")
    path = os.fspath(swarm[0].socket)
    pid = os.fork()
    if pid == 0:  # child: become nobody and try to connect
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


class _Unstoppable(DaemonProcess):
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        raise OSError("stuck")


def test_stop_all_waits_for_every_daemon_even_when_one_fails(short_dir: Path) -> None:
    def child(cls: type[DaemonProcess]) -> DaemonProcess:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return cls(proc, short_dir, short_dir / "x.sock", short_dir / "x.log")

    stuck, others = child(_Unstoppable), [child(DaemonProcess), child(DaemonProcess)]
    try:
        with pytest.raises(OSError, match="stuck"):
            stop_all([stuck, *others])
        # The stuck one did not keep the rest from being stopped and reaped.
        assert [d.proc.returncode for d in others] == [-signal.SIGTERM] * 2
    finally:
        for d in (stuck, *others):
            if d.proc.poll() is None:
                os.kill(d.pid, signal.SIGKILL)
            d.proc.wait()
