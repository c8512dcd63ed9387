"""Sans-I/O cores must not import trio, socket or time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORES = [
    "peerd/wire.py", "peerd/identity.py", "peerd/handshake.py", "peerd/errors.py",
    "peerd/record.py", "collectives/api.py",
]
FORBIDDEN = {"trio", "socket", "time", "asyncio", "threading"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("rel", CORES)
def test_core_is_sans_io(rel: str) -> None:
    path = ROOT / rel
    if not path.exists():
        pytest.fail(f"core module {rel} is missing")
    assert not imported_roots(path) & FORBIDDEN, rel
