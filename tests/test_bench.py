"""The benchmark: the harness (benchmarks/bench_var.py) at toy sizes, the library timing core
(var_export.timing) and the ``var-export bench`` CLI (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np


def test_smoke_whole_bench(tmp_path):
    from benchmarks.bench_var import config_for, graph_names, run_bench

    config = config_for(full=False, smoke=True)
    result = run_bench(config, tmp_path)
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    case = json.loads((tmp_path / "bench.json").read_text())["cases"]["slice-tiny"]
    assert set(case["rows"]) == set(graph_names(modes=config.modes))
    assert "kernel-dynamic" in case["rows"]
    for row in case["rows"].values():
        assert set(row["vs_fused"]) == {"prefill", "decode"} and set(row["aa"]) == {"prefill", "decode"}
        assert all(np.isfinite(v) and v > 0 for v in row["median_s"].values())
    assert {"released", "reference"} <= set(case["torch"])
    table = (tmp_path / "bench.md").read_text()
    assert "A/A" in table and "ONNX Runtime" in table and "fused-qk-hybrid" in table
    assert result["machine"]["cores"]


def test_interleaving_alternates_who_goes_first(monkeypatch):
    from var_export import timing as bench

    calls: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def get_inputs(self) -> list:
            return []

    def fake_run(session, feeds, steps, *, var, keep_logits=True):  # noqa: ARG001
        calls.append(session.name)
        return bench.DecodeRun([], 0.1, [0.01] * steps)

    monkeypatch.setattr(bench, "run_decode", fake_run)
    sessions = {n: Fake(n) for n in ("a", "b", "c")}
    out = bench.interleaved(sessions, None, rounds=4, steps=2, warmup=0)  # type: ignore[arg-type]
    firsts = [calls[i * 3] for i in range(4)]
    assert len(set(firsts)) >= 3
    assert all(len(t.prefill) == 4 and len(t.decode) == 8 for t in out.values())


def test_cli_bench_times_a_var_bundle_against_its_baseline(tmp_path, tiny_bundles):
    """``var-export bench VAR --baseline NOVAR``: torch-free timing of two real bundles."""
    from var_export.cli import main

    out = tmp_path / "bench"
    code = main(["bench", str(tiny_bundles["hybrid"]), "--baseline", str(tiny_bundles["novar"]),
                 "--prompt-tokens", "80", "--image-tokens", "64", "--rounds", "1", "--decode-steps", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    rows = result["cases"]["graphs"]["rows"]
    novar, var = tiny_bundles["novar"].name, tiny_bundles["hybrid"].name
    assert set(rows) == {novar, var}
    assert set(rows[var]) >= {"median_s", f"vs_{novar}", "aa"}
    assert all(np.isfinite(v) and v > 0 for v in rows[var]["median_s"].values())
    assert (out / "bench.png").stat().st_size > 0 and "A/A" in (out / "bench.md").read_text()


def test_cli_bench_refuses_a_graph_that_is_not_there(tmp_path, capsys):
    from var_export.cli import main

    code = main(["bench", str(tmp_path / "nope"), "--baseline", str(tmp_path / "nope2"), "--out", str(tmp_path / "o")])
    assert code != 0
    assert "expected a bundle dir or a decoder .onnx" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_bench_times_token_id_decoders_such_as_genai(tmp_path, capsys):
    """onnxruntime-genai graphs take input_ids, no position_ids, and leave the KV head size
    symbolic (kv_cache_dim): `var-export bench` feeds each graph what it declares, takes the head
    size from --head-dim, and times genai + VAR (kernel formulation) against genai."""
    from tests.fixtures.foreign.make_fixtures import GRAPHS
    from tests.test_rewrite import SETTINGS
    from var_export.cli import main
    from var_export.rewrite import rewrite_decoder

    var = tmp_path / "genai_kernel.onnx"
    rewrite_decoder(GRAPHS["genai"], var, SETTINGS, formulation="kernel")
    out = tmp_path / "bench"
    args = ["bench", str(var), "--baseline", str(GRAPHS["genai"]), "--prompt-tokens", "24", "--image-tokens", "12",
            "--rounds", "1", "--decode-steps", "2", "--out", str(out), "--quiet"]
    assert main(args) != 0 and "--head-dim" in capsys.readouterr().err  # no graph declares it
    assert main([*args, "--head-dim", "16"]) == 0
    rows = json.loads((out / "bench.json").read_text())["cases"]["graphs"]["rows"]
    assert set(rows) == {"genai_llama", "genai_kernel"}
    assert all(np.isfinite(v) and v > 0 for v in rows["genai_kernel"]["median_s"].values())
