"""``rewrite_decoder`` on decoders exported by others, against the PyTorch reference.

Graphs (tests/fixtures/foreign, made by make_fixtures.py from one set of committed weights):
Optimum ``text-generation-with-past`` (sdpa ``Where(IsNaN)`` guard, opset 14), the legacy
TorchScript exporter (eager, opset 17) and the dynamo exporter (sdpa decomposed, opset 18).
All take ``input_ids`` (not ``inputs_embeds``), GQA 4 query / 2 KV heads, 3 layers.

Each test: rewrite, then prefill + 3 greedy decode steps, batch 2 with left padding, fed to
ONNX Runtime and to ``VarReference`` on the same torch model (embeddings of the same ids).
Logits are compared on the non-padded rows (a fully masked query row is undefined: the sdpa
guard gives zeros, eager a uniform average). VAR must move the logits far more than the
tolerance: the weights plant massive activations in SINK_DIMS for tokens 1 (BOS: a text
sink) and 7, 11 (image tokens: visual sinks).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.fixtures.foreign import tiny_llama as tl
from tests.fixtures.foreign.make_fixtures import GRAPHS
from var_export import kernels
from var_export.calibration.reference import VarReference
from var_export.core.settings import VarSettings
from var_export.rewrite import rewrite_decoder

TOL = 1e-4
MIN_VAR_EFFECT = 1e-2  # VAR must change some logit by at least this (100x TOL)
NUM_LAYERS = tl.CONFIG["num_hidden_layers"]
KV_HEADS = tl.CONFIG["num_key_value_heads"]

# Sample 0 is left-padded by 2. Image tokens (visual_token_mask) are 4..9 / 3..9.
IDS = torch.tensor([
    [0, 0, 1, 20, 7, 30, 31, 11, 32, 33, 21, 22],
    [1, 20, 25, 7, 30, 11, 31, 32, 33, 34, 21, 22],
])
MASK = torch.tensor([[0, 0] + [1] * 10, [1] * 12])
VISUAL = torch.zeros(2, 12, dtype=torch.bool)
VISUAL[0, 4:10] = True
VISUAL[1, 3:10] = True


def settings(**kw) -> VarSettings:
    base = dict(sink_dims=tl.SINK_DIMS, tau=4.0, rho=0.5, summ=0.2, p=0.6, layers="1:", heads="dynamic")
    base.update(kw)
    return VarSettings(**base)


@pytest.fixture(scope="module")
def model():
    return tl.load_model("eager")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _run(sess: ort.InferenceSession, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _feeds(sess: ort.InferenceSession, ids, mask, pos, vis, past_sink, cache) -> dict:
    """Feed by the graph's own input names: foreign graphs keep theirs (genai has no
    ``position_ids``); VAR adds ``visual_token_mask`` / ``past_sink_mask`` whatever the exporter."""
    have = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
             "visual_token_mask": vis.numpy(), "past_sink_mask": past_sink, **cache}
    return {k: v for k, v in feeds.items() if k in have}


def compare(model, graph, s: VarSettings, heads=None, *, steps: int = 3, visual=VISUAL,
            ids=IDS, mask=MASK, kv_heads: int = KV_HEADS) -> dict:
    """Prefill + ``steps`` decode steps; returns max |Δlogits| vs the reference and VAR's effect
    (``kv_heads``: the graph's KV-cache heads; MultiHeadAttention graphs cache every head)."""
    sess = ort.InferenceSession(str(graph), kernels.session_options(graph), providers=["CPUExecutionProvider"])
    ref = VarReference(model, s, heads)
    plain = VarReference(model, None)
    n_var = len(s.var_layers(NUM_LAYERS))
    batch = ids.shape[0]
    vis, pos = visual, _positions(mask)
    cache = {f"past_key_values.{i}.{kind}": np.zeros((batch, kv_heads, 0, tl.HEAD_DIM), np.float32)
             for i in range(NUM_LAYERS) for kind in ("key", "value")}
    out = _run(sess, _feeds(sess, ids, mask, pos, vis, np.zeros((batch, n_var, 0), bool), cache))
    r = ref.step(model.model.embed_tokens(ids), mask, pos, None, vis, None)
    q = plain.step(model.model.embed_tokens(ids), mask, pos, None, vis, None)
    rows = mask.bool().numpy()  # (B, S) the non-padded query rows
    delta = [float(np.abs(out["logits"] - r.logits.numpy())[rows].max())]
    effect = [float((r.logits - q.logits).abs().numpy()[rows].max())]
    sinks_equal = [bool((out["present_sink_mask"] == r.present_sink_mask.numpy()).all())]
    n_sinks = int(r.present_sink_mask.sum())
    for _ in range(steps):
        token = r.logits[:, -1].argmax(-1)[:, None]  # (B, 1) greedy, from the reference
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
        vis = torch.cat([vis, torch.zeros(batch, 1, dtype=torch.bool)], 1)
        pos = pos[:, -1:] + 1
        emb = model.model.embed_tokens(token)
        r_past, q_past = r.present, q.present
        r = ref.step(emb, mask, pos, r_past, vis, r.present_sink_mask)
        q = plain.step(emb, mask, pos, q_past, vis, None)
        cache = {f"past_key_values.{i}.{kind}": out[f"present.{i}.{kind}"]
                 for i in range(NUM_LAYERS) for kind in ("key", "value")}
        out = _run(sess, _feeds(sess, token, mask, pos, vis, out["present_sink_mask"], cache))
        delta.append(float(np.abs(out["logits"] - r.logits.numpy()).max()))
        effect.append(float((r.logits - q.logits).abs().max()))
        sinks_equal.append(bool((out["present_sink_mask"] == r.present_sink_mask.numpy()).all()))
    return {"delta": delta, "effect": effect, "sinks_equal": sinks_equal, "n_sinks": n_sinks}


CASES = [
    ("optimum", "dynamic", None),
    ("legacy", "dynamic", None),
    ("dynamo", "dynamic", None),
    ("optimum", "hybrid", [(1, 0), (1, 3), (2, 1), (2, 2)]),
    ("legacy", "static", [(1, 1), (2, 0), (2, 3)]),
]


@pytest.mark.parametrize(("exporter", "mode", "heads"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_parity_with_reference(model, tmp_path, exporter, mode, heads):
    out = tmp_path / f"{exporter}_var.onnx"
    s = settings(heads=mode)
    result = rewrite_decoder(GRAPHS[exporter], out, s, heads=heads)
    assert result.added_inputs == ["visual_token_mask", "past_sink_mask"]
    assert result.added_outputs == ["present_sink_mask"]
    assert result.report.var_layers == [1, 2]
    got = compare(model, out, s, heads)
    print(f"{exporter} {mode}: max|dlogits| per step {got['delta']}, VAR effect {got['effect']}")
    assert got["n_sinks"] == 2 * 2 * 3  # 2 samples x 2 VAR layers x tokens 1, 7, 11
    assert all(got["sinks_equal"])
    assert max(got["delta"]) < TOL
    assert got["effect"][0] > MIN_VAR_EFFECT  # prefill: rows after the image
    assert max(got["effect"][1:]) > MIN_VAR_EFFECT  # decode: generated tokens


def test_no_visual_tokens_is_the_plain_decoder(model, tmp_path):
    """An all-False visual_token_mask leaves every row unchanged (docs/ARCHITECTURE.md)."""
    out = tmp_path / "dynamo_var.onnx"
    s = settings()
    rewrite_decoder(GRAPHS["dynamo"], out, s)
    got = compare(model, out, s, steps=1, visual=torch.zeros_like(VISUAL))
    assert max(got["delta"]) < TOL
    assert max(got["effect"]) == 0.0


def test_fixture_graphs_are_what_the_docstring_says():
    """The committed graphs keep the exporter patterns the tests rely on (fails if regenerated wrong)."""
    import onnx

    for name, opset, guard in (("optimum", 14, True), ("legacy", 17, False), ("dynamo", 18, True)):
        proto = onnx.load(str(GRAPHS[name]), load_external_data=False)
        ops = {n.op_type for n in proto.graph.node}
        assert [i.name for i in proto.graph.input[:3]] == ["input_ids", "attention_mask", "position_ids"]
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
        assert ("IsNaN" in ops) == guard, name
        assert "Softmax" in ops and not ops & {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
        kv = [i for i in proto.graph.input if i.name == "past_key_values.0.key"][0]
        assert kv.type.tensor_type.shape.dim[1].dim_value == KV_HEADS  # GQA: 2 KV heads, 4 query heads
