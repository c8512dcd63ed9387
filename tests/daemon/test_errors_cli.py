"""Bad configuration and bad key files: one clear line, exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peerd.cli import main
from peerd.identity import Identity, SwarmKey


@pytest.fixture
def key(short_dir: Path) -> Path:
    path = short_dir / "swarm.key"
    SwarmKey.generate().save(path)
    return path


def start(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["start", *args])
    return code, capsys.readouterr().err


CASES = [
    ('listen = "127.0.0.1:0"\nfrobnicate = 1\n', "unknown key 'frobnicate'"),
    ("listen = 4747\n", "listen must be a string"),
    ('listen = "no-port-here"\n', "must look like HOST:PORT"),
    ('bootstrap = "1.2.3.4:5"\n', "bootstrap must be a list"),
    ('bootstrap = ["1.2.3.4:99999"]\n', "between 0 and 65535"),
    ("[limits]\nmax_peers = 0\n", "limits.max_peers = 0 is out of range"),
    ('[limits]\nmax_peers = "many"\n', "limits.max_peers must be an integer"),
    ("[limits]\nmax_friends = 3\n", "unknown key limits.max_friends"),
    ('log_level = "chatty"\n', "log_level 'chatty' is not one of"),
    ("listen = \n", "not valid TOML"),
    ("data_channels = 0\n", "data_channels = 0 is out of range"),
    ('data_channels = "two"\n', "data_channels must be an integer"),
    ("data_channels = true\n", "data_channels must be an integer"),
    ('data_threads = "yes"\n', "data_threads must be true or false"),
    ("data_threads = 1\n", "data_threads must be true or false"),
    ('data_ciphers = "aegis128l"\n', "data_ciphers must be a list"),
    ("data_ciphers = [1]\n", "data_ciphers must be a list of cipher names"),
    ('data_ciphers = ["rot13"]\n', "rot13: not a cipher this install has; use some of aegis128x"),
    ("data_ciphers = []\n", "no cipher: not a cipher this install has"),
    ("data_congestion = 1\n", "data_congestion must be a string"),
    ('data_congestion = "BBR v2"\n', "data_congestion = 'BBR v2' is not a congestion control "
     "name; use 'cubic', 'bbr'"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_bad_config_names_the_field(capsys: pytest.CaptureFixture[str], short_dir: Path,
                                    key: Path, text: str, expected: str) -> None:
    cfg = short_dir / "peerd.toml"
    cfg.write_text(text)
    code, err = start(capsys, "--config", str(cfg), "--swarm-key", str(key),
                      "--data-dir", str(short_dir / "d"))
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_unreadable_config(capsys: pytest.CaptureFixture[str], short_dir: Path) -> None:
    code, err = start(capsys, "--config", str(short_dir / "missing.toml"))
    assert code == 2 and "cannot read it" in err and "missing.toml" in err


def test_missing_swarm_key_is_never_invented(capsys: pytest.CaptureFixture[str],
                                             short_dir: Path) -> None:
    data = short_dir / "d"
    code, err = start(capsys, "--data-dir", str(data), "--listen", "127.0.0.1:0")
    assert code == 2
    assert "peerd swarm-key new" in err and "organiser" in err
    assert not (data / "swarm.key").exists()


def test_group_readable_identity_is_refused(capsys: pytest.CaptureFixture[str],
                                            short_dir: Path, key: Path) -> None:
    ident = short_dir / "id"
    Identity.generate().save(ident)
    os.chmod(ident, 0o640)
    code, err = start(capsys, "--identity", str(ident), "--swarm-key", str(key),
                      "--data-dir", str(short_dir / "d"), "--listen", "127.0.0.1:0")
    assert code == 2 and f"chmod 600 {ident}" in err


def test_world_readable_swarm_key_is_refused(capsys: pytest.CaptureFixture[str],
                                             short_dir: Path, key: Path) -> None:
    os.chmod(key, 0o644)
    code, err = start(capsys, "--swarm-key", str(key), "--data-dir", str(short_dir / "d"),
                      "--listen", "127.0.0.1:0")
    assert code == 2 and "readable by group or others" in err


def test_bad_flag_address_through_the_real_cli(cli, short_dir: Path, key: Path) -> None:
    r = cli("start", "--swarm-key", str(key), "--data-dir", str(short_dir / "d"),
            "--listen", "localhost")
    assert r.returncode == 2
    assert r.stderr.strip() == ("peerd: error: listen 'localhost' must look like HOST:PORT, "
                                "e.g. 127.0.0.1:4747")


def test_second_daemon_on_same_data_dir_is_refused(cli, short_dir: Path, key: Path) -> None:
    from peerd.daemon.launcher import start_daemon

    d = start_daemon(short_dir / "d", key)
    try:
        r = cli("start", "--swarm-key", str(key), "--data-dir", str(short_dir / "d"),
                "--listen", "127.0.0.1:0")
        assert r.returncode == 2 and "already running" in r.stderr
        assert d.socket.exists()  # the running daemon's socket is left alone
    finally:
        assert d.stop() == 0
