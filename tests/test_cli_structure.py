"""The CLI is thin and its top-level errors are clean (the import direction: test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

    from var_export.core.errors import ModelLoadError

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = _cli("--model", "llava", "--out", str(tmp_path / "engine.plan"), env=env)
    assert r.returncode == ModelLoadError.exit_code
    assert "llava-hf/llava-1.5-7b-hf" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any(tmp_path.glob("engine*")), "nothing half-written"


def test_knob_out_of_range_is_refused_before_any_work(tmp_path, capsys):
    """In-process (argument validation needs no subprocess): exit code, clean message, nothing written."""
    from var_export.cli import main
    from var_export.core.errors import ConfigError

    for knob in (["--p", "0"], ["--p", "1.5"], ["--rho", "-0.1"], ["--summ", "2"], ["--tau", "0"]):
        code = main(["export", "--out", str(tmp_path / "b"), "--heads", "dynamic", *knob])
        err = capsys.readouterr().err
        assert code == ConfigError.exit_code, (knob, err)
        assert "Traceback" not in err and knob[0].lstrip("-") in err, err
        assert not (tmp_path / "b").exists()
