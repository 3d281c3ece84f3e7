"""The CLI is thin: library modules never import it, and its top-level errors are clean."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIRS = ("var_export", "passes", "calibration", "configs")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_never_imports_the_cli():
    offenders = []
    for d in LIBRARY_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            if "cli" in path.relative_to(ROOT).parts or path.name == "demo.py":
                continue
            bad = [m for m in _imports(path) if m == "var_export.cli" or m.startswith("var_export.cli.")]
            if bad:
                offenders.append(f"{path.relative_to(ROOT)} imports {bad}")
    assert not offenders, offenders
    # the check itself can fail: the CLI package does import itself
    assert any(m.startswith("var_export.cli") for m in _imports(ROOT / "var_export/cli/export.py"))


def _cli(*args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "var_export.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_help_explains_conventions_and_knobs():
    r = _cli("--help")
    assert r.returncode == 0
    for word in ("--convention", "paper", "--p", "--rho", "--summ", "--tau", "--heads", "--layers", "build-trt", "export"):
        assert word in r.stdout, word


def test_real_model_offline_fails_fast_with_a_clear_message(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t = time.perf_counter()
    r = _cli("--model", "llava", "--out", str(tmp_path / "engine.plan"), env=env)
    elapsed = time.perf_counter() - t
    assert r.returncode != 0
    assert "llava-hf/llava-1.5-7b-hf" in r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 60
    assert not any(tmp_path.glob("engine*")), "nothing half-written"


def test_knob_out_of_range_is_refused_before_any_work(tmp_path):
    for knob in (["--p", "0"], ["--p", "1.5"], ["--rho", "-0.1"], ["--summ", "2"], ["--tau", "0"]):
        r = _cli("export", "--out", str(tmp_path / "b"), "--heads", "dynamic", *knob)
        assert r.returncode != 0, knob
        assert "Traceback" not in r.stderr, r.stderr
        assert knob[0].lstrip("-") in r.stderr
        assert not (tmp_path / "b").exists()
