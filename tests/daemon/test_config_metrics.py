"""Pure parts of the daemon: config merging and validation, metrics rendering."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.config import NodeConfig
from peerd.daemon.config import check_values, default_data_dir, default_socket, resolve
from peerd.daemon.metrics import Sample, answer, parse_request, render
from peerd.errors import ConfigError

ENV = {"HOME": "/home/ada"}


def test_defaults_follow_xdg() -> None:
    assert default_data_dir(ENV) == Path("/home/ada/.local/share/peerd")
    assert default_data_dir({**ENV, "XDG_DATA_HOME": "/x"}) == Path("/x/peerd")
    assert default_data_dir({**ENV, "PEERD_DATA_DIR": "/d"}) == Path("/d")
    assert default_socket({**ENV, "PEERD_SOCKET": "/s.sock"}) == Path("/s.sock")
    cfg = resolve({}, {}, ENV)
    assert cfg.data_dir == Path("/home/ada/.local/share/peerd")
    assert cfg.identity == cfg.data_dir / "identity"
    assert cfg.swarm_key == cfg.data_dir / "swarm.key"
    assert cfg.socket == cfg.data_dir / "control.sock"
    assert cfg.listen == ("0.0.0.0", 4747) and cfg.metrics is None
    assert cfg.data_channels == NodeConfig().data_channels
    assert cfg.data_threads is None  # decided by the cores the daemon may use
    assert cfg.data_ciphers is None  # every cipher installed, fastest first
    assert cfg.data_congestion == NodeConfig().data_congestion == "cubic"


def test_flags_win_over_file_values(tmp_path: Path) -> None:
    file_values = check_values({"listen": "127.0.0.1:1000", "bootstrap": ["10.0.0.1:1"],
                                "data_dir": "state", "identity": "me.key",
                                "limits": {"max_peers": 9}, "data_channels": 8,
                                "data_threads": False, "data_ciphers": ["aegis128l"],
                                "data_congestion": "bbr"},
                               "f.toml",
                               base=tmp_path)
    cfg = resolve(file_values, {"listen": "127.0.0.1:2000", "bootstrap": None}, ENV)
    assert cfg.listen == ("127.0.0.1", 2000)
    assert cfg.bootstrap == (("10.0.0.1", 1),)
    assert cfg.data_dir == tmp_path / "state"  # relative to the config file
    assert cfg.identity == tmp_path / "state" / "me.key"  # relative to the data dir
    assert cfg.limits.max_peers == 9
    assert cfg.data_threads is False
    assert cfg.data_ciphers == ("aegis128l",)
    assert cfg.data_channels == 8
    assert cfg.data_congestion == "bbr"


def test_overlong_socket_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        resolve({"data_dir": "/" + "x" * 120}, {}, ENV)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12),
                       st.one_of(st.integers(), st.text(max_size=8), st.booleans(),
                                 st.lists(st.integers(), max_size=2)), max_size=4))
def test_any_file_content_is_accepted_or_a_config_error(raw: dict[str, object]) -> None:
    try:
        resolve(check_values(raw, "f.toml"), {}, ENV)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@dataclass(frozen=True)
class Stats:
    peers: int
    handshakes_ok: int
    label: str


class FakeNode:
    def statistics(self) -> Stats:
        return Stats(peers=2, handshakes_ok=7, label="x")

    def peers(self) -> list[str]:
        return ["a", "b"]

    def peer_path(self, peer: str) -> str:
        return "tcp" if peer == "a" else "relay"


def test_render_is_prometheus_text() -> None:
    text = render([Sample("a_total", 3, kind="counter", help="things"),
                   Sample("g", 0.25, (("path", 'q"x'),)), Sample("g", 2.0, (("path", "y"),))])
    assert text == ('# HELP a_total things\n# TYPE a_total counter\na_total 3\n'
                    '# TYPE g gauge\ng{path="q\\"x"} 0.25\ng{path="y"} 2\n')


def test_metrics_answer_covers_node_daemon_and_paths() -> None:
    body = answer(b"GET /metrics HTTP/1.0\r\n\r\n", FakeNode(),
                  Counter({"all_reduce_ok": 4, "clients": 1})).decode()
    assert body.startswith("HTTP/1.0 200 OK\r\n")
    lines = body.split("\r\n\r\n", 1)[1].splitlines()
    for line in ("peerd_node_peers 2", "peerd_node_handshakes_ok 7",
                 "peerd_daemon_all_reduce_ok 4", 'peerd_peers_by_path{path="relay"} 1',
                 'peerd_peers_by_path{path="tcp"} 1'):
        assert line in lines
    assert not any("label" in x for x in lines)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200), (b"POST /metrics HTTP/1.0\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400), (b"", 400), (b"GET / FTP/1\r\n\r\n", 400)])
def test_parse_request(head: bytes, status: int) -> None:
    assert parse_request(head)[0] == status


def test_unknown_path_is_404() -> None:
    assert answer(b"GET /secret HTTP/1.0\r\n\r\n", FakeNode(), Counter()).startswith(
        b"HTTP/1.0 404")
