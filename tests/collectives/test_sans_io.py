"""Pure cores import no I/O: neither trio, socket nor time."""

from __future__ import annotations

import ast
import importlib

import pytest

CORES = [
    "collectives.chunking",
    "collectives.ring",
    "collectives.topology",
    "collectives.view",
    "collectives.membership",
    "collectives.quant",
    "collectives.arrays",
    "collectives.messages",
    "collectives.fabric",
]
FORBIDDEN = {"trio", "socket", "time", "asyncio", "threading", "select"}


@pytest.mark.parametrize("name", CORES)
def test_core_imports_no_io(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN
