"""``python -m benchmarks.dependency_graph``: who imports whom in the library (AST, lazy imports too).

Prints the package-level graph (``core``, ``passes``, ``calibration``, ``configs``, each top-level
module of ``var_export``, ``cli``) and, per module, whether it imports torch/transformers at all
(``lazily`` when only inside functions). ``tests/test_architecture.py`` checks the direction.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# repo folder -> installed import name (pyproject [tool.setuptools.package-dir])
PACKAGES = {"var_export": "var_export", "passes": "var_export.passes",
            "calibration": "var_export.calibration", "configs": "var_export.configs"}
HEAVY = ("torch", "transformers")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def library_files() -> Iterator[tuple[str, Path]]:
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield module_name(path), path


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for s in ast.walk(tree) if isinstance(s, ast.If) and _is_type_checking(s.test)
                 for n in ast.walk(s)}  # `if TYPE_CHECKING:` imports never run
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try))
                                        for n in ast.walk(s)}
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, id(node) in top))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def layer(module: str) -> str:
    """The node of the package graph a module belongs to."""
    parts = module.split(".")
    if parts[0] != "var_export":
        return parts[0]
    if len(parts) == 1:
        return "var_export"
    return parts[1] if parts[1] in ("core", "passes", "calibration", "configs", "cli") else f"var_export.{parts[1]}"


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in library_files():
        src = layer(module)
        for name, _ in imports(path):
            if name.split(".")[0] in ("var_export", *HEAVY, "benchmarks", "examples"):
                dst = layer(name)
                if dst != src and name != "var_export":
                    graph.setdefault(src, set()).add(dst)
    return graph


def torch_use() -> dict[str, str]:
    """module -> "yes" (torch/transformers at import), "lazily" (inside functions only) or "no"."""
    out = {}
    for module, path in library_files():
        heavy = [top for name, top in imports(path) if name.split(".")[0] in HEAVY]
        out[module] = "yes" if any(heavy) else "lazily" if heavy else "no"
    return out


def main() -> int:
    graph = package_graph()
    for src in sorted(graph):
        print(f"{src:28s} -> {', '.join(sorted(graph[src]))}")
    print()
    for module, use in torch_use().items():
        print(f"{module:40s} torch: {use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
