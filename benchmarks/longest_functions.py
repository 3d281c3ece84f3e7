"""``python -m benchmarks.longest_functions [--limit 60]``: library functions longer than the limit.

Lines are counted from ``def`` to the last line of the body (docstring included). A function kept
long on purpose says why in a ``# long:`` comment on its ``def`` line or the line above.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys

from benchmarks.dependency_graph import library_files


def long_functions(limit: int = 60) -> list[tuple[int, str, str, bool]]:
    """(lines, module, qualified name, has a written reason) of the library, longest first."""
    out = [
        (n, module, qual, reason)
        for module, path in library_files()
        for n, qual, reason in long_functions_in(path.read_text(), limit)
    ]
    return sorted(out, reverse=True)


def long_functions_in(source: str, limit: int = 60) -> list[tuple[int, str, bool]]:
    """(lines, qualified name, has a written reason) of the functions in ``source`` longer than
    ``limit``; the reason is a non-empty ``# long: <reason>`` on the ``def`` line or the 3 above."""
    lines = source.splitlines()
    out = []
    for node, qual in _functions(ast.parse(source), ""):
        n = node.end_lineno - node.lineno + 1
        if n > limit:
            around = "\n".join(lines[max(node.lineno - 4, 0) : node.lineno])
            out.append((n, qual, re.search(r"# long:\s*\S", around) is not None))
    return out


def _functions(tree: ast.AST, prefix: str):  # noqa: ANN202 - yields (node, qualified name)
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield node, qual
            yield from _functions(node, qual + ".")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=60)
    args = ap.parse_args(argv)
    for n, module, qual, reason in long_functions(args.limit):
        print(f"{n:4d}  {module}.{qual}{'  (reason written)' if reason else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
