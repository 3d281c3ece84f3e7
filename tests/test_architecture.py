"""Dependencies point one way (docs/ARCHITECTURE.md): core -> passes / calibration -> the rest -> cli.

Every import of the library is read from the source (AST, lazy imports inside functions too;
``if TYPE_CHECKING:`` imports excluded), so a new import that breaks the direction fails here.
"""

from __future__ import annotations

import pytest

from benchmarks.dependency_graph import HEAVY, imports, library_files
from benchmarks.longest_functions import long_functions, long_functions_in

LIMIT = 60  # lines per library function, docstring included


def _project(name: str) -> bool:
    return name.split(".")[0] in ("var_export", "passes", "calibration", "configs", "benchmarks", "examples")


def _violations(rule) -> list[str]:  # noqa: ANN001 - rule(module, imported) -> reason | None
    out = []
    for module, path in library_files():
        for name, _ in imports(path):
            reason = rule(module, name)
            if reason:
                out.append(f"{module} imports {name}: {reason}")
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def core_rule(module: str, name: str) -> str | None:
    if _in(module, "var_export.core") and _project(name) and not _in(name, "var_export.core"):
        return "var_export.core imports nothing else of the project"
    return None


def passes_rule(module: str, name: str) -> str | None:
    if not _in(module, "var_export.passes"):
        return None
    if name.split(".")[0] in HEAVY:
        return "passes never import torch/transformers"
    if _project(name) and not (_in(name, "var_export.core") or _in(name, "var_export.passes")):
        return "passes import only var_export.core"
    return None


def families_rule(module: str, name: str) -> str | None:
    if _in(module, "var_export.families") and _project(name) and not (
        _in(name, "var_export.core") or _in(name, "var_export.families")
    ):
        return "families (what differs per model family) import only var_export.core"
    return None


def calibration_rule(module: str, name: str) -> str | None:
    if _in(module, "var_export.calibration") and _project(name) and not (
        _in(name, "var_export.core") or _in(name, "var_export.families") or _in(name, "var_export.calibration")
    ):
        return "calibration imports only var_export.core and var_export.families (+ torch)"
    return None


def cli_rule(module: str, name: str) -> str | None:
    if not _in(module, "var_export.cli") and _in(name, "var_export.cli"):
        return "nothing below the CLI imports it"
    return None


def harness_rule(module: str, name: str) -> str | None:
    if name.split(".")[0] in ("benchmarks", "examples", "tests", "passes", "calibration", "configs"):
        return "the library never imports the harness, and uses installed names (var_export.*)"
    return None


RULES = [core_rule, passes_rule, families_rule, calibration_rule, cli_rule, harness_rule]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_dependency_direction(rule):
    assert not _violations(rule), _violations(rule)


@pytest.mark.parametrize(
    ("rule", "module", "name"),
    [
        (core_rule, "var_export.core.settings", "var_export.passes.locate"),
        (passes_rule, "var_export.passes.locate", "torch"),
        (passes_rule, "var_export.passes._ir", "var_export.export"),
        (calibration_rule, "var_export.calibration.calibrate", "var_export.inputs"),
        (families_rule, "var_export.families.qwen", "var_export.models"),
        (cli_rule, "var_export.pipeline", "var_export.cli.common"),
        (harness_rule, "var_export.timing", "benchmarks.bench_var"),
    ],
)
def test_each_rule_can_fail(rule, module, name):
    assert rule(module, name)
    assert rule(module, "var_export.core.errors") is None


def test_the_scan_sees_lazy_imports():
    lazy = {name for module, path in library_files() if module == "var_export.export"
            for name, top in imports(path) if not top}
    assert "torch" in lazy  # imported inside the exporters, not at module level


def test_no_library_function_over_the_limit_without_a_written_reason():
    unexplained = [f"{module}.{qual}: {n} lines" for n, module, qual, reason in long_functions(LIMIT) if not reason]
    assert not unexplained, (
        f"library functions over {LIMIT} lines: {unexplained}. Split them into named steps, or write "
        "why one must stay long in a `# long: <reason>` comment on its def line."
    )


def _function(lines: int, comment: str = "") -> str:
    body = "\n".join(f"    x{i} = {i}" for i in range(lines - 2))
    return f"def f():{comment}\n    \"\"\"Doc.\"\"\"\n{body}\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (_function(LIMIT), []),
        (_function(LIMIT + 1), [(LIMIT + 1, "f", False)]),
        (_function(LIMIT + 1, "  # long: one table, read top to bottom"), [(LIMIT + 1, "f", True)]),
        (_function(LIMIT + 1, "  # long:"), [(LIMIT + 1, "f", False)]),  # a reason, not just the tag
        ("class C:\n" + "\n".join("    " + line for line in _function(LIMIT + 1).splitlines()),
         [(LIMIT + 1, "C.f", False)]),
    ],
    ids=["at-limit", "over", "over-with-reason", "empty-reason", "method"],
)
def test_the_length_rule_can_fail(source, expected):
    assert long_functions_in(source, LIMIT) == expected
