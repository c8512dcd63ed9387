"""Core modules stay sans-I/O: they import neither trio, sockets, time nor sqlite."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE_MODULES = [
    "hlc", "values", "messages", "lww", "orset", "counter", "delta", "log", "sync",
]
FORBIDDEN = {"trio", "socket", "time", "sqlite3", "asyncio", "threading", "selectors"}
CRDT_DIR = Path(__file__).resolve().parents[2] / "crdt"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_io(module: str) -> None:
    tree = ast.parse((CRDT_DIR / f"{module}.py").read_text())
    imported: set[str] = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            imported.add(stmt.module.split(".")[0])
            if stmt.module.startswith("crdt."):
                assert stmt.module.removeprefix("crdt.") in CORE_MODULES, stmt.module
    assert not imported & FORBIDDEN
