"""Trusted outputs (issue 11): never destroy, never half-write, never silently do nothing.

One section per defect class of docs/trust.md; every test here fails on 4d6a2f5.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from var_export.core.contract import OWNED_MARKER, STAGE_PREFIX
from var_export.core.errors import (
    BundleError,
    CalibrationError,
    ConfigError,
    DataError,
    GraphCheckError,
    InputValidationError,
    ModelLoadError,
    OutputError,
    VarExportError,
)
from var_export.core.schemas import (
    BundleManifest,
    CalibrationFile,
    EngineManifest,
    validate_document,
)
from var_export.core.settings import VarSettings
from var_export.outputs import Outputs, check_target, sweep_stale

ROOT = Path(__file__).resolve().parent.parent


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from var_export.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return int(rc or 0), out.err + out.out


# ------------------------------------------------------------------------- 1. ownership


def test_the_issue_data_loss_case_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import var_export.models

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded before the output folder was refused")

    monkeypatch.setattr(var_export.models, "load_llava", never)
    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "manifest.json").write_text('{"name":"app"}')
    (w / "src" / "app.js").write_text("x")
    (w / "thesis.tex").write_text("t")
    rc, text = _cli(["--model", "tiny-llava", "--out", str(w)], capsys)
    assert rc == OutputError.exit_code and "no .var-export-owned marker" in text  # before any model load
    assert sorted(p.relative_to(w).as_posix() for p in w.rglob("*")) == [
        "manifest.json", "src", "src/app.js", "thesis.tex"]


def test_check_target_rules(tmp_path):
    assert check_target(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_target(tmp_path / "f", "dir")
    with pytest.raises(OutputError, match="is a file, expected a folder"):
        check_target(tmp_path / "f" / "sub", "dir")
    with pytest.raises(OutputError, match="not written by var-export"):
        check_target(tmp_path / "f", "file")
    with pytest.raises(OutputError, match="is a folder"):
        check_target(tmp_path / "empty", "file")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(OutputError, match="symlink"):
        check_target(tmp_path / "link", "dir")


def test_a_folder_is_ours_only_while_every_file_is_listed(tmp_path):
    out = tmp_path / "o"
    with Outputs() as tx:
        (tx.stage_dir(out) / "a.txt").write_text("a")
        tx.commit()
    assert json.loads((out / OWNED_MARKER).read_text())["files"] == ["a.txt"]
    check_target(out)  # replaceable
    (out / "user.txt").write_text("u")
    with pytest.raises(OutputError, match="user.txt"):
        check_target(out)


def test_triton_repository_never_replaces_a_foreign_folder(tmp_path):
    pytest.importorskip("tritonclient")
    from tests.test_bundle import FIELDS, _graph  # noqa: F401 - tiny graphs
    from var_export.bundle import write_bundle
    from var_export.triton import write_triton_repository

    graphs = {n: _graph(tmp_path / n, ["x"], ["y"]) for n in
              ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")}
    bundle = write_bundle(tmp_path / "b", graphs=graphs, manifest_fields=FIELDS, calibration=None)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mine.txt").write_text("m")
    with pytest.raises(OutputError):
        write_triton_repository(bundle, repo, overwrite=True)
    assert (repo / "mine.txt").read_text() == "m"
    out = write_triton_repository(bundle, tmp_path / "repo2")
    write_triton_repository(bundle, out, overwrite=True)  # our own: replaced


# -------------------------------------------------------- 2/3. all or nothing, fs errors


def test_two_outputs_swap_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for target, text in ((a, "old a"), (b, "old b")):
        with Outputs() as tx:
            (tx.stage_dir(target) / "f").write_text(text)
            tx.commit()
    real = os.rename
    failed = []

    def fail_on_b(src, dst):  # the new b cannot be moved into place (once)
        if Path(dst) == b and not failed:
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", fail_on_b)
    with pytest.raises(OutputError, match="disk is full.*Nothing was replaced"), Outputs() as tx:
        (tx.stage_dir(a) / "f").write_text("new a")
        (tx.stage_dir(b) / "f").write_text("new b")
        tx.commit()
    monkeypatch.setattr(os, "rename", real)
    assert (a / "f").read_text() == "old a" and (b / "f").read_text() == "old b"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGE_PREFIX)]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_filesystem_errors_while_writing_a_bundle(tmp_path, monkeypatch, code):
    from tests.test_bundle import FIELDS, _graph
    from var_export.bundle import load_bundle, write_bundle

    graphs = {n: _graph(tmp_path / n, ["x"], ["y"], external=n + ".data") for n in
              ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")}
    out = write_bundle(tmp_path / "b", graphs=graphs, manifest_fields=FIELDS, calibration=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = shutil.copyfile
    calls = []

    def flaky(src, dst, *a, **k):  # the second copy (an external .data file) fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", flaky)
    with pytest.raises(OutputError, match="Nothing was replaced"):
        write_bundle(out, graphs=graphs, manifest_fields=FIELDS, calibration=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    load_bundle(out)


def test_rewrite_output_that_is_a_directory_or_symlink_or_under_a_file(tmp_path):
    from var_export.rewrite import rewrite_decoder

    src = ROOT / "tests/fixtures/foreign/legacy_llama.onnx"
    s = VarSettings(sink_dims=(5, 17), heads="dynamic", layers="1:")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        rewrite_decoder(src, tmp_path / "d", s)
    (tmp_path / "t.onnx").write_bytes(b"t")
    (tmp_path / "l.onnx").symlink_to(tmp_path / "t.onnx")
    with pytest.raises(OutputError, match="symlink"):
        rewrite_decoder(src, tmp_path / "l.onnx", s)
    assert (tmp_path / "t.onnx").read_bytes() == b"t"
    with pytest.raises(OutputError, match="is a file, expected a folder"):
        rewrite_decoder(src, tmp_path / "t.onnx" / "o.onnx", s)


def test_rewrite_disk_full_while_copying_weights_leaves_no_orphan_data(tmp_path, monkeypatch):
    import var_export.rewrite as rw

    folder = tmp_path / "m"
    folder.mkdir()
    model = ir.load(str(ROOT / "tests/fixtures/foreign/legacy_llama.onnx"))
    ir.save(model, str(folder / "model.onnx"), external_data="model.onnx.data", size_threshold_bytes=1024)

    def full(src, dst, *rest):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(rw, "_copy_sparse", full)
    out = tmp_path / "other" / "var.onnx"
    with pytest.raises(OutputError, match="disk is full"):
        rw.rewrite_decoder(folder / "model.onnx", out, VarSettings(sink_dims=(5, 17), heads="dynamic", layers="1:"),
                           data="copy")  # the default would hard-link (same filesystem): nothing to fill the disk
    assert [p.name for p in out.parent.iterdir()] == []


def test_cli_turns_an_unexpected_os_error_into_a_message(tmp_path, capsys, monkeypatch):
    import var_export.cli.export as export_cli

    def boom(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere")

    monkeypatch.setattr(export_cli, "run", boom)
    rc, text = _cli(["export", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "Permission denied" in text and "Traceback" not in text


# ------------------------------------------------------------------------------ 4. SIGKILL


def test_staging_folders_of_a_sigkilled_run_are_removed_by_the_next_run(tmp_path):
    code = (
        "import sys, time\n"
        "from var_export.outputs import Outputs\n"
        "tx = Outputs().__enter__()\n"
        "(tx.stage_dir(sys.argv[1]) / 'half.onnx').write_bytes(b'x' * 1000)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(STAGE_PREFIX)]
    assert len(stale) == 1
    assert sweep_stale(tmp_path) == []  # its owner is alive: left alone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_target(tmp_path / "out")  # the next run in that place
    assert not stale[0].exists()


def test_sweep_puts_back_an_old_output_a_killed_commit_had_moved_aside(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stage = tmp_path / f"{STAGE_PREFIX}{dead.pid}-abcd1234"
    (stage / ".old-bundle").mkdir(parents=True)
    (stage / ".old-bundle" / "graph.onnx").write_text("old")
    (stage / "owner.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert sweep_stale(tmp_path) == [stage]
    assert (tmp_path / "bundle" / "graph.onnx").read_text() == "old"


# --------------------------------------------------------------------------- 5. schemas

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)

GOOD_MANIFEST = {
    "schema_version": 1, "model_id": "tiny-llava", "fingerprint": {"num_layers": 4},
    "var": {"sink_dims": [5, 17], "tau": 20.0, "rho": 0.5, "summ": 0.2, "p": 0.6, "heads": "hybrid"},
    "var_layers": [2, 3], "head_mode": "hybrid", "heads": [[2, 1]], "opset": 18, "dtype": "fp32",
    "max_position_embeddings": 512, "image_token_id": 4, "eos_token_id": 2,
    "io": {"decoder_model_merged.onnx": {"inputs": ["inputs_embeds"], "outputs": ["logits"]}},
    "files": {"decoder_model_merged.onnx": {"sha256": "a" * 64, "bytes": 10}},
}
GOOD_CAL = {
    "schema_version": 1, "model_id": "tiny-llava", "fingerprint": {"num_layers": 4},
    "settings": {"tau": 20.0, "rho": 0.5, "summ": 0.2, "p": 0.6}, "sink_dims": [5, 17],
    "layers": [{"layer": 2, "image_centric_score": [0.1, 0.9]}], "heads": [[2, 1]],
}
MANIFEST_FIELDS = ["schema_version", "model_id", "var", "var_layers", "head_mode", "heads", "opset",
                   "max_position_embeddings", "image_token_id", "io", "files"]
CAL_FIELDS = ["schema_version", "model_id", "settings", "sink_dims", "layers", "heads"]


def test_good_documents_validate():
    validate_document(GOOD_MANIFEST, BundleManifest, BundleError, where="m")
    validate_document(GOOD_CAL, CalibrationFile, CalibrationError, where="c")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(MANIFEST_FIELDS), value=JSON_VALUES)
def test_generated_bad_manifests_name_the_field(field, value):
    doc = json.loads(json.dumps(GOOD_MANIFEST))
    doc[field] = value
    try:
        validate_document(doc, BundleManifest, BundleError, where="manifest.json")
    except BundleError as exc:
        assert f"manifest.json: {field}" in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(CAL_FIELDS), value=JSON_VALUES)
def test_generated_bad_calibrations_name_the_field(field, value):
    doc = json.loads(json.dumps(GOOD_CAL))
    doc[field] = value
    try:
        validate_document(doc, CalibrationFile, CalibrationError, where="calibration.json")
    except CalibrationError as exc:
        assert f"calibration.json: {field}" in str(exc)


@pytest.mark.parametrize("where,value,field", [
    (("var", "tau"), float("nan"), "var.tau"),
    (("var", "p"), float("inf"), "var.p"),
    (("files", "decoder_model_merged.onnx", "bytes"), -1, "files.decoder_model_merged.onnx.bytes"),
    (("max_position_embeddings",), 0, "max_position_embeddings"),
])
def test_manifest_file_errors_name_the_field(tmp_path, where, value, field):
    from var_export.core.schemas import parse_json_file

    doc = json.loads(json.dumps(GOOD_MANIFEST))
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        parse_json_file(tmp_path / "manifest.json", BundleManifest, BundleError)


def test_calibration_file_with_nan_score_or_bad_heads_is_refused(tmp_path):
    from var_export.core.calibration_schema import load_calibration

    for mutate, field in ((lambda c: c["layers"][0].__setitem__("image_centric_score", [float("nan")]),
                           "layers.0.image_centric_score.0"),
                          (lambda c: c.__setitem__("heads", [[-1, 0]]), "heads.0.0"),
                          (lambda c: c["settings"].__setitem__("rho", "half"), "settings")):
        doc = json.loads(json.dumps(GOOD_CAL))
        mutate(doc)
        (tmp_path / "c.json").write_text(json.dumps(doc))
        with pytest.raises(CalibrationError, match=field.replace(".", r"\.")):
            load_calibration(tmp_path / "c.json")


def test_engine_manifest_model():
    good = {"schema_version": 1, "flavor": "tensorrt_rtx", "tensorrt_version": "1.7", "precision": "fp32",
            "engines": {"decoder": {"file": "x.plan", "sha256": "a" * 64, "bytes": 1, "onnx": "d.onnx",
                                    "onnx_sha256": "b" * 64}}}
    validate_document(good, EngineManifest, VarExportError, where="engines.json")
    bad = json.loads(json.dumps(good))
    bad["engines"]["decoder"]["bytes"] = "big"
    with pytest.raises(VarExportError, match="engines.decoder.bytes"):
        validate_document(bad, EngineManifest, VarExportError, where="engines.json")


def test_external_data_a_manifest_does_not_list_is_refused(tmp_path):
    import hashlib

    from tests.test_bundle import FIELDS, _graph
    from var_export.bundle import load_bundle, write_bundle

    graphs = {n: _graph(tmp_path / n, ["x"], ["y"], external=n + ".data") for n in
              ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")}
    out = write_bundle(tmp_path / "b", graphs=graphs, manifest_fields=FIELDS, calibration=None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "decoder_model_merged.onnx.data" in manifest["files"]  # listed with its sha256
    g = out / "decoder_model_merged.onnx"
    m = onnx.load(str(g), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "other.data"
    onnx.save_model(m, str(g))
    shutil.copyfile(out / "decoder_model_merged.onnx.data", out / "other.data")
    manifest["files"]["decoder_model_merged.onnx"] = {"sha256": hashlib.sha256(g.read_bytes()).hexdigest(),
                                                      "bytes": g.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="other.data"):
        load_bundle(out)


# ------------------------------------------------------------------- 6. runtime inputs


def _meta(hidden=8, lv=2, kv=2, hd=4) -> dict:
    arg = lambda name, shape, t: SimpleNamespace(name=name, shape=shape, type=t)  # noqa: E731
    meta = {
        "inputs_embeds": arg("inputs_embeds", ["B", "S", hidden], "tensor(float)"),
        "attention_mask": arg("attention_mask", ["B", "T"], "tensor(int64)"),
        "position_ids": arg("position_ids", ["B", "S"], "tensor(int64)"),
        "past_key_values.0.key": arg("past_key_values.0.key", ["B", kv, "P", hd], "tensor(float)"),
        "past_key_values.0.value": arg("past_key_values.0.value", ["B", kv, "P", hd], "tensor(float)"),
        "visual_token_mask": arg("visual_token_mask", ["B", "T"], "tensor(bool)"),
        "past_sink_mask": arg("past_sink_mask", ["B", lv, "P"], "tensor(bool)"),
    }
    return meta


def _feeds(b=2, s=3, p=0, **change):
    f = {
        "inputs_embeds": np.zeros((b, s, 8), np.float32),
        "attention_mask": np.ones((b, p + s), np.int64),
        "position_ids": np.zeros((b, s), np.int64),
        "past": {"past_key_values.0.key": np.zeros((b, 2, p, 4), np.float32),
                 "past_key_values.0.value": np.zeros((b, 2, p, 4), np.float32),
                 "past_sink_mask": np.zeros((b, 2, p), np.bool_)},
        "visual_token_mask": np.zeros((b, p + s), np.bool_),
    }
    f.update(change)
    return f


@pytest.mark.parametrize("change,match", [
    ({"visual_token_mask": np.zeros((2, 3), np.float32)}, "visual_token_mask: expected a bool"),
    ({"visual_token_mask": np.zeros((2, 4), np.bool_)}, "visual_token_mask: expected the attention"),
    ({"attention_mask": np.ones((3, 3), np.int64)}, r"attention_mask: expected shape \(B=2"),
    ({"attention_mask": np.ones((2, 3), np.float32)}, "attention_mask: expected an integer"),
    ({"attention_mask": np.full((2, 3), 2, np.int64)}, "only 0 and 1"),
    ({"inputs_embeds": np.zeros((2, 3, 7), np.float32)}, "hidden size D = 8"),
    ({"inputs_embeds": np.full((2, 3, 8), np.nan, np.float32)}, "finite"),
    ({"position_ids": np.zeros((2, 2), np.int64)}, "position_ids: expected shape"),
    ({"past": {}}, "decode before prefill|empty_past"),
    ({"attention_mask": np.ones((2, 7), np.int64)}, r"past length P = T - S = 4"),  # decode before prefill
])
def test_step_inputs_are_checked_before_onnx_runtime(change, match):
    from var_export.runtime import check_step_inputs

    f = _feeds(**change)
    with pytest.raises(InputValidationError, match=match):
        check_step_inputs(_meta(), f["inputs_embeds"], f["attention_mask"], f["position_ids"], f["past"],
                          f["visual_token_mask"])


def test_good_step_inputs_pass_and_are_typed():
    from var_export.runtime import check_step_inputs

    f = _feeds(p=2)
    feeds = check_step_inputs(_meta(), f["inputs_embeds"], f["attention_mask"], f["position_ids"], f["past"],
                              f["visual_token_mask"])
    assert feeds["attention_mask"].dtype == np.int64 and feeds["visual_token_mask"].dtype == np.bool_


@pytest.mark.parametrize("budget", [2.5, "3", True, 0, -1, None])
def test_token_budget_must_be_a_positive_integer(budget):
    from var_export.runtime import check_token_budget

    with pytest.raises(ConfigError, match="max_new_tokens"):
        check_token_budget(budget)
    assert check_token_budget(np.int64(4)) == 4


@pytest.mark.parametrize("prompt,match", [
    (b"\xff\xfe", "not valid UTF-8"), ("a \udcff b", "not valid UTF-8"), ("  ", "non-empty"),
    (None, "as text"), ("x" * 1_000_001, "characters"),
])
def test_prompts_that_are_not_text(prompt, match):
    from var_export.runtime import check_prompt

    with pytest.raises(DataError, match=match):
        check_prompt(prompt)


def test_decompression_bombs_are_clear_errors_without_warnings(tmp_path, monkeypatch):
    from PIL import Image

    from var_export.inputs import load_image

    Image.new("1", (9000, 8000)).save(tmp_path / "bomb.png")  # 72 MP, a few kB on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="9000x8000"):
            load_image(tmp_path / "bomb.png")
        Image.new("RGB", (20, 20)).save(tmp_path / "warn.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: PIL's warning zone
        with pytest.raises(DataError, match="too large"):
            load_image(tmp_path / "warn.png")
    assert not caught


# ---------------------------------------------------------------------------- 7. no-op


def test_calibration_without_heads_is_refused_for_hybrid_and_static(tmp_path, tiny_loaded):
    from var_export.models import model_fingerprint
    from var_export.pipeline import BuildOptions, build_bundle

    cal = json.loads(json.dumps(GOOD_CAL))
    cal.update(fingerprint=model_fingerprint(tiny_loaded.config), heads=[],
               layers=[{"layer": 2, "image_centric_score": [0.1, 0.42, 0.3]}])
    (tmp_path / "c.json").write_text(json.dumps(cal))
    for mode in ("static", "hybrid"):
        with pytest.raises(CalibrationError, match=r"L2H1=0\.420.*--heads dynamic.*--head-threshold"):
            build_bundle(BuildOptions(out=tmp_path / "b", calibration=tmp_path / "c.json", heads=mode))
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------- 8. graphs that load


def test_fused_qkv_decoder_gets_its_query_heads_from_the_q_slice(tmp_path):
    from tests.fused_qkv import fused_qkv_case

    ok, detail = fused_qkv_case(tmp_path)
    assert ok, detail


def test_a_graph_that_does_not_load_is_never_written(tmp_path, monkeypatch):
    from var_export.verify import verify_graph

    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "y"], ["z"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])]))
    onnx.save_model(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(GraphCheckError, match="bad.onnx"):
        verify_graph(tmp_path / "bad.onnx")


@pytest.mark.parametrize("fixture", ["dynamo", "legacy", "optimum"])
def test_var_decoder_keeps_ort_symbolic_shape_inference_working(tmp_path, fixture):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from var_export.rewrite import rewrite_decoder

    out = tmp_path / "var.onnx"
    rewrite_decoder(ROOT / f"tests/fixtures/foreign/{fixture}_llama.onnx", out,
                    VarSettings(sink_dims=(5, 17), heads="dynamic", layers="1:"))
    inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(out)), auto_merge=True)
    shapes = {vi.name: vi for vi in inferred.graph.value_info}
    assert any(name.endswith("/sink") for name in shapes)


# ------------------------------------------------------------------------- 9. network


def test_a_hub_id_read_from_a_file_is_never_downloaded(tmp_path, monkeypatch):
    from var_export.models import load_llava

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelLoadError, match="never triggers a download"):
        load_llava("someone/llava-clone", offline=True)


# ------------------------------------------------------------------------------ 10. CLI


@pytest.mark.parametrize("argv", [
    ["export", "--ou", "x"], ["export", "--no-v", "--out", "x"], ["calibrate", "--ou", "c.json"],
    ["rewrite", "in.onnx", "--ou", "o.onnx"], ["run", "b", "--ima", "i", "--prompt", "p"],
    ["inspect", "b", "--image", "i", "--prom", "p", "--out", "o"], ["build-trt", "b", "--lint-o"],
    ["bench", "--roun", "1"],
])
def test_no_subcommand_accepts_option_abbreviations(argv, capsys):
    from var_export.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_version(capsys):
    rc, text = _cli(["--version"], capsys)
    assert rc == 0 and text.startswith("var-export ")


def test_quiet_silences_third_party_output(monkeypatch):
    from var_export.cli import common

    for var in ("TORCH_LOGS", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings():
        common.setup_logging(SimpleNamespace(quiet=True, verbose=False))
        warnings.warn("torchvision is not installed", UserWarning, stacklevel=1)  # swallowed, not printed
        assert warnings.filters[0][0] == "ignore"
    assert os.environ["TORCH_LOGS"] == "-onnx" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
