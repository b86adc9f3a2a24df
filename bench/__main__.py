"""``python -m bench <name> [args]``: run the benchmark ``bench/<name>.py`` (its ``main(argv)``)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import bench

_NOT_BENCHMARKS = {"common", "__main__"}


def available() -> dict[str, str]:
    """Benchmark names mapped to the first line of their module docstring.

    A benchmark is any module of the package (other than the shared ones) that defines a
    top-level ``main``; modules are inspected without importing them.
    """
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.ispkg or info.name.startswith("_") or info.name in _NOT_BENCHMARKS:
            continue
        path = Path(bench.__path__[0]) / f"{info.name}.py"
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        found[info.name] = doc[0] if doc else ""
    return dict(sorted(found.items()))


def usage() -> str:
    """The ``--help`` text: how to call, and the benchmarks there are."""
    names = available()
    width = max((len(n) for n in names), default=0)
    lines = [
        "usage: python -m bench <name> [options]   (python -m bench <name> --help for its options)",
        "",
        "benchmarks:",
        *(f"  {name.ljust(width)}  {doc}" for name, doc in names.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``bench.<name>.main(rest of argv)``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in available():
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
