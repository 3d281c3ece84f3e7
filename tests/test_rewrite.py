"""``rewrite_decoder`` / ``var-export rewrite`` mechanics: output safety, external data, plans, errors.

Numerical parity with the reference is in test_rewrite_foreign.py; the 7B-shaped scale
benchmark is benchmarks/bench_rewrite_7b.py (its smoke test is at the end of this file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tests.fixtures.foreign import tiny_llama as tl
from tests.fixtures.foreign.make_fixtures import GRAPHS
from var_export.core.errors import (
    AlreadyAppliedError,
    CalibrationError,
    ConfigError,
    GraphPatternError,
    OutputError,
)
from var_export.core.settings import VarSettings
from var_export.rewrite import resolve_settings, rewrite_decoder
from var_export.safety import check_external_data

SETTINGS = VarSettings(sink_dims=tl.SINK_DIMS, tau=4.0, layers="1:", heads="dynamic")
ARGS = ["--sink-dims", "5,17", "--tau", "4", "--layers", "1:"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_external_data(src: Path, folder: Path, name: str = "model.onnx") -> Path:
    """``src`` re-saved into ``folder`` with its weights in ``<name>.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ir.load(str(src))
    ir.save(model, str(folder / name), external_data=f"{name}.data", size_threshold_bytes=1024)
    return folder / name


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any read of an external tensor's data fails the test."""

    def boom(self, *args, **kwargs):
        raise AssertionError(f"external tensor {self.name!r} was read")

    for name in ("_load", "numpy", "tobytes", "tofile", "__array__"):
        if hasattr(ir.ExternalTensor, name):
            monkeypatch.setattr(ir.ExternalTensor, name, boom)


def prefill_logits(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b, s = 2, 6
    feeds = {
        "input_ids": np.array([[1, 7, 30, 11, 20, 21]] * b), "attention_mask": np.ones((b, s), np.int64),
        "position_ids": np.tile(np.arange(s), (b, 1)), "visual_token_mask": np.array([[0, 1, 1, 1, 0, 0]] * b, bool),
        "past_sink_mask": np.zeros((b, 2, 0), bool),
    }
    for i in range(tl.CONFIG["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((b, 2, 0, tl.HEAD_DIM), np.float32)
    return sess.run(["logits"], feeds)[0]


# ------------------------------------------------------------------------------ output safety


def test_refuses_to_overwrite_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copyfile(GRAPHS["legacy"], src)
    before = sha(src)
    os.symlink(src, tmp_path / "alias.onnx")
    for out in (src, tmp_path / "sub" / ".." / "m.onnx", tmp_path / "alias.onnx"):
        with pytest.raises(ConfigError, match="refusing to overwrite"):
            rewrite_decoder(src, out, SETTINGS)
    assert sha(src) == before


def test_refuses_to_overwrite_the_input_data_file(tmp_path):
    src = with_external_data(GRAPHS["legacy"], tmp_path / "m")
    with pytest.raises(ConfigError, match="data file"):
        rewrite_decoder(src, tmp_path / "m" / "model.onnx.data", SETTINGS)


def test_failed_rewrite_writes_nothing_and_keeps_an_existing_output(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copyfile(GRAPHS["legacy"], src)
    out = tmp_path / "out.onnx"
    rewrite_decoder(src, out, SETTINGS)  # ours: listed in the folder's .var-export-owned
    previous = out.read_bytes()
    with pytest.raises(ConfigError):  # layer 7 does not exist in a 3-layer graph
        rewrite_decoder(src, out, SETTINGS.replace(layers="7"))
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [".var-export-owned", "m.onnx", "out.onnx"]
    foreign = tmp_path / "theirs.onnx"
    foreign.write_bytes(b"not ours")
    with pytest.raises(OutputError, match="not written by var-export"):
        rewrite_decoder(src, foreign, SETTINGS)
    assert foreign.read_bytes() == b"not ours"


def test_output_is_written_atomically_with_the_input_permissions(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copyfile(GRAPHS["dynamo"], src)
    os.chmod(src, 0o640)
    out = tmp_path / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS)
    assert result.out_path == out and result.data_mode == "inline" and result.data_files == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".var-export-owned", "m.onnx", "var.onnx"]  # no temp left
    assert (out.stat().st_mode & 0o777) == 0o640
    names = [i.name for i in onnx.load(str(out)).graph.input]
    assert names[-2:] == ["visual_token_mask", "past_sink_mask"]


def test_rewriting_twice_is_refused(tmp_path):
    out = tmp_path / "var.onnx"
    rewrite_decoder(GRAPHS["dynamo"], out, SETTINGS)
    with pytest.raises(AlreadyAppliedError):
        rewrite_decoder(out, tmp_path / "var2.onnx", SETTINGS)


# ------------------------------------------------------------------------------ external data


def test_external_weights_are_shared_in_the_same_folder_never_read(tmp_path, no_weight_reads):
    src = with_external_data(GRAPHS["dynamo"], tmp_path / "m")
    data = tmp_path / "m" / "model.onnx.data"
    before = (sha(data), os.stat(data).st_ino)
    result = rewrite_decoder(src, tmp_path / "m" / "var.onnx", SETTINGS)
    assert result.data_mode == "share"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".var-export-owned", "model.onnx", "model.onnx.data", "var.onnx"]
    refs = check_external_data(tmp_path / "m" / "var.onnx")
    assert [r.location for r in refs] == ["model.onnx.data"]
    assert (sha(data), os.stat(data).st_ino) == before


def test_external_weights_are_placed_in_another_folder_never_read(tmp_path, no_weight_reads):
    src = with_external_data(GRAPHS["dynamo"], tmp_path / "m")
    out = tmp_path / "elsewhere" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS)
    assert result.data_mode == "auto" and result.data_how in (["reflink"], ["link"])  # one filesystem here
    assert sorted(p.name for p in out.parent.iterdir()) == [".var-export-owned", "var.onnx", "var.onnx.data"]
    assert sha(out.parent / "var.onnx.data") == sha(tmp_path / "m" / "model.onnx.data")
    assert [r.location for r in check_external_data(out)] == ["var.onnx.data"]


def test_sharded_external_data_is_copied_file_by_file(tmp_path, no_weight_reads):
    """Several data files (torch's legacy >2 GB layout, sharded saves) keep one file each."""
    folder = tmp_path / "m"
    folder.mkdir()
    ir.save(ir.load(str(GRAPHS["legacy"])), str(folder / "model.onnx"), external_data="w.data",
            size_threshold_bytes=1024, max_shard_size_bytes=100_000)
    shards = sorted(p.name for p in folder.iterdir() if p.name not in ("model.onnx", ".var-export-owned"))
    assert len(shards) > 2
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(folder / "model.onnx", out, SETTINGS, data="copy")
    assert result.data_mode == "copy" and set(result.data_how) <= {"copy", "reflink"}
    copied = sorted(p.name for p in (out.parent / "var.onnx.data.d").iterdir() if p.name != ".var-export-owned")
    assert copied == shards
    assert len(check_external_data(out)) == len(shards)
    for name in shards:
        assert sha(folder / name) == sha(out.parent / "var.onnx.data.d" / name)


def test_external_data_outputs_compute_what_the_inline_rewrite_computes(tmp_path):
    inline = tmp_path / "inline.onnx"
    rewrite_decoder(GRAPHS["dynamo"], inline, SETTINGS)
    src = with_external_data(GRAPHS["dynamo"], tmp_path / "m")
    shared, copied = tmp_path / "m" / "var.onnx", tmp_path / "other" / "var.onnx"
    rewrite_decoder(src, shared, SETTINGS)
    rewrite_decoder(src, copied, SETTINGS)
    shutil.move(tmp_path / "m", tmp_path / "moved")  # the copy does not depend on the input folder
    want = prefill_logits(inline)
    np.testing.assert_array_equal(prefill_logits(copied), want)
    np.testing.assert_array_equal(prefill_logits(tmp_path / "moved" / "var.onnx"), want)


def test_sparse_copy_keeps_holes(tmp_path):
    from var_export.rewrite import _copy_sparse

    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"x" * 4096)
    dst = tmp_path / "copy.bin"
    _copy_sparse(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < (8 << 20)  # not 64 MB allocated


# ------------------------------------------------------------------------------ plans and errors


def test_dry_run_writes_nothing_and_describes_every_layer(tmp_path):
    out = tmp_path / "var.onnx"
    result = rewrite_decoder(GRAPHS["optimum"], out, SETTINGS, dry_run=True)
    assert not out.exists() and result.out_path is None
    text = result.describe()
    assert "layer 0: untouched" in text
    for layer in (1, 2):
        assert f"layer {layer}: would change: sink detection, head selection + redistribution" in text
        assert f"past_key_values.{layer}.key" in text
    assert "visual_token_mask" in text and "present_sink_mask" in text


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    from var_export.cli import main

    out = tmp_path / "var.onnx"
    assert main(["rewrite", str(GRAPHS["legacy"]), "--out", str(out), "--dry-run", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "would change" in printed and "layer 2" in printed and not out.exists()


def test_cli_rewrite_reads_knobs_calibration_and_paper_convention(tmp_path):
    from var_export.cli import main

    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({
        "sink_dims": [5, 17], "settings": {"tau": 4.0, "layers": "1:"}, "heads": [[1, 0], [2, 3]],
        "fingerprint": {"num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "hidden_size": 64},
    }))
    out = tmp_path / "var.onnx"
    assert main(["rewrite", str(GRAPHS["legacy"]), "--out", str(out), "--calibration", str(cal),
                 "--convention", "paper", "--p", "0.3"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    stored = json.loads(props["var_export.settings"])
    assert stored["heads"] == "hybrid" and stored["tau"] == 4.0 and stored["layers"] == "1:"
    assert stored["p"] == pytest.approx(0.7) and stored["sink_dims"] == [5, 17]
    assert json.loads(props["var_export.heads"]) == [[1, 0], [2, 3]]


def test_calibration_from_another_model_is_refused(tmp_path):
    cal = {"sink_dims": [5, 17], "heads": [[1, 0]], "fingerprint": {"num_layers": 32, "hidden_size": 4096}}
    with pytest.raises(CalibrationError, match="another model"):
        rewrite_decoder(GRAPHS["legacy"], tmp_path / "o.onnx", SETTINGS.replace(heads="hybrid"), calibration=cal)


def test_resolve_settings_precedence(caplog):
    cal = {"sink_dims": [1, 2], "settings": {"tau": 7.0, "rho": 0.3}, "heads": [[2, 0]]}
    s = resolve_settings(sink_dims="5,17", calibration=cal, tau=None, rho=0.4)
    assert s.sink_dims == (5, 17) and s.tau == 7.0 and s.rho == 0.4 and s.heads == "hybrid"
    assert "differs" in caplog.text  # user-given sink dims kept, with a warning
    assert resolve_settings(sink_dims="3").heads == "dynamic"  # no calibration: dynamic
    with pytest.raises(ConfigError, match="sink dims"):
        resolve_settings()


def _rename_inputs(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    model = onnx.load(str(src))
    for v in model.graph.input:
        v.name = rename.get(v.name, v.name)
    for node in model.graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
    onnx.save(model, str(dst))
    return dst


def test_unrecognised_attention_lists_each_candidate_and_why(tmp_path):
    """Past keys under unknown names: every Softmax is named with the reason it did not match."""
    rename = {f"past_key_values.{i}.key": f"cache_k{i}" for i in range(3)}
    src = _rename_inputs(GRAPHS["optimum"], tmp_path / "renamed.onnx", rename)
    with pytest.raises(GraphPatternError) as e:
        rewrite_decoder(src, tmp_path / "o.onnx", SETTINGS, dry_run=True)
    msg = str(e.value)
    for layer in range(3):
        assert f"/model/layers.{layer}/self_attn/Softmax" in msg
    assert msg.count("reaches no graph input named past_key_values.{i}.key") == 3
    assert "Searched:" in msg and "Found: 3 Softmax" in msg


def test_fused_attention_is_named_with_its_layer(tmp_path):
    from onnx import TensorProto, helper

    kv = [helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT, ["B", 2, "P", 16]) for k in ("key", "value")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 64])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])
    node = helper.make_node(
        "GroupQueryAttention", ["x", "x", "x", "past_key_values.0.key", "past_key_values.0.value"],
        ["y", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=4, kv_num_heads=2,
        name="layers.0/attn",
    )
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "present.0.key", "present.0.value")]
    graph = helper.make_graph([node], "g", [x, mask, *kv], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "gqa.onnx"))
    with pytest.raises(GraphPatternError, match=r"layer 0: com.microsoft::GroupQueryAttention"):
        rewrite_decoder(tmp_path / "gqa.onnx", tmp_path / "o.onnx", SETTINGS)


def test_library_rewrite_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from var_export.rewrite import rewrite_decoder; import var_export.safety; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------ scale


@pytest.mark.slow
def test_bench_rewrite_7b_meets_the_goal(tmp_path_factory):
    """The full benchmark: 32 layers, fp16, 13.5 GB sparse weights; < 10 s, < 500 MB."""
    from benchmarks.bench_rewrite_7b import run

    n = run(Path(os.environ.get("VAR_BENCH_DIR", tmp_path_factory.mktemp("bench7b"))), layers=32)
    print(n)
    assert n["external_reads"] == 0 and n["var_io"] and n["shares_original_data"]
    assert n["rewrite_s"] < 10 and n["peak_rss_mb"] < 500


def test_bench_smoke_full_width(tmp_path):
    """Smoke of the benchmark at LLaMA-2-7B width (hidden 4096, 32 heads, vocab 32000), 1 layer:
    the 0.6 GB sparse weight file is never read (guard count 0, no block allocated), and the
    output parses, has the VAR I/O and references the original data file."""
    from benchmarks.bench_rewrite_7b import DATA, run

    n = run(tmp_path, layers=1)
    assert n["external_reads"] == 0
    assert n["var_io"] and n["shares_original_data"] and n["data_files"] == [DATA]
    assert n["data_allocated_mb"] < 1.0 and n["data_apparent_gb"] > 0.5
    assert n["output_graph_mb"] < 5
    assert n["peak_rss_mb"] < 500
