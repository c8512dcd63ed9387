"""Fixtures for daemon tests: short temp dirs (Unix socket paths are limited to
107 bytes) and a module-wide swarm of real daemon processes on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peerd.daemon.launcher import DaemonProcess, launch_swarm, stop_all

CLI_TIMEOUT = 60


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pdt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def swarm() -> Iterator[list[DaemonProcess]]:
    d = Path(tempfile.mkdtemp(prefix="pds", dir="/tmp"))
    daemons = launch_swarm(3, d, extra=("--metrics", "127.0.0.1:0"))
    yield daemons
    stop_all(daemons)
    shutil.rmtree(d, ignore_errors=True)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerd.cli", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env=env, stdin=subprocess.DEVNULL)


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, poll: float = 0.05) -> None:
    """Poll a cross-process condition (no event crosses process boundaries)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., None]:
    return wait_until
