"""Sans-I/O cores import no I/O: no event loop, sockets, clocks, threads,
processes or databases. One table for every package, so a new core is one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = {
    "peerd": ["wire", "identity", "handshake", "errors", "record"],
    "peerd/dht": ["routing", "lookup", "records", "storage", "service", "messages", "config"],
    "collectives": ["api", "ballot", "chunking", "ring", "topology", "view", "membership", "quant",
                    "arrays", "messages", "fabric", "state", "statebuf", "statemsg"],
    "crdt": ["hlc", "values", "messages", "lww", "orset", "counter", "delta", "log", "sync"],
    "nat": ["endpoint", "observed", "classify", "probe", "punch", "bucket", "relay",
            "strategy"],
}
FORBIDDEN = {"trio", "socket", "time", "asyncio", "threading", "select", "selectors",
             "subprocess", "sqlite3"}
# Handshake nonces come from os.urandom and identity files are read with os;
# the NAT cores need neither, so there os is a sign of I/O creeping in.
EXTRA = {"nat": {"os"}}
MODULES = [f"{pkg}/{name}.py" for pkg, names in CORES.items() for name in names]


def imports(path: Path) -> set[str]:
    """Every absolute module a file imports, dotted names in full."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("rel", MODULES)
def test_core_imports_no_io(rel: str) -> None:
    path = ROOT / rel
    assert path.exists(), f"core module {rel} is missing"
    found = imports(path)
    assert found, "parsed no imports at all: wrong file?"
    bad = roots(found) & (FORBIDDEN | EXTRA.get(rel.rsplit("/", 1)[0], set()))
    assert not bad, f"{rel} imports {sorted(bad)}"


@pytest.mark.parametrize("rel", [m for m in MODULES if m.startswith("crdt/")])
def test_crdt_cores_import_only_crdt_cores(rel: str) -> None:
    """The store's I/O half (SQLite, network) must not leak in through a sibling."""
    for name in imports(ROOT / rel):
        if name.startswith("crdt."):
            assert name.removeprefix("crdt.") in CORES["crdt"], (rel, name)


def test_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom trio import sleep\nimport os.path\n")
    assert roots(imports(bad)) & (FORBIDDEN | EXTRA["nat"]) == {"time", "trio", "os"}
