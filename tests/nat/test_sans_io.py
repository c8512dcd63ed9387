"""Every NAT core module is sans-I/O: no trio, socket, time or asyncio imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORES = ["endpoint", "observed", "classify", "probe", "punch", "bucket", "relay", "strategy"]
FORBIDDEN = {"trio", "socket", "time", "asyncio", "select", "threading", "subprocess", "os"}
NAT_DIR = Path(__file__).resolve().parents[2] / "nat"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", CORES)
def test_core_imports_no_io(name: str) -> None:
    roots = imported_roots(NAT_DIR / f"{name}.py")
    assert roots, "parsed no imports at all: wrong file?"
    assert not roots & FORBIDDEN, f"nat/{name}.py imports {sorted(roots & FORBIDDEN)}"


def test_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom trio import sleep\n")
    assert imported_roots(bad) >= {"time", "trio"}
