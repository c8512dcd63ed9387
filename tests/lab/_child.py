"""Runs one function of a Python file inside a lab namespace (see netns.py).

argv: <file> <function> <json list of args>. The result is printed as one
``LAB-RESULT <json>`` line; ``async def`` functions run under trio.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys


def main() -> None:
    path, name, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    spec = importlib.util.spec_from_file_location("lab_agent", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name)
    if inspect.iscoroutinefunction(fn):
        import trio

        result = trio.run(fn, *args)
    else:
        result = fn(*args)
    print("LAB-RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
