"""VAR passes on tiny hand-written graphs, checked against numpy DESIGN.md §1 via ORT."""

from __future__ import annotations

import numpy as np
import pytest
from passes_fixtures import numpy_sink_flags, numpy_var, probe, tiny_attention_model, to_session

from var_export.core.settings import VarSettings
from var_export.passes import apply_var, locate_layers

H, E, D = 2, 8, 16
SINK_DIMS = (1, 6)  # tau=3 < sqrt(D): a planted 40 normalises to ~3.98


def _inputs(rng, model, b, s, past, visual, attention_mask, past_sink, lv, extra=None):
    feeds = {
        "inputs_embeds": rng.standard_normal((b, s, D)).astype(np.float32),
        "attention_mask": attention_mask.astype(np.int64),
        "visual_token_mask": visual,
        "past_sink_mask": past_sink,
    }
    # plant sinks: big values on a sink dim for the visual tokens 1 and 3 of the prompt
    for m in locate_layers(model).matches:
        for kind in ("key", "value"):
            feeds[f"past_key_values.{m.layer}.{kind}"] = past.get(
                (m.layer, kind), np.zeros((b, H, 0, E), np.float32)
            )
    if extra:
        feeds.update(extra)
    return feeds


def _check_layers(out, names, feeds, settings, heads, var_layers, *, atol):
    """Per VAR layer: sink flags and probs@V equal numpy §1 on the in-graph inputs."""
    visual = feeds["visual_token_mask"]
    am = feeds["attention_mask"].astype(bool)
    past_len = feeds["past_sink_mask"].shape[2]
    present = out["present_sink_mask"]
    n_selected = 0
    for j, layer in enumerate(var_layers):
        x = out[names[layer]["residual"]] if names[layer]["residual"] in out else feeds["inputs_embeds"]
        new = numpy_sink_flags(x, settings.sink_dims, settings.tau) & am[:, past_len:]
        if settings.sink_scope == "prompt" and past_len > 0:
            new[:] = False
        sink = np.concatenate([feeds["past_sink_mask"][:, j], new], axis=1)
        np.testing.assert_array_equal(present[:, j], sink)
        a = out[names[layer]["probs"]].astype(np.float64)
        v = out[names[layer]["v"]].astype(np.float64)
        a_new, selected = numpy_var(
            a, visual, sink, rho=settings.rho, summ=settings.summ, p=settings.p,
            mode=settings.heads, heads=[h for (la, h) in heads or [] if la == layer],
        )  # fmt: skip
        n_selected += int(selected.sum())
        np.testing.assert_allclose(out[names[layer]["attn"]], a_new @ v, atol=atol, rtol=0)
        np.testing.assert_allclose(a_new.sum(-1), a.sum(-1), atol=1e-9)  # row sums kept
    return n_selected


def _run_model(model, feeds):
    sess = to_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


@pytest.mark.parametrize("variant", ["plain", "guard", "fp16"])
@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
def test_tiny_graph_matches_numpy_prefill_and_decode(variant, mode):
    rng = np.random.default_rng(1)
    base = tiny_attention_model(n_layers=3, heads=H, head_dim=E, variant=variant, layer_ids=[0, 1, 2])
    settings = VarSettings(sink_dims=SINK_DIMS, tau=3.0, heads=mode, layers="1:", rho=0.6, summ=0.1)
    heads = [(1, 0), (2, 1)] if mode != "dynamic" else None
    var_model, report = apply_var(base, settings, heads)
    assert report.var_layers == [1, 2]
    names = probe(var_model)
    b, s = 2, 8
    # sample 0: [text, v, v, v, v, text, text, text]; sample 1 left-padded by 2
    visual = np.zeros((b, s), bool)
    visual[0, 1:5] = True
    visual[1, 3:6] = True
    am = np.ones((b, s), np.int64)
    am[1, :2] = 0
    feeds = _inputs(rng, base, b, s, {}, visual, am, np.zeros((b, 2, 0), bool), 2)
    x = feeds["inputs_embeds"]
    x[0, 2, 1] = 40.0  # visual sink
    x[1, 4, 6] = -40.0  # visual sink
    x[0, 6, 6] = 40.0  # text sink
    x[1, 0, 1] = 40.0  # a pad: never a sink
    out = _run_model(var_model, feeds)
    atol = 1e-2 if variant == "fp16" else 2e-5  # fp16: |attn| ~ 5, half-precision ulp 4e-3
    selected = _check_layers(out, names, feeds, settings, heads, [1, 2], atol=atol)
    assert selected > 0, "no row was redistributed: the test would not see VAR"
    assert out["present_sink_mask"][0, :, 2].all() and not out["present_sink_mask"][1, :, 0].any()

    # two decode steps, fed present.* and present_sink_mask
    for step in range(2):
        past = {(layer, k): out[f"present.{layer}.{k}"] for layer in (0, 1, 2) for k in ("key", "value")}
        t = feeds["attention_mask"].shape[1] + 1
        dec = _inputs(
            rng, base, b, 1, past,
            np.concatenate([feeds["visual_token_mask"], np.zeros((b, 1), bool)], 1),
            np.concatenate([feeds["attention_mask"], np.ones((b, 1), np.int64)], 1),
            out["present_sink_mask"], 2,
        )  # fmt: skip
        dec["inputs_embeds"][:, 0, 1] = 40.0  # would be a sink, but sink_scope=prompt
        out = _run_model(var_model, dec)
        assert out["present_sink_mask"].shape == (b, 2, t)
        assert not out["present_sink_mask"][:, :, -1].any()
        sel = _check_layers(out, names, dec, settings, heads, [1, 2], atol=atol)
        assert sel > 0, f"decode step {step}: no row redistributed"
        feeds = dec


def test_var_changes_output_and_all_false_visual_is_plain():
    rng = np.random.default_rng(2)
    base = tiny_attention_model(n_layers=2, heads=H, head_dim=E)
    settings = VarSettings(sink_dims=SINK_DIMS, tau=3.0, heads="dynamic", layers="0:", rho=0.9, summ=0.05)
    var_model, _ = apply_var(base, settings, None)
    b, s = 1, 6
    visual = np.zeros((b, s), bool)
    visual[0, 1:4] = True
    feeds = _inputs(rng, base, b, s, {}, visual, np.ones((b, s)), np.zeros((b, 2, 0), bool), 2)
    feeds["inputs_embeds"][0, 2, 1] = 40.0
    plain = _run_model(base, {k: v for k, v in feeds.items() if k not in ("visual_token_mask", "past_sink_mask")})
    with_var = _run_model(var_model, feeds)
    effect = np.abs(with_var["x_2"] - plain["x_2"]).max()
    assert effect > 1e-2, effect
    feeds["visual_token_mask"] = np.zeros_like(visual)
    off = _run_model(var_model, feeds)
    np.testing.assert_array_equal(off["x_2"], plain["x_2"])


def test_sink_scope_all_flags_decode_tokens():
    rng = np.random.default_rng(3)
    base = tiny_attention_model(n_layers=1, heads=H, head_dim=E)
    settings = VarSettings(sink_dims=SINK_DIMS, tau=3.0, heads="dynamic", layers="0:", sink_scope="all")
    var_model, _ = apply_var(base, settings, None)
    b = 1
    past = {(0, k): rng.standard_normal((b, H, 3, E)).astype(np.float32) for k in ("key", "value")}
    feeds = _inputs(rng, base, b, 1, past, np.zeros((b, 4), bool), np.ones((b, 4)), np.zeros((b, 1, 3), bool), 1)
    feeds["inputs_embeds"][0, 0, 6] = 40.0
    out = _run_model(var_model, feeds)
    assert out["present_sink_mask"][0, 0].tolist() == [False, False, False, True]


def test_opset_14_graph_gets_shape_then_slice_and_same_numbers():
    """Below opset 15 ``Shape`` has no start/end: the passes slice the full shape instead."""
    rng = np.random.default_rng(4)
    settings = VarSettings(sink_dims=SINK_DIMS, tau=3.0, heads="dynamic", layers="0:", rho=0.9, summ=0.05)
    base = tiny_attention_model(n_layers=2, heads=H, head_dim=E)
    old = tiny_attention_model(n_layers=2, heads=H, head_dim=E)
    old.opset_imports[""] = 14
    old.graph.opset_imports[""] = 14
    want_model, _ = apply_var(base, settings, None)
    got_model, _ = apply_var(old, settings, None)  # finalize runs onnx.checker at opset 14
    assert got_model.opset_imports[""] == 14
    shapes = [n for n in got_model.graph if n.op_type == "Shape"]
    assert shapes and not any("start" in n.attributes or "end" in n.attributes for n in shapes)
    b, s = 1, 6
    visual = np.zeros((b, s), bool)
    visual[0, 1:4] = True
    feeds = _inputs(rng, base, b, s, {}, visual, np.ones((b, s)), np.zeros((b, 2, 0), bool), 2)
    feeds["inputs_embeds"][0, 2, 1] = 40.0
    want, got = _run_model(want_model, feeds), _run_model(got_model, feeds)
    np.testing.assert_array_equal(got["x_2"], want["x_2"])
    np.testing.assert_array_equal(got["present_sink_mask"], want["present_sink_mask"])
    assert np.abs(want["x_2"] - _run_model(base, {k: v for k, v in feeds.items() if "sink" not in k and "visual" not in k})["x_2"]).max() > 1e-2
