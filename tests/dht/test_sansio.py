"""The DHT cores are sans-I/O: they import neither trio, socket nor time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peerd.dht

CORES = ["routing", "lookup", "records", "storage", "service", "messages", "config"]
FORBIDDEN = {"trio", "socket", "time", "asyncio", "select"}


@pytest.mark.parametrize("name", CORES)
def test_core_imports_no_io(name: str) -> None:
    path = Path(peerd.dht.__file__).parent / f"{name}.py"
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{name}.py imports {imported & FORBIDDEN}"
