"""The kernel formulation: ``var_export::VarAttention`` (var_export/kernels/var_attention.cc).

* the op alone against a NumPy transcription of DESIGN.md §1 (masks bool / additive / none,
  grouped KV heads, head lists, the row test on and off, fully masked rows, ragged sizes);
* the op with VAR inert (no visual token) against ONNX Runtime's own ``Attention`` op;
* tiny-llava (planted sinks and image-centric heads) exported with SDPA, VAR baked with
  ``shift="kernel"``: < 1e-4 max |Δlogits| against ``VarReference`` over prefill + 4 decode steps,
  batch 2 left-padded, every head mode; against the fused-qk graph too;
* clear errors: bad shapes, fp16 graphs, no compiler, a wrong ``VAR_EXPORT_KERNEL_LIB``.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from var_export import kernels
from var_export.core.errors import ConfigError

ATOL = 1e-4
DECODE_STEPS = 4
LOWEST = np.finfo(np.float32).min


@pytest.fixture(scope="module")
def library():
    import shutil

    if not any(shutil.which(c) for c in kernels.COMPILERS):
        pytest.skip("no C++ compiler on this machine (the kernel formulation builds its op on first use)")
    return kernels.library_path()


def _op_model(mask_type, attrs, *, domain=kernels.KERNEL_DOMAIN, op="VarAttention") -> bytes:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v")]
    names = ["q", "k", "v", "m" if mask_type else ""]
    if mask_type:
        inputs.append(helper.make_tensor_value_info("m", mask_type, None))
    if op == "VarAttention":
        inputs += [helper.make_tensor_value_info(n, TensorProto.BOOL, None) for n in ("sink", "visual")]
        names += ["sink", "visual"]
        node = helper.make_node(op, names, ["y"], domain=domain, **attrs)
    else:
        node = helper.make_node(op, [n for n in names if n], ["y"], **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", f, None)])
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(kernels.KERNEL_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _session(model: bytes, library=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def reference(q, k, v, mask, sink, visual, *, scale, p, rho, summ, heads, row_test, causal=False):
    """DESIGN.md §1 on dense (B, H, S, T) probabilities; query i sits at key position T - S + i."""
    _, h, s_len, _ = q.shape
    t_len = k.shape[2]
    k, v = np.repeat(k, h // k.shape[1], 1), np.repeat(v, h // v.shape[1], 1)
    scores = np.einsum("bhsd,bhtd->bhst", q, k) * scale
    if mask is not None:
        scores = np.where(mask, scores, LOWEST) if mask.dtype == bool else scores + mask
    if causal:
        scores = np.where(np.tril(np.ones((s_len, t_len), bool)), scores, LOWEST)
    a = np.exp(scores - scores.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    code = (2 * visual + sink)[:, None, None, :]
    vs, ts, vn = ((a * (code == c)).sum(-1) for c in (3, 1, 2))
    pos = t_len - s_len + np.arange(s_len)
    eligible = ~visual[:, pos] & (np.cumsum(visual, 1)[:, pos] > 0)
    selected = eligible[:, None, :] & (visual & sink).any(1)[:, None, None] & (vn > 0)
    if heads:
        selected &= np.isin(np.arange(h), heads)[None, :, None]
    if row_test:
        image = vs + vn
        with np.errstate(invalid="ignore"):  # no visual key: 0 / 0, never selected anyway
            portion = vs / (image + 1e-6 * visual.sum(1)[:, None, None])
        selected &= (portion <= rho) & (image >= summ)
    boost = 1 + (1 - p) * (vs + ts) / np.where(vn > 0, vn, 1)
    per_code = np.stack([np.ones_like(vs), np.full_like(vs, p), boost, np.full_like(vs, p)], -1)
    per_code = np.where(selected[..., None], per_code, 1.0)
    w = a * np.take_along_axis(per_code, np.broadcast_to(code, a.shape).astype(np.int64), -1)
    return np.einsum("bhst,bhtd->bhsd", w, v).astype(np.float32), selected


def _case(rng, b=2, h=8, hk=4, s=7, t=45, d=64, dv=None):
    q = rng.standard_normal((b, h, s, d)).astype(np.float32)
    k = (2 * rng.standard_normal((b, hk, t, d))).astype(np.float32)
    v = rng.standard_normal((b, hk, t, dv or d)).astype(np.float32)
    visual = np.zeros((b, t), bool)
    sink = np.zeros((b, t), bool)
    if t > 25:
        visual[:, 5:25] = True
        sink[:, [6, 9, 2]] = True  # two visual sinks, one text sink
        k[:, :, 6] += 4 * q[:, ::h // hk].mean(2)  # sink 6 draws attention
    keep = np.ones((b, t), bool)
    keep[1, :3] = False  # left padding of sample 1
    allowed = keep[:, None, None, :] & np.tril(np.ones((s, t), bool), t - s)[None, None]
    return q, k, v, sink, visual, allowed


MASKS = {
    "none": lambda allowed: None,
    "bool": lambda allowed: allowed,
    "additive": lambda allowed: np.where(allowed, 0, LOWEST).astype(np.float32),
    "bool-per-head": lambda allowed: np.broadcast_to(allowed, (allowed.shape[0], 8, *allowed.shape[2:])).copy(),
    "bool-2d": lambda allowed: allowed[0, 0],  # (S, T), broadcast over batch and heads
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize(("heads", "row_test"), [([], 1), ([1, 3, 6], 1), ([0, 2, 5], 0)])
def test_op_matches_the_numpy_transcription(library, mask_kind, heads, row_test):
    rng = np.random.default_rng(3)
    q, k, v, sink, visual, allowed = _case(rng)
    mask = MASKS[mask_kind](allowed)
    attrs = {"scale": 0.125, "p": 0.6, "rho": 0.5, "summ": 0.05, "row_test": row_test, **({"heads": heads} if heads else {})}
    mask_type = None if mask is None else (TensorProto.BOOL if mask.dtype == bool else TensorProto.FLOAT)
    feeds = {"q": q, "k": k, "v": v, "sink": sink, "visual": visual, **({"m": mask} if mask is not None else {})}
    got = _session(_op_model(mask_type, attrs), library).run(None, feeds)[0]
    want, selected = reference(q, k, v, mask, sink, visual, scale=0.125, p=0.6, rho=0.5, summ=0.05,
                               heads=heads, row_test=row_test)
    assert 0 < selected.sum() < selected.size  # some rows change, some do not
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("s", "t", "d", "dv"), [(1, 1, 8, 8), (1, 300, 64, 64), (5, 5, 20, 12), (40, 77, 128, 128),
                                                  (33, 33, 96, 80)])
def test_op_sizes_decode_prefill_and_ragged(library, s, t, d, dv):
    """Decode rows (dot products), prefill blocks (key tiles), head sizes that are no multiple of the vector width."""
    rng = np.random.default_rng(s * 1000 + t)
    q, k, v, sink, visual, allowed = _case(rng, b=2, h=4, hk=2, s=s, t=t, d=d, dv=dv)
    visual[:, :] = False
    visual[:, : max(1, t // 2)] = True if t > 1 else False
    sink[:, :] = False
    sink[:, 0] = True
    attrs = {"scale": d ** -0.5, "p": 0.6, "rho": 0.5, "summ": 0.0, "row_test": 1}
    got = _session(_op_model(TensorProto.BOOL, attrs), library).run(
        None, {"q": q, "k": k, "v": v, "m": allowed, "sink": sink, "visual": visual})[0]
    want, _ = reference(q, k, v, allowed, sink, visual, scale=d ** -0.5, p=0.6, rho=0.5, summ=0.0, heads=[], row_test=1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_fully_masked_rows_are_finite(library):
    """A row whose keys are all masked (a padded query) is a softmax over equal scores of all T
    keys, as ONNX Runtime's Attention computes it (VAR included), never NaN that would reach the
    KV cache."""
    rng = np.random.default_rng(0)
    q, k, v, sink, visual, allowed = _case(rng)
    allowed[1, :, :2] = False  # sample 1: the first two queries see nothing
    got = _session(_op_model(TensorProto.BOOL, {"scale": 0.125, "summ": 0.05}), library).run(
        None, {"q": q, "k": k, "v": v, "m": allowed, "sink": sink, "visual": visual})[0]
    want, selected = reference(q, k, v, allowed, sink, visual, scale=0.125, p=0.6, rho=0.5, summ=0.05,
                               heads=[], row_test=1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("mask_kind", "causal", "s"), [("bool", 0, 7), ("additive", 0, 7), ("none", 0, 7),
                                                        ("none", 1, 45)])
def test_without_visual_tokens_it_is_onnx_attention(library, mask_kind, causal, s):
    """VAR inert (no visual token, so no eligible row): VarAttention = ONNX Runtime's Attention."""
    rng = np.random.default_rng(1)
    q, k, v, sink, visual, allowed = _case(rng, s=s)
    visual[:] = False
    mask = MASKS[mask_kind](allowed)
    mask_type = None if mask is None else (TensorProto.BOOL if mask.dtype == bool else TensorProto.FLOAT)
    feeds = {"q": q, "k": k, "v": v, **({"m": mask} if mask is not None else {})}
    want = _session(_op_model(mask_type, {"scale": 0.125, "is_causal": causal}, op="Attention")).run(None, feeds)[0]
    got = _session(_op_model(mask_type, {"scale": 0.125, "is_causal": causal}), library).run(
        None, {**feeds, "sink": sink, "visual": visual})[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _sink_op_model(attrs) -> bytes:
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    names = ["q", "k", "v", "m", "", "visual", "x", "past", "may"]
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v", "x")]
    inputs += [helper.make_tensor_value_info(n, b, None) for n in ("m", "visual", "past", "may")]
    node = helper.make_node("VarAttention", names, ["y", "row"], domain=kernels.KERNEL_DOMAIN, **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", f, None),
                                                    helper.make_tensor_value_info("row", b, None)])
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(kernels.KERNEL_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize("past_len", [0, 30])
def test_sink_detection_folded_in(library, past_len):
    """Inputs 6-8 instead of the flags: the op computes the layer's sink flags from the residual
    (build_sink_flags' arithmetic), returns them as its second output, and attends with them."""
    rng = np.random.default_rng(2)
    q, k, v, _, visual, allowed = _case(rng, s=45 - past_len)
    s_len, t_len, dims, tau = q.shape[2], k.shape[2], [3, 11], 4.0
    x = rng.standard_normal((2, s_len, 32)).astype(np.float32)
    x[:, ::5, 11] = 30.0  # every fifth current token is a sink
    past = np.zeros((2, 1, past_len), bool)
    if past_len:
        past[:, :, 6] = True  # a visual sink in the cache
    may = np.ones((2, s_len), bool)
    may[1, :3] = False  # padding
    attrs = {"scale": 0.125, "summ": 0.05, "sink_dims": dims, "tau": tau}
    y, row = _session(_sink_op_model(attrs), library).run(
        None, {"q": q, "k": k, "v": v, "m": allowed, "visual": visual, "x": x, "past": past, "may": may})
    tau2 = np.float32(tau) * np.float32(tau)
    threshold = (x * x).mean(-1) * tau2 + np.float32(tau2 * np.float32(1e-6))
    new = ((x[..., dims] ** 2).max(-1) > threshold) & may
    want_flags = np.concatenate([past[:, 0], new], 1)
    assert row.shape == (2, 1, t_len) and (row[:, 0] == want_flags).all() and new.sum() > 2
    want, _ = reference(q, k, v, allowed, want_flags, visual, scale=0.125, p=0.6, rho=0.5, summ=0.05,
                        heads=[], row_test=1)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=0)


def test_bad_shapes_are_named(library):
    rng = np.random.default_rng(0)
    q, k, v, sink, visual, allowed = _case(rng)
    sess = _session(_op_model(TensorProto.BOOL, {"scale": 0.125}), library)
    with pytest.raises(Exception, match=r"VarAttention: sink must be bool \(2, 45\) or \(2, 1, 45\), found \(2, 44\)"):
        sess.run(None, {"q": q, "k": k, "v": v, "m": allowed, "sink": sink[:, :44], "visual": visual})
    with pytest.raises(Exception, match="does not broadcast to"):
        sess.run(None, {"q": q, "k": k, "v": v, "m": allowed[..., :44], "sink": sink, "visual": visual})
    with pytest.raises(Exception, match="not a multiple of the key/value head count"):
        sess.run(None, {"q": q, "k": k[:, :3], "v": v[:, :3], "m": allowed, "sink": sink, "visual": visual})


# ------------------------------------------------------------------------------ the library


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.ENV_LIBRARY, raising=False)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kernels.KernelBuildError, match="needs a C\\+\\+17 compiler.*--formulation fused-qk"):
        kernels.library_path()


def test_a_wrong_library_path_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.ENV_LIBRARY, str(tmp_path / "missing.so"))
    with pytest.raises(ConfigError, match="is not a file"):
        kernels.library_path()


def test_graph_uses_kernel():
    plain = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 23)])
    assert not kernels.graph_uses_kernel(plain)
    assert kernels.graph_uses_kernel(onnx.load_from_string(_op_model(None, {"scale": 1.0})))
    assert kernels.graph_uses_kernel(_op_model(None, {"scale": 1.0}))


# ------------------------------------------------------------------------------ the formulation


@pytest.fixture(scope="module")
def tiny(tiny_llava_graphs):
    from benchmarks.bench_var import tiny_llava_case
    from var_export.calibration import tiny_llava as tl

    heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
    return tiny_llava_case(batch=2, seed=7), tiny_llava_graphs["fused-novar"], heads


def _settings(mode: str):
    from var_export.calibration import tiny_llava as tl
    from var_export.core.settings import VarSettings

    return VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads=mode, layers="2:")


@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
def test_kernel_formulation_matches_reference(library, tiny, mode, parity_results):
    from var_export.calibration.reference import VarReference
    from var_export.passes.fused_var import apply_fused_var
    from var_export.timing import ort_session, run_decode

    case, fused, heads = tiny
    settings = _settings(mode)
    model, report = apply_fused_var(ir.load(str(fused)), settings, heads, shift="kernel")
    assert report.changed_layers == [2, 3] and model.metadata_props["var_export.formulation"] == "kernel"
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count((kernels.KERNEL_DOMAIN, "VarAttention")) == 2 and ops.count(("", "Attention")) == 2
    want = case.reference_logits(VarReference(case.model, settings, heads), DECODE_STEPS)
    got = run_decode(ort_session(model), case, DECODE_STEPS, var=True).logits
    valid = case.valid_rows()
    worst = max(np.abs(g[valid if i == 0 else slice(None)] - w[valid if i == 0 else slice(None)]).max()
                for i, (g, w) in enumerate(zip(got, want)))
    parity_results[f"tiny-llava kernel {mode} (batch 2 left-padded, prefill + {DECODE_STEPS} decode)"] = float(worst)
    assert worst < ATOL, (mode, worst)
    plain = case.reference_logits(VarReference(case.model, None), 0)
    assert np.abs(plain[0] - want[0])[valid].max() > 1e-3  # VAR changes the logits: parity means something


def test_kernel_agrees_with_fused_qk_and_keeps_untouched_layers(library, tiny):
    """Hybrid with heads in layer 3 only: layer 2 keeps its Attention; kernel = fused-qk."""
    from var_export.passes.fused_var import apply_fused_var
    from var_export.timing import ort_session, run_decode

    case, fused, heads = tiny
    only3 = [(la, h) for la, h in heads if la == 3]
    settings = _settings("hybrid")
    kern, rep = apply_fused_var(ir.load(str(fused)), settings, only3, shift="kernel")
    qk, _ = apply_fused_var(ir.load(str(fused)), settings, only3, shift="qk")
    assert rep.changed_layers == [3]
    per_layer = collections.Counter(n.name.split("/")[1] for n in kern.graph if n.name.startswith("var/L"))
    assert per_layer["L3"] == 2 and per_layer["L2"] == 15  # Gather + VarAttention; L2's sink detection
    runs = [run_decode(ort_session(m), case, 2, var=True, keep_logits=True) for m in (kern, qk)]
    a, b = runs[0].logits, runs[1].logits
    valid = case.valid_rows()
    for i, (x, y) in enumerate(zip(a, b)):
        rows = valid if i == 0 else slice(None)
        assert np.abs(x[rows] - y[rows]).max() < ATOL


def test_fp16_graphs_are_refused(tiny_llava_graphs):
    from var_export.passes.fused_var import apply_fused_var

    with pytest.raises(ConfigError, match="kernel formulation runs fp32 graphs.*fused-qk"):
        apply_fused_var(ir.load(str(tiny_llava_graphs["fused16-novar"])), _settings("dynamic"), None, shift="kernel")


def test_kernel_bundle_generates_what_the_naive_bundle_does(library, tiny, tiny_bundles, tmp_path):
    """A bundle whose decoder has VarAttention: VarRuntime registers the op itself and generates
    the naive VAR bundle's tokens (same settings, heads and weights)."""
    from var_export.bundle import write_bundle
    from var_export.calibration import tiny_llava as tl
    from var_export.core.contract import DECODER
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import save_model
    from var_export.runtime import VarRuntime

    _, fused, _ = tiny
    heads = sorted(tl.PLANTED_IMAGE_CENTRIC_HEADS + tl.PLANTED_MIXED_HEADS)
    naive = tiny_bundles["var"]
    settings = _settings("hybrid")
    model, report = apply_fused_var(ir.load(str(fused)), settings, heads, shift="kernel")
    (tmp_path / "dec").mkdir()
    save_model(model, tmp_path / "dec" / DECODER)
    graphs = {name: naive / name for name in ("vision_encoder.onnx", "embed_tokens.onnx")}
    bundle = write_bundle(
        tmp_path / "kernel_bundle", graphs={**graphs, DECODER: tmp_path / "dec" / DECODER}, calibration=None,
        processor=tiny_bundles["processor"], extra_files=[naive / n for n in ("config.json", "generation_config.json")],
        manifest_fields={"model_id": "tiny-llava", "fingerprint": {"test": 1}, "opset": 23, "formulation": "kernel",
                         "var": settings.to_dict(), "var_layers": report.var_layers, "head_mode": "hybrid",
                         "heads": [list(h) for h in heads]},
    )
    got = VarRuntime(bundle).generate(tiny_bundles["image"], "What is in the picture?", max_new_tokens=8)
    want = VarRuntime(naive).generate(tiny_bundles["image"], "What is in the picture?", max_new_tokens=8)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 8


def test_cli_kernel_portable_library_agrees_and_foreign_files_are_refused(library, tmp_path, capsys):
    """`var-export kernel` prints the cached library; `--out --portable` (x86-64-v3 instead of
    -march=native) writes one that computes what the native one does; a file var-export did not
    write is never replaced."""
    from var_export.cli import main

    assert main(["kernel"]) == 0
    assert capsys.readouterr().out.strip() == str(library)
    portable = tmp_path / "serve" / "libvar_attention.so"
    assert main(["kernel", "--out", str(portable), "--portable"]) == 0 and portable.is_file()
    rng = np.random.default_rng(5)
    q, k, v, sink, visual, allowed = _case(rng)
    feeds = {"q": q, "k": k, "v": v, "m": allowed, "sink": sink, "visual": visual}
    model = _op_model(TensorProto.BOOL, {"scale": 0.125, "summ": 0.05})
    np.testing.assert_allclose(_session(model, portable).run(None, feeds)[0],
                               _session(model, library).run(None, feeds)[0], atol=1e-5, rtol=0)
    foreign = tmp_path / "serve" / "mine.so"
    foreign.write_bytes(b"not ours")
    assert main(["kernel", "--out", str(foreign)]) != 0
    assert foreign.read_bytes() == b"not ours" and "not written by var-export" in capsys.readouterr().err
    assert main(["kernel", "--portable"]) != 0  # --portable without --out


@pytest.mark.parametrize(("options", "message"), [
    ({"formulation": "kernel", "dtype": "fp16"}, "kernel runs fp32 graphs"),
    ({"fused": True, "formulation": "naive"}, "drop --fused"),
    ({"formulation": "fused"}, "must be one of naive, fused-qk, fused-mask, kernel"),
    ({"formulation": "kernel", "layout": "transformers.js"}, "onnxruntime-web cannot load"),
])
def test_build_options_refuse_impossible_formulations(tmp_path, options, message):
    from var_export.pipeline import BuildOptions

    with pytest.raises(ConfigError, match=message):
        BuildOptions(out=tmp_path / "b", **options)
    assert BuildOptions(out=tmp_path / "b", fused=True).formulation == "fused-qk"
    assert BuildOptions(out=tmp_path / "b", formulation="kernel").fused


def test_tensorrt_plan_with_the_kernel_is_refused_before_any_work(tmp_path, capsys):
    from var_export.cli import main

    assert main(["--model", "tiny-llava", "--out", str(tmp_path / "e.plan"), "--formulation", "kernel"]) != 0
    assert "no plugin for it" in capsys.readouterr().err and not any(tmp_path.iterdir())
