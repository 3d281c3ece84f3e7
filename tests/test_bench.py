"""var-export bench: a smoke of the whole benchmark at toy sizes (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def test_smoke_whole_bench(tmp_path):
    from benchmarks.bench_var import config_for
    from var_export.bench import graph_names, run_bench

    result = run_bench(config_for(full=False, smoke=True), tmp_path)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    case = json.loads((tmp_path / "bench.json").read_text())["cases"]["slice-tiny"]
    assert set(case["rows"]) == set(graph_names())
    for row in case["rows"].values():
        assert set(row["vs_fused"]) == {"prefill", "decode"} and set(row["aa"]) == {"prefill", "decode"}
        assert all(np.isfinite(v) and v > 0 for v in row["median_s"].values())
    assert {"released", "reference"} <= set(case["torch"])
    table = (tmp_path / "bench.md").read_text()
    assert "A/A" in table and "ONNX Runtime" in table and "fused-qk-hybrid" in table
    assert result["machine"]["cores"]


def test_interleaving_alternates_who_goes_first():
    from var_export import bench

    calls: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

    def fake_run(session, case, steps, *, var, keep_logits=True):  # noqa: ARG001
        calls.append(session.name)
        return bench.DecodeRun([], 0.1, [0.01] * steps)

    orig = bench.run_decode
    bench.run_decode = fake_run
    try:
        sessions = {n: Fake(n) for n in ("a", "b", "c")}
        out = bench.interleaved(sessions, None, rounds=4, steps=2, warmup=0)  # type: ignore[arg-type]
    finally:
        bench.run_decode = orig
    firsts = [calls[i * 3] for i in range(4)]
    assert len(set(firsts)) >= 3
    assert all(len(t.prefill) == 4 and len(t.decode) == 8 for t in out.values())


def test_library_does_not_import_cli():
    code = "import sys, var_export.bench; assert 'var_export.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
