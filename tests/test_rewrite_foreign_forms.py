"""``rewrite_decoder`` on the fastest foreign graph forms, against the PyTorch reference.

Graphs (tests/fixtures/foreign, made by make_fixtures.py from the same committed weights):

* ``sdpa23``: torch dynamo export at opset 23 (ONNX ``Attention``) -> routed to the fused
  formulation (``passes.fused_var``, shift qk). Follows HF left padding: batch 2, left-padded.
* ``ortopt``: the Optimum graph after ONNX Runtime's transformers optimizer
  (``SkipSimplifiedLayerNormalization`` holds the residual, ``com.microsoft::RotaryEmbedding``)
  -> the skip norm after each VAR layer's attention is split. Batch 2, left-padded.
* ``genai``: onnxruntime-genai's model builder (``GroupQueryAttention`` with rotary inside,
  packed QKV, no ``position_ids`` input) -> GQA unfused on the layers VAR changes, kept fused
  elsewhere. GQA on CPU does not follow HF left padding (it reads ``seqlens_k`` as a
  right-padded length and starts the first prompt's rotary positions at 0 on every row), so
  this form is tested with batch 1 and with batch 2 of unpadded rows.
* ``mha``: ``ortopt`` with each attention one ``com.microsoft::MultiHeadAttention`` (separate
  Q/K/V, past/present KV of 4 heads, the graph's 4D mask as ``attention_bias``; made with
  onnx-ir, ONNX Runtime's optimizer does not fuse this decoder) -> MHA unfused on the layers
  VAR changes. MHA follows HF left padding: batch 2, left-padded. ``mha-padding``: the same
  with ``key_padding_mask`` + ``unidirectional=1`` (built in the test by ``mha_graph``).

Prefill + 4 decode steps each; |Δlogits| < 1e-4 and VAR moves the logits by > 1e-2.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch

from tests.fixtures.foreign import tiny_llama as tl
from tests.fixtures.foreign.make_fixtures import GRAPHS, mha_graph
from tests.test_rewrite_foreign import IDS, MASK, MIN_VAR_EFFECT, TOL, VISUAL, compare, settings
from var_export.core.contract import KERNEL_DOMAIN, KERNEL_OP
from var_export.rewrite import graph_form, rewrite_decoder

STEPS = 4
# batch 2 without padding (the rows genai's CPU GQA handles exactly); image tokens 3..9 / 2..8
IDS_FULL = torch.tensor([
    [1, 20, 25, 7, 30, 11, 31, 32, 33, 34, 21, 22],
    [1, 21, 7, 30, 31, 11, 32, 33, 20, 23, 24, 25],
])
VISUAL_FULL = torch.zeros(2, 12, dtype=torch.bool)
VISUAL_FULL[0, 3:10] = True
VISUAL_FULL[1, 2:9] = True
BATCHES = {
    "b2-left-padded": (IDS, MASK, VISUAL),
    "b1": (IDS[1:], MASK[1:], VISUAL[1:]),
    "b2-unpadded": (IDS_FULL, torch.ones_like(IDS_FULL), VISUAL_FULL),
}


@pytest.fixture(scope="module")
def models():
    return {"base": tl.load_model("eager"), "wide": tl.load_wide_vocab_model("eager")}


def _ops(path) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


SLOW = pytest.mark.slow  # covered form by form by a fast case; the second head mode / batch
CASES = [
    # (graph, head mode, heads, batch, expected form)
    pytest.param("sdpa23", "dynamic", None, "b2-left-padded", "onnx-attention"),
    pytest.param("sdpa23", "hybrid", [(1, 0), (1, 3), (2, 1), (2, 2)], "b2-left-padded", "onnx-attention",
                 marks=SLOW),
    pytest.param("ortopt", "dynamic", None, "b2-left-padded", "contrib"),
    pytest.param("ortopt", "static", [(1, 1), (2, 0), (2, 3)], "b2-left-padded", "contrib", marks=SLOW),
    pytest.param("genai", "dynamic", None, "b1", "contrib"),
    pytest.param("genai", "dynamic", None, "b2-unpadded", "contrib", marks=SLOW),
    pytest.param("genai", "hybrid", [(2, 1), (2, 2)], "b1", "contrib"),
    pytest.param("mha", "dynamic", None, "b2-left-padded", "contrib"),
    pytest.param("mha", "hybrid", [(1, 0), (1, 3), (2, 1), (2, 2)], "b2-left-padded", "contrib"),
    pytest.param("mha", "static", [(1, 1), (2, 0), (2, 3)], "b2-left-padded", "contrib"),
    pytest.param("mha-padding", "hybrid", [(2, 1), (2, 2)], "b2-left-padded", "contrib"),
]
KV_CACHE_HEADS = {"mha": tl.CONFIG["num_attention_heads"], "mha-padding": tl.CONFIG["num_attention_heads"]}


def _source(graph: str, tmp_path):
    if graph != "mha-padding":
        return GRAPHS[graph]
    path = tmp_path / "mha_padding.onnx"
    ir.save(mha_graph("padding"), str(path))
    return path


@pytest.mark.parametrize(("graph", "mode", "heads", "batch", "form"), CASES,
                         ids=[f"{c.values[0]}-{c.values[1]}-{c.values[3]}" for c in CASES])
def test_parity_with_reference(models, tmp_path, graph, mode, heads, batch, form):
    src = _source(graph, tmp_path)
    assert graph_form(ir.load(str(src))) == form
    out = tmp_path / f"{graph}_var.onnx"
    s = settings(heads=mode)
    result = rewrite_decoder(src, out, s, heads=heads)
    assert result.added_inputs == ["visual_token_mask", "past_sink_mask"]
    assert result.added_outputs == ["present_sink_mask"]
    assert result.report.var_layers == [1, 2]
    ids, mask, visual = BATCHES[batch]
    model = models["wide" if graph == "genai" else "base"]
    got = compare(model, out, s, heads, steps=STEPS, ids=ids, mask=mask, visual=visual,
                  kv_heads=KV_CACHE_HEADS.get(graph, tl.CONFIG["num_key_value_heads"]))
    print(f"{graph} {mode} {batch}: max|dlogits| per step {got['delta']}, VAR effect {got['effect']}")
    assert got["n_sinks"] == ids.shape[0] * 2 * 3  # samples x 2 VAR layers x tokens 1, 7, 11
    assert all(got["sinks_equal"])
    assert max(got["delta"]) < TOL
    assert got["effect"][0] > MIN_VAR_EFFECT
    assert max(got["effect"][1:]) > MIN_VAR_EFFECT


def test_genai_keeps_fused_attention_where_var_changes_nothing(tmp_path):
    """hybrid with heads only in layer 2: GQA stays fused on layers 0 and 1 (and their skip
    norms too); only layer 2 is unfused, and its post-attention skip norm split."""
    out = tmp_path / "genai_var.onnx"
    result = rewrite_decoder(GRAPHS["genai"], out, settings(heads="hybrid"), heads=[(2, 1)])
    ops = _ops(out)
    gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
    assert sorted(i for n in gqa for i in n.input if i.startswith("past_key_values") and i.endswith("key")) == [
        "past_key_values.0.key", "past_key_values.1.key"]
    before = _ops(GRAPHS["genai"])
    count = lambda ops, op: sum(1 for _, o in ops if o == op)  # noqa: E731
    assert count(ops, "SkipSimplifiedLayerNormalization") == count(before, "SkipSimplifiedLayerNormalization") - 1
    assert count(ops, "Softmax") == 1  # layer 2 only
    assert any("fused ops kept on [1]" in n for n in result.notes)


def test_genai_dynamic_unfuses_every_var_layer_only(tmp_path):
    out = tmp_path / "genai_var.onnx"
    rewrite_decoder(GRAPHS["genai"], out, settings(heads="dynamic"))
    gqa = [n for n in onnx.load(str(out)).graph.node if n.op_type == "GroupQueryAttention"]
    assert [i for n in gqa for i in n.input if i.endswith(".key")] == ["past_key_values.0.key"]  # layer 0: not VAR


@pytest.mark.parametrize("graph", ["mha", "mha-padding"])
def test_mha_keeps_fused_attention_where_var_changes_nothing(tmp_path, graph):
    """hybrid with heads only in layer 2: MultiHeadAttention stays on layers 0 and 1."""
    out = tmp_path / "mha_var.onnx"
    result = rewrite_decoder(_source(graph, tmp_path), out, settings(heads="hybrid"), heads=[(2, 1)])
    mha = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MultiHeadAttention"]
    assert sorted(n.input[6] for n in mha) == ["past_key_values.0.key", "past_key_values.1.key"]
    assert sum(1 for _, o in _ops(out) if o == "Softmax") == 1  # layer 2 only
    assert any("fused ops kept on [1]" in n for n in result.notes)


def test_fixture_graphs_are_what_the_docstring_says():
    ops = {g: {o for _, o in _ops(GRAPHS[g])} for g in ("sdpa23", "ortopt", "genai", "mha")}
    assert "Attention" in ops["sdpa23"] and "Softmax" not in ops["sdpa23"]
    assert {"SkipSimplifiedLayerNormalization", "RotaryEmbedding", "Softmax"} <= ops["ortopt"]
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops["genai"]
    assert "Softmax" not in ops["genai"]
    genai_inputs = [i.name for i in onnx.load(str(GRAPHS["genai"])).graph.input]
    assert "position_ids" not in genai_inputs and "past_key_values.0.key" in genai_inputs
    assert {"MultiHeadAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops["mha"]
    assert not ops["mha"] & {"Softmax", "GroupQueryAttention", "Attention"}
    mha = onnx.load(str(GRAPHS["mha"]))
    kv = [i for i in mha.graph.input if i.name == "past_key_values.0.key"][0]
    assert kv.type.tensor_type.shape.dim[1].dim_value == tl.CONFIG["num_attention_heads"]  # MHA: no KV grouping
    node = next(n for n in mha.graph.node if n.op_type == "MultiHeadAttention")
    assert node.input[3:6] == ["", "", node.input[5]] and node.input[5] and node.input[6:] == [
        "past_key_values.0.key", "past_key_values.0.value"]  # attention_bias, no key_padding_mask


# ---------------------------------------------------------------------------------------------
# --formulation: contrib attention as one ONNX Attention per VAR layer + the fused formulation

FUSED_CASES = [
    # (graph, head mode, heads, batch, formulation)
    pytest.param("genai", "dynamic", None, "b1", "fused-qk"),
    pytest.param("genai", "hybrid", [(2, 1), (2, 2)], "b1", "fused-qk"),
    pytest.param("genai", "dynamic", None, "b2-unpadded", "fused-mask", marks=SLOW),
    pytest.param("mha", "dynamic", None, "b2-left-padded", "fused-qk"),
    pytest.param("mha", "hybrid", [(1, 0), (1, 3), (2, 1), (2, 2)], "b2-left-padded", "fused-qk"),
    pytest.param("mha-padding", "hybrid", [(2, 1), (2, 2)], "b2-left-padded", "fused-mask", marks=SLOW),
    pytest.param("genai", "dynamic", None, "b1", "kernel"),
    pytest.param("mha", "dynamic", None, "b2-left-padded", "kernel"),
    pytest.param("sdpa23", "hybrid", [(1, 0), (1, 3), (2, 1), (2, 2)], "b2-left-padded", "kernel"),
]


@pytest.mark.parametrize(("graph", "mode", "heads", "batch", "formulation"), FUSED_CASES,
                         ids=[f"{c.values[0]}-{c.values[1]}-{c.values[3]}-{c.values[4]}" for c in FUSED_CASES])
def test_contrib_attention_fused_parity_with_reference(models, tmp_path, graph, mode, heads, batch, formulation):
    """GQA / MHA -> ONNX Attention -> fused formulation (sdpa23: its own Attention ops), against
    the PyTorch reference over prefill + 4 decode steps (genai: batch 1 / unpadded rows, its CPU
    GQA does not follow HF left padding; MHA, sdpa23: batch 2 left-padded). Attention stays one
    op per VAR layer (no Softmax)."""
    if formulation == "kernel":
        from var_export.passes.fused_var import SHIFTS

        if "kernel" not in SHIFTS:
            pytest.skip("passes.fused_var has no 'kernel' shift in this build")
    out = tmp_path / f"{graph}_var.onnx"
    s = settings(heads=mode)
    result = rewrite_decoder(_source(graph, tmp_path), out, s, heads=heads, formulation=formulation)
    assert result.formulation == formulation
    assert onnx.load(str(out)).metadata_props and dict(
        (p.key, p.value) for p in onnx.load(str(out)).metadata_props)["var_export.formulation"] == formulation
    changed = [1, 2] if mode == "dynamic" or {la for la, _ in heads} == {1, 2} else [2]
    ops = _ops(out)
    one_op = (KERNEL_DOMAIN, KERNEL_OP) if formulation == "kernel" else ("", "Attention")
    layer_ops = [n for n in onnx.load(str(out)).graph.node if (n.domain, n.op_type) == one_op
                 and (formulation == "kernel" or not n.name.startswith("var/"))]  # var/ Attention: class masses
    assert len(layer_ops) == len(changed)  # one attention op per changed layer
    assert not [o for _, o in ops if o == "Softmax"]
    if graph != "sdpa23":
        contrib = "GroupQueryAttention" if graph == "genai" else "MultiHeadAttention"
        assert sum(1 for _, o in ops if o == contrib) == 3 - len(changed)  # kept where VAR changes nothing
    ids, mask, visual = BATCHES[batch]
    got = compare(models["wide" if graph == "genai" else "base"], out, s, heads, steps=STEPS, ids=ids, mask=mask,
                  visual=visual, kv_heads=KV_CACHE_HEADS.get(graph, tl.CONFIG["num_key_value_heads"]))
    print(f"{graph} {mode} {batch} {formulation}: max|dlogits| per step {got['delta']}, VAR effect {got['effect']}")
    assert all(got["sinks_equal"])
    assert max(got["delta"]) < TOL
    assert got["effect"][0] > MIN_VAR_EFFECT
    assert max(got["effect"][1:]) > MIN_VAR_EFFECT


def test_contrib_attention_form_adds_fewer_nodes_than_the_eager_unfusing(tmp_path):
    """genai, dynamic (both VAR layers change): the whole VAR graph, fused-qk on the Attention
    form against naive on the eager unfusing."""
    added = {}
    for formulation in ("naive", "fused-qk"):
        result = rewrite_decoder(GRAPHS["genai"], tmp_path / f"{formulation}.onnx", settings(), formulation=formulation)
        added[formulation] = result.report.nodes_added / len(result.report.var_layers)
    print(f"genai dynamic: nodes added per VAR layer {added}")
    assert added["fused-qk"] < added["naive"]


@pytest.mark.parametrize(("graph", "formulation", "message"), [
    ("sdpa23", "naive", "found ONNX Attention ops"),
    ("optimum", "fused-qk", "found none"),
    ("ortopt", "fused-mask", "found none"),  # contrib skip norms, attention MatMul -> Softmax -> MatMul
    ("genai", "fused", "must be one of"),
])
def test_impossible_formulations_are_refused_before_anything_is_written(tmp_path, graph, formulation, message):
    from var_export.core.errors import ConfigError

    out = tmp_path / "out.onnx"
    with pytest.raises(ConfigError, match=message):
        rewrite_decoder(GRAPHS[graph], out, settings(), formulation=formulation)
    assert not out.exists()


def test_kernel_formulation_without_the_custom_op_says_what_to_do(tmp_path, monkeypatch):
    from var_export.core.errors import ConfigError
    from var_export.passes import fused_var

    monkeypatch.setattr(fused_var, "SHIFTS", ("qk", "mask"))
    with pytest.raises(ConfigError, match="VarAttention custom op.*--formulation auto or fused-qk"):
        rewrite_decoder(GRAPHS["genai"], tmp_path / "out.onnx", settings(), formulation="kernel")


@pytest.mark.parametrize(("graph", "expected"), [
    ("sdpa23", "fused-qk"), ("optimum", "naive"), ("ortopt", "naive"), ("genai", "CONTRIB_AUTO"), ("mha", "CONTRIB_AUTO"),
])
def test_auto_formulation_per_graph_form(graph, expected):
    from var_export import rewrite

    want = rewrite.CONTRIB_AUTO if expected == "CONTRIB_AUTO" else expected
    assert rewrite.resolve_formulation(ir.load(str(GRAPHS[graph]))) == want


def test_auto_on_interleaved_rotary_gqa_is_the_attention_form():
    """The eager unfusing refuses GQA's rotary_interleaved=1; auto takes the Attention form."""
    from var_export import rewrite

    model = ir.load(str(GRAPHS["genai"]))
    for node in rewrite.contrib_layers(model).values():
        node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 1)
    assert rewrite.resolve_formulation(model) == "fused-qk"


def test_auto_on_contrib_falls_back_to_naive_where_opset_23_would_change_an_op(monkeypatch):
    from var_export import rewrite

    monkeypatch.setattr(rewrite, "CONTRIB_AUTO", "fused-qk")
    model = ir.load(str(GRAPHS["mha"]))
    assert rewrite.resolve_formulation(model) == "fused-qk"
    model.graph.append(ir.node("ReduceMean", [model.graph.inputs[0]], {"axes": [1]}, name="old_reduce_mean"))
    assert rewrite.resolve_formulation(model) == "naive"


def test_cli_rewrite_takes_the_formulation(tmp_path, capsys):
    from var_export.cli import main

    out = tmp_path / "genai_var.onnx"
    assert main(["rewrite", str(GRAPHS["genai"]), "--out", str(out), "--formulation", "fused-qk",
                 "--sink-dims", "5,17", "--layers", "1:", "--heads", "dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "formulation: fused-qk" in printed and "one ONNX Attention (opset 23) on layers [1, 2]" in printed
    assert dict((p.key, p.value) for p in onnx.load(str(out)).metadata_props)["var_export.formulation"] == "fused-qk"
