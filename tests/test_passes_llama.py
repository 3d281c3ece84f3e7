"""VAR passes on a real dynamo export of a small random LlamaForCausalLM (GQA, eager).

Per VAR layer and step, the rewritten graph's sink flags and probs @ V equal numpy
DESIGN.md §1 applied to that layer's in-graph probabilities; prefill + decode steps,
batch 2 with left padding, all three head modes. The full-model parity against the
PyTorch reference (calibration/reference.py) lives with the reference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_fixtures import (
    LlamaSpec,
    numpy_sink_flags,
    numpy_var,
    probe,
    to_session,
)

from var_export.core.errors import AlreadyAppliedError
from var_export.core.settings import VarSettings
from var_export.passes import apply_var, load_model, locate_layers, save_model

SPEC = LlamaSpec(hidden=64, layers=3, heads=4, kv_heads=2)
HD = SPEC.hidden // SPEC.heads
SINK_DIMS = (5, 40)


@pytest.fixture(scope="session")
def llama_path(tiny_llama_plain):
    assert SPEC == LlamaSpec()  # conftest.tiny_llama_plain exports LlamaSpec()
    return tiny_llama_plain


def _prompt(rng):
    b, s = 2, 12
    x = (rng.standard_normal((b, s, SPEC.hidden)) * 0.5).astype(np.float32)
    visual = np.zeros((b, s), bool)
    visual[0, 2:8] = True
    visual[1, 4:9] = True  # sample 1 is left-padded by 2
    am = np.ones((b, s), np.int64)
    am[1, :2] = 0
    x[0, 3, 5] = 60.0  # visual sinks
    x[1, 6, 40] = -60.0
    x[0, 9, 40] = 60.0  # a text sink
    x[1, 0, 5] = 60.0  # a pad: never a sink
    pos = np.clip(np.cumsum(am, 1) - 1, 0, None)
    return x, visual, am, pos


def _feeds(x, am, pos, past, visual=None, past_sink=None):
    feeds = {"inputs_embeds": x, "attention_mask": am, "position_ids": pos}
    for i in range(SPEC.layers):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = past.get(
                f"present.{i}.{k}", np.zeros((x.shape[0], SPEC.kv_heads, 0, HD), np.float32)
            )
    if visual is not None:
        feeds["visual_token_mask"] = visual
        feeds["past_sink_mask"] = past_sink
    return feeds


def _run(sess, feeds):
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _check(out, names, feeds, settings, heads, var_layers):
    am = feeds["attention_mask"].astype(bool)
    past_len = feeds["past_sink_mask"].shape[2]
    selected = 0
    for j, layer in enumerate(var_layers):
        new = numpy_sink_flags(out[names[layer]["residual"]], SINK_DIMS, settings.tau) & am[:, past_len:]
        if past_len > 0:
            new[:] = False  # sink_scope prompt
        sink = np.concatenate([feeds["past_sink_mask"][:, j], new], 1)
        np.testing.assert_array_equal(out["present_sink_mask"][:, j], sink)
        a_new, sel = numpy_var(
            out[names[layer]["probs"]], feeds["visual_token_mask"], sink, rho=settings.rho,
            summ=settings.summ, p=settings.p, mode=settings.heads,
            heads=[h for la, h in heads or [] if la == layer],
        )  # fmt: skip
        selected += int(sel.sum())
        got = out[names[layer]["attn"]]
        np.testing.assert_allclose(got, a_new @ out[names[layer]["v"]].astype(np.float64), atol=2e-5, rtol=0)
    return selected


@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
def test_llama_export_matches_numpy_var(llama_path, mode):
    base = load_model(llama_path)
    assert [m.layer for m in locate_layers(base).matches] == [0, 1, 2]
    settings = VarSettings(sink_dims=SINK_DIMS, tau=5.0, heads=mode, layers="1:", rho=0.5, summ=0.2)
    heads = [(1, 0), (1, 3), (2, 2)] if mode != "dynamic" else None
    var_model, report = apply_var(base, settings, heads)
    assert report.var_layers == [1, 2] and all(lr.redistribution for lr in report.layers)
    assert report.layers[0].found["residual"] != "inputs_embeds"
    names = probe(var_model)
    sess, plain = to_session(var_model), to_session(base)
    rng = np.random.default_rng(0)
    x, visual, am, pos = _prompt(rng)
    feeds = _feeds(x, am, pos, {}, visual, np.zeros((2, 2, 0), bool))
    out, ref = _run(sess, feeds), _run(plain, _feeds(x, am, pos, {}))
    assert _check(out, names, feeds, settings, heads, [1, 2]) > 0
    assert out["present_sink_mask"][0, :, 3].all() and out["present_sink_mask"][1, :, 6].all()
    assert not out["present_sink_mask"][1, :, 0].any()
    effect = np.abs(out["logits"] - ref["logits"]).max()
    assert effect > 1e-3, f"VAR effect on logits {effect} is not clearly above the tolerance"
    for _ in range(2):  # greedy-free decode: a fresh random embedding per step
        step_x = (rng.standard_normal((2, 1, SPEC.hidden)) * 0.5).astype(np.float32)
        am = np.concatenate([am, np.ones((2, 1), np.int64)], 1)
        visual = np.concatenate([visual, np.zeros((2, 1), bool)], 1)
        pos = pos[:, -1:] + 1
        past = {k: v for k, v in out.items() if k.startswith("present.")}
        feeds = _feeds(step_x, am, pos, past, visual, out["present_sink_mask"])
        out = _run(sess, feeds)
        assert _check(out, names, feeds, settings, heads, [1, 2]) > 0
        assert out["present_sink_mask"].shape == (2, 2, am.shape[1])


def test_llama_all_false_visual_mask_equals_plain_graph(llama_path, tmp_path):
    base = load_model(llama_path)
    settings = VarSettings(sink_dims=SINK_DIMS, tau=5.0, heads="dynamic", layers="1:")
    var_model, _ = apply_var(base, settings, None)
    save_model(var_model, tmp_path / "var.onnx", external_data="var.onnx.data")
    assert (tmp_path / "var.onnx.data").exists()
    reloaded = load_model(tmp_path / "var.onnx")
    with pytest.raises(AlreadyAppliedError):
        apply_var(reloaded, settings, None)
    x, visual, am, pos = _prompt(np.random.default_rng(1))
    out = _run(to_session(tmp_path / "var.onnx"), _feeds(x, am, pos, {}, np.zeros_like(visual), np.zeros((2, 2, 0), bool)))
    ref = _run(to_session(base), _feeds(x, am, pos, {}))
    np.testing.assert_array_equal(out["logits"], ref["logits"])
    weights = [v.const_value for v in reloaded.graph.initializers.values()]
    assert any(isinstance(w, ir.ExternalTensor) for w in weights)  # weights stayed external
