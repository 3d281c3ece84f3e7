"""Fused VAR (passes/fused_var.py) on ONNX ``Attention`` graphs against the PyTorch reference.

tiny-llava (planted sinks and image-centric heads, GQA) exported with SDPA at opset 23; batch 2
left-padded, prefill + 3 decode steps, every head mode, both score-shift forms; < 1e-4 max |Δlogits|
vs ``VarReference`` and vs the naive VAR graph (``passes.pipeline.apply_var`` on the eager export).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from var_export.core.errors import AlreadyAppliedError, GraphPatternError
from var_export.core.settings import VarSettings

ATOL = 1e-4
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llava_graphs):
    """(case, folder with fused.onnx (SDPA export) and eager.onnx, heads): the session's exports of
    tiny-llava's decoder (conftest.tiny_llava_graphs, the same weights as the case's model)."""
    import shutil

    from benchmarks.bench_var import tiny_llava_case
    from var_export.calibration import tiny_llava as tl

    out = tmp_path_factory.mktemp("fused_var")
    case = tiny_llava_case(batch=2, seed=7)
    shutil.copyfile(tiny_llava_graphs["fused-novar"], out / "fused.onnx")
    shutil.copyfile(tiny_llava_graphs["naive-novar"], out / "eager.onnx")
    heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
    return case, out, heads


def _settings(mode: str) -> VarSettings:
    from var_export.calibration import tiny_llava as tl

    return VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads=mode, layers="2:")


def test_locate_rejects_eager_and_finds_attention(tiny):
    from var_export.passes.fused_var import locate_fused_layers

    _, out, _ = tiny
    found = locate_fused_layers(ir.load(str(out / "fused.onnx")))
    assert [m.layer for m in found] == [0, 1, 2, 3]
    assert all(m.num_heads == 8 and m.head_dim == 128 for m in found)
    with pytest.raises(GraphPatternError, match="no ONNX Attention"):
        locate_fused_layers(ir.load(str(out / "eager.onnx")))


def test_apply_var_on_attention_ops_points_at_the_fused_formulation(tiny):
    from var_export.passes.pipeline import apply_var

    _, out, _ = tiny
    with pytest.raises(GraphPatternError) as err:
        apply_var(ir.load(str(out / "fused.onnx")), _settings("dynamic"), None)
    msg = str(err.value)
    assert "layer 3: ai.onnx::Attention" in msg and "var_export.passes.fused_var.apply_fused_var" in msg


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
@pytest.mark.parametrize("shift", ["qk", "mask"])
def test_fused_var_matches_reference_and_naive(tiny, mode, shift):
    from var_export.calibration.reference import VarReference
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var
    from var_export.timing import ort_session, run_decode

    case, out, heads = tiny
    settings = _settings(mode)
    fused, report = apply_fused_var(ir.load(str(out / "fused.onnx")), settings, heads, shift=shift)
    assert report.var_layers == [2, 3] and report.changed_layers == [2, 3]
    ops = [n.op_type for n in fused.graph]
    assert "Softmax" not in ops and ops.count("Attention") == 4 + 2  # + one pass-1 per VAR layer
    naive, _ = apply_var(ir.load(str(out / "eager.onnx")), settings, heads)

    ref = VarReference(case.model, settings, heads)
    want = case.reference_logits(ref, DECODE_STEPS)
    got_fused = run_decode(ort_session(fused), case, DECODE_STEPS, var=True).logits
    got_naive = run_decode(ort_session(naive), case, DECODE_STEPS, var=True).logits
    valid = case.valid_rows()
    for step, (w, f, n) in enumerate(zip(want, got_fused, got_naive)):
        rows = valid if step == 0 else slice(None)
        assert np.abs(f[rows] - w[rows]).max() < ATOL, (mode, shift, step)
        assert np.abs(f[rows] - n[rows]).max() < ATOL, (mode, shift, step)
    # VAR actually changes something on this model (otherwise parity proves nothing)
    plain = case.reference_logits(VarReference(case.model, None), DECODE_STEPS)
    assert max(np.abs(p - w)[valid].max() for p, w in zip(plain[:1], want[:1])) > 1e-3


def test_fused_var_smoke_matches_reference_without_duplicates(tiny):
    """The default suite's fused parity: hybrid heads, qk shift, prefill + 2 decode steps."""
    from passes_fixtures import duplicates_added

    from var_export.calibration.reference import VarReference
    from var_export.passes.fused_var import apply_fused_var, fused_var_passes
    from var_export.timing import ort_session, run_decode

    case, out, heads = tiny
    settings = _settings("hybrid")
    base = ir.load(str(out / "fused.onnx"))
    fused, report = apply_fused_var(base, settings, heads)
    assert report.changed_layers == [2, 3]
    assert duplicates_added(base, fused) == (0, [])
    n = fused.graph.num_nodes()  # each pass is idempotent and says so
    for shift in ("qk", "mask"):
        for p in fused_var_passes(settings, heads, num_layers=4, shift=shift):
            assert not p(fused).modified, (shift, type(p).__name__)
    assert fused.graph.num_nodes() == n
    want = case.reference_logits(VarReference(case.model, settings, heads), 2)
    got = run_decode(ort_session(fused), case, 2, var=True).logits
    plain = run_decode(ort_session(base), case, 0, var=False).logits
    valid = case.valid_rows()
    for step, (w, g) in enumerate(zip(want, got)):
        rows = valid if step == 0 else slice(None)
        assert np.abs(g[rows] - w[rows]).max() < ATOL, step
    assert np.abs(plain[0] - got[0])[valid].max() > 1e-3  # VAR changed the prefill logits


def _tensorrt_rtx_parse(trt, model: ir.Model) -> list[str]:
    """TensorRT-RTX's ONNX parser on ``model``: its errors (node, message), [] when it parses."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(ir.serde.serialize_model(model).SerializeToString())
    errors = [f"{parser.get_error(i).node_name()}: {parser.get_error(i).desc()}" for i in range(parser.num_errors)]
    return [] if ok else errors or ["parse failed without an error"]


@pytest.mark.parametrize("formulation", ["naive", "fused-qk", "fused-mask"])
def test_tensorrt_rtx_parses_every_formulation(tiny, formulation):
    """TensorRT's own parser is the lint: each VAR formulation parses (ahead of time, no GPU)."""
    trt = pytest.importorskip("tensorrt_rtx")
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var

    _, out, heads = tiny
    settings = _settings("dynamic")
    if formulation == "naive":
        model, _ = apply_var(ir.load(str(out / "eager.onnx")), settings, None)
    else:
        model, _ = apply_fused_var(ir.load(str(out / "fused.onnx")), settings, None, shift=formulation[6:])
    assert _tensorrt_rtx_parse(trt, model) == []


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("shift", ["qk", "mask"])
def test_tensorrt_rtx_builds_fused_var(tiny, tmp_path, shift, dtype):
    """An engine builds ahead of time for both shifts in fp32 and fp16 (dynamic heads here; the
    default suite builds the hybrid graphs in tests/test_trt_engines.py), in a child process:
    a builder crash fails this test, not the run."""
    pytest.importorskip("tensorrt_rtx")
    from var_export import trt
    from var_export.export import export_decoder
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import save_model

    case, out, _ = tiny
    base = out / ("fused.onnx" if dtype == "fp32" else "fused16.onnx")
    if not base.exists():
        export_decoder(case.model, base, dtype="fp16", fused=True)
    model, _ = apply_fused_var(ir.load(str(base)), _settings("dynamic"), None, shift=shift)
    save_model(model, tmp_path / "decoder_model_merged.onnx")
    config = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=2, max_seq=16, max_past=16)
    engines = trt.build_engines(tmp_path / "decoder_model_merged.onnx", tmp_path / "d.plan", config)
    assert engines.decoder.stat().st_size > 1_000_000
    assert engines.manifest["precision"] == dtype


def _prefill_fp16(model: ir.Model, case, var: bool) -> dict[str, np.ndarray]:
    from var_export.timing import ort_session

    session = ort_session(model)
    b = case.attention_mask.shape[0]
    feeds = {"inputs_embeds": case.inputs_embeds.astype(np.float16), "attention_mask": case.attention_mask,
             "position_ids": case.position_ids()}  # fmt: skip
    for i in range(case.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((b, case.kv_heads, 0, case.head_dim), np.float16)
    if var:
        feeds["visual_token_mask"] = case.visual
        feeds["past_sink_mask"] = np.zeros((b, 2, 0), bool)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.slow
@pytest.mark.parametrize("shift", ["qk", "mask"])
def test_fused_var_on_fp16_graph_tracks_the_reference(tiny, shift):
    """fp16 SDPA graph: masses, selection and row constants in fp32; logits within fp16 rounding of
    the fp32 reference and of the naive fp16 graph, the same sink masks as the naive graph."""
    from var_export.calibration.reference import VarReference
    from var_export.export import export_decoder
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var

    case, out, heads = tiny
    for name, fused in (("fused16.onnx", True), ("eager16.onnx", False)):
        if not (out / name).exists():
            export_decoder(case.model, out / name, dtype="fp16", fused=fused)
    settings = _settings("hybrid")
    fused, _ = apply_fused_var(ir.load(str(out / "fused16.onnx")), settings, heads, shift=shift)
    naive, _ = apply_var(ir.load(str(out / "eager16.onnx")), settings, heads)
    got, want_naive = _prefill_fp16(fused, case, True), _prefill_fp16(naive, case, True)
    off = _prefill_fp16(ir.load(str(out / "fused16.onnx")), case, False)["logits"].astype(np.float32)
    want = case.reference_logits(VarReference(case.model, settings, heads), 0)[0]
    plain = case.reference_logits(VarReference(case.model, None), 0)[0]
    rows = case.valid_rows()
    logits = got["logits"].astype(np.float32)
    np.testing.assert_array_equal(got["present_sink_mask"], want_naive["present_sink_mask"])
    assert np.abs(logits - want)[rows].max() < 2e-2
    assert np.abs(logits - want_naive["logits"].astype(np.float32))[rows].max() < 2e-2
    effect, effect32 = (logits - off)[rows], (want - plain)[rows]
    assert np.abs(effect32).max() > 1e-2 and np.abs(effect - effect32).max() < 0.1 * np.abs(effect32).max()


@pytest.mark.slow
def test_all_false_visual_mask_is_the_plain_decoder(tiny):
    from var_export.passes.fused_var import apply_fused_var
    from var_export.timing import ort_session, run_decode

    case, out, heads = tiny
    fused, _ = apply_fused_var(ir.load(str(out / "fused.onnx")), _settings("dynamic"), None)
    plain = run_decode(ort_session(ir.load(str(out / "fused.onnx"))), case, 1, var=False).logits
    got = run_decode(ort_session(fused), case.without_visual(), 1, var=True).logits
    rows = case.valid_rows()
    assert np.abs(got[0][rows] - plain[0][rows]).max() < 1e-5


def test_reapplying_is_an_error(tiny):
    from var_export.passes.fused_var import apply_fused_var

    _, out, _ = tiny
    once, _ = apply_fused_var(ir.load(str(out / "fused.onnx")), _settings("dynamic"), None, check=False)
    with pytest.raises(AlreadyAppliedError):
        apply_fused_var(once, _settings("dynamic"), None)


def test_torch_not_imported_by_pass():
    import subprocess
    import sys

    code = "import sys, var_export.passes.fused_var; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


_ = torch  # the fixtures build torch models
