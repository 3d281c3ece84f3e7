"""passes/unfuse_contrib.py on the genai, ORT-optimizer and MultiHeadAttention fixtures, without
VAR: the unfused graph (eager ops, or one ONNX Attention per layer with ``target="attention"``)
computes what the fused one does (prefill + decode), and restore() puts the fused ops back."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tests.fixtures.foreign import tiny_llama as tl
from tests.fixtures.foreign.make_fixtures import GRAPHS, mha_graph
from var_export.core.errors import GraphPatternError
from var_export.passes.contrib_attention import opset_blockers, raise_default_opset
from var_export.passes.locate import locate_layers
from var_export.passes.locate_fused import locate_fused_layers
from var_export.passes.unfuse_contrib import contrib_attention_layers, normalize_contrib, restore

LAYERS = tl.CONFIG["num_hidden_layers"]


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _generate(sess: ort.InferenceSession, ids: np.ndarray, steps: int = 3, mask: np.ndarray | None = None,
              kv_heads: int = 2) -> list[np.ndarray]:
    """Greedy prefill + ``steps`` decode steps (feeds by the graph's input names); ``mask``:
    left padding (HF positions), default unpadded rows."""
    have = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    b, s = ids.shape
    mask = np.ones((b, s), np.int64) if mask is None else mask
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(-1) - 1, 0)}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros((b, kv_heads, 0, tl.HEAD_DIM), np.float32)
                  for i in range(LAYERS) for k in ("key", "value")})
    logits = []
    for _ in range(steps + 1):
        out = dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in have})))
        logits.append(out["logits"])
        mask = np.concatenate([feeds["attention_mask"], np.ones((b, 1), np.int64)], 1)
        feeds = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None], "attention_mask": mask,
                 "position_ids": mask.sum(-1, keepdims=True) - 1}
        feeds.update({f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(LAYERS) for k in ("key", "value")})
    return logits


@pytest.mark.parametrize("graph", ["genai", "ortopt"])
def test_unfused_graph_computes_what_the_fused_one_does(graph):
    ids = np.array([[1, 20, 7, 30, 31, 11, 32, 21], [1, 25, 26, 7, 11, 40, 41, 22]])
    fused = ir.load(str(GRAPHS[graph]))
    unfused = ir.load(str(GRAPHS[graph]))
    replaced = normalize_contrib(unfused, range(LAYERS))
    kinds = sorted({r.op_type for r in replaced})
    assert kinds == (["GroupQueryAttention", "SkipSimplifiedLayerNormalization"] if graph == "genai"
                     else ["SkipSimplifiedLayerNormalization"])
    if graph == "genai":
        assert contrib_attention_layers(unfused) == {}
    assert [m.layer for m in locate_layers(unfused).matches] == list(range(LAYERS))  # locate reads every layer
    a, b = _generate(_session(fused), ids), _generate(_session(unfused), ids)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_restore_puts_the_fused_ops_back_on_the_given_layers():
    model = ir.load(str(GRAPHS["genai"]))
    before = sorted((n.domain, n.op_type) for n in model.graph)
    replaced = normalize_contrib(model, [1, 2])
    assert sorted(contrib_attention_layers(model)) == [0]
    assert restore(model, [r for r in replaced if r.layer == 1]) == 2  # GQA + skip norm of layer 1
    assert sorted(contrib_attention_layers(model)) == [0, 1]
    restore(model, [r for r in replaced if r.layer == 2])
    assert sorted((n.domain, n.op_type) for n in model.graph) == before
    assert not [n for n in model.graph.initializers if n.startswith("unfused/")]
    ids = np.array([[1, 20, 7, 30, 31, 11]])
    for x, y in zip(_generate(_session(ir.load(str(GRAPHS["genai"]))), ids), _generate(_session(model), ids)):
        np.testing.assert_array_equal(x, y)


def test_unsupported_gqa_attributes_are_refused_by_name():
    model = ir.load(str(GRAPHS["genai"]))
    node = contrib_attention_layers(model)[1]
    node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 16)
    with pytest.raises(GraphPatternError, match="local_window_size"):
        normalize_contrib(model, [1])


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention (tests/fixtures/foreign/mha_llama.onnx; "padding": built from it in memory)

MHA_IDS = np.array([[0, 0, 1, 20, 7, 30, 31, 11, 32, 21], [1, 25, 26, 7, 11, 40, 41, 22, 23, 24]])
MHA_MASK = np.array([[0, 0] + [1] * 8, [1] * 10])  # row 0 left-padded by 2 (HF padding)


def _mha(form: str) -> ir.Model:
    """``bias``: the committed fixture (attention_bias); ``padding``: key_padding_mask +
    unidirectional; ``padding-defaults``: that without ``scale`` and with mask_filter_value
    -3 (small enough that padded keys still count: the value must be honoured); ``projection-bias``: the fixture with a (3 D,) ``bias`` input on every node."""
    model = ir.load(str(GRAPHS["mha"])) if form in ("bias", "projection-bias") else mha_graph("padding")
    rng = np.random.default_rng(0)
    for layer, node in contrib_attention_layers(model).items():
        if form == "padding-defaults":
            del node.attributes["scale"]
            node.attributes["mask_filter_value"] = ir.AttrFloat32("mask_filter_value", -3.0)
        if form == "projection-bias":
            bias = ir.Value(name=f"mha_bias_{layer}", const_value=ir.tensor(rng.normal(0, 0.5, 192).astype(np.float32)))
            bias.shape, bias.dtype = ir.Shape([192]), ir.DataType.FLOAT
            model.graph.register_initializer(bias)
            node.replace_input_with(3, bias)
    return model


@pytest.mark.parametrize("form", ["bias", "padding", "padding-defaults", "projection-bias"])
def test_unfused_mha_computes_what_the_fused_one_does(form):
    """attention_bias (the graph's own 4D mask) or key_padding_mask + unidirectional=1, default
    scale, mask_filter_value, projection bias; batch 2 left-padded: every row (padding rows too)
    and every step as the fused CPU kernel."""
    fused, unfused = _mha(form), _mha(form)
    node = contrib_attention_layers(fused)[0]
    assert (node.attributes["unidirectional"].value, node.inputs[4] is not None, node.inputs[5] is not None) == (
        (1, True, False) if form.startswith("padding") else (0, False, True))
    replaced = normalize_contrib(unfused, range(LAYERS))
    assert sorted({r.op_type for r in replaced}) == ["MultiHeadAttention", "SkipSimplifiedLayerNormalization"]
    assert contrib_attention_layers(unfused) == {}
    assert [m.layer for m in locate_layers(unfused).matches] == list(range(LAYERS))
    assert {m.num_heads for m in locate_layers(unfused).matches} == {4}
    a = _generate(_session(fused), MHA_IDS, mask=MHA_MASK, kv_heads=4)
    b = _generate(_session(unfused), MHA_IDS, mask=MHA_MASK, kv_heads=4)
    for x, y in zip(a, b):
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_mha_restore_puts_the_fused_ops_back():
    model = _mha("padding")
    before = sorted((n.domain, n.op_type) for n in model.graph)
    replaced = normalize_contrib(model, [1, 2])
    assert sorted(contrib_attention_layers(model)) == [0]
    assert restore(model, replaced) == 4  # 2 MHA + 2 skip norms
    assert sorted((n.domain, n.op_type) for n in model.graph) == before
    assert not [n for n in model.graph.initializers if n.startswith("unfused/")]
    for x, y in zip(_generate(_session(_mha("padding")), MHA_IDS, mask=MHA_MASK, kv_heads=4),
                    _generate(_session(model), MHA_IDS, mask=MHA_MASK, kv_heads=4)):
        np.testing.assert_array_equal(x, y)


def _packed_qkv(node: ir.Node) -> None:
    node.replace_input_with(1, None)
    node.replace_input_with(2, None)


def _past_sequence_length(node: ir.Node) -> None:
    node.resize_inputs(9)
    node.replace_input_with(8, ir.Value(name="past_sequence_length"))


def _lengths_mask(node: ir.Node) -> None:  # key_padding_mask as (B,) lengths
    node.inputs[4].shape = ir.Shape(["batch_size"])


@pytest.mark.parametrize(("change", "named"), [
    (_packed_qkv, "packed QKV"),
    (_past_sequence_length, "past_sequence_length"),
    (_lengths_mask, "key_padding_mask of rank 1"),
    (lambda n: n.attributes.__setitem__("unidirectional", ir.AttrInt64("unidirectional", 2)), "unidirectional=2"),
])
def test_unsupported_mha_inputs_are_refused_by_name_before_any_change(change, named):
    model = _mha("padding")
    change(contrib_attention_layers(model)[2])
    before = model.graph.num_nodes()
    with pytest.raises(GraphPatternError, match=named):
        normalize_contrib(model, [1, 2])
    assert model.graph.num_nodes() == before  # layer 1 was not unfused either


# ---------------------------------------------------------------------------------------------
# target="attention": one ONNX Attention per layer (passes/contrib_attention.py)


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Attention" and n.domain == ""]


def _per_layer_nodes(replaced) -> dict[str, int]:
    """New nodes of the first attention record whose layer is not the first one normalised:
    what one more layer costs once the per-graph values exist."""
    attention = [r for r in replaced if r.op_type in ("GroupQueryAttention", "MultiHeadAttention")]
    return len(attention[-1].new_nodes)


@pytest.mark.parametrize("graph", ["genai", "mha-bias", "mha-padding", "mha-projection-bias"])
def test_attention_form_computes_what_the_fused_one_does(graph):
    """Every GQA / MHA becomes one ONNX Attention that locate_fused finds (4 query heads; GQA's 2
    KV heads read without repeat), the opset raised to 23, and the graph computes what the
    contrib graph computes: prefill + 3 decode steps (MHA: batch 2 left-padded; genai: unpadded
    rows). The two fully padded query rows of the attention_bias MHA graphs are left out: ONNX
    Runtime's Attention returns zeros for a row whose keys are all masked, MHA a uniform average
    (no valid row reads them)."""
    if graph == "genai":
        fused, model = ir.load(str(GRAPHS["genai"])), ir.load(str(GRAPHS["genai"]))
        ids, mask, kv_heads = np.array([[1, 20, 7, 30, 31, 11, 32, 21], [1, 25, 26, 7, 11, 40, 41, 22]]), None, 2
    else:
        form = graph.removeprefix("mha-")
        fused, model = _mha(form), _mha(form)
        ids, mask, kv_heads = MHA_IDS, MHA_MASK, 4
    assert fused.opset_imports[""] < 23
    replaced = normalize_contrib(model, range(LAYERS), target="attention")
    assert contrib_attention_layers(model) == {}
    assert model.opset_imports[""] == 23
    assert len(_attention_nodes(model)) == LAYERS
    matches = locate_fused_layers(model)
    assert [(m.layer, m.num_heads, m.head_dim) for m in matches] == [(la, 4, tl.HEAD_DIM) for la in range(LAYERS)]
    assert [m.attention.inputs[1].name for m in matches] == [f"present.{la}.key" for la in range(LAYERS)]
    assert {m.attention.inputs[1].shape[1] for m in matches} == {kv_heads}  # no repeat_kv before it
    assert not [r for r in replaced if r.op_type == "Softmax"]
    a = _generate(_session(fused), ids, mask=mask, kv_heads=kv_heads)
    b = _generate(_session(model), ids, mask=mask, kv_heads=kv_heads)
    rows = np.ones(a[0].shape[:2], bool)
    if graph in ("mha-bias", "mha-projection-bias"):
        rows[0, :2] = False  # the fully padded query rows (docstring)
        assert np.abs(b[0][0, :2]).max() > 0  # they are zero attention, not zero logits
    np.testing.assert_allclose(a[0][rows], b[0][rows], atol=2e-5)
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_allclose(x, y, atol=2e-5)


@pytest.mark.parametrize("graph", ["genai", "mha-padding"])
def test_attention_form_is_smaller_per_layer_and_builds_graph_values_once(graph):
    """Nodes one more layer adds: the Attention form against the eager unfusing; the positions
    and masks (unfused/graph/) are built once, whatever the number of layers."""
    load = (lambda: ir.load(str(GRAPHS["genai"]))) if graph == "genai" else (lambda: _mha("padding"))
    eager = _per_layer_nodes(normalize_contrib(load(), range(LAYERS)))
    attention = _per_layer_nodes(normalize_contrib(load(), range(LAYERS), target="attention"))
    print(f"{graph}: nodes per normalised layer: eager {eager}, Attention {attention}")
    assert attention <= eager // 2
    shared = []
    for layers in ([1], range(LAYERS)):
        model = load()
        normalize_contrib(model, layers, target="attention")
        shared.append(sum(1 for n in model.graph if n.name.startswith("unfused/graph/")))
    assert shared[0] == shared[1] > 0


@pytest.mark.parametrize("graph", ["genai", "mha-padding"])
def test_attention_form_restore_puts_the_fused_ops_back(graph):
    load = (lambda: ir.load(str(GRAPHS["genai"]))) if graph == "genai" else (lambda: _mha("padding"))
    model = load()
    before = sorted((n.domain, n.op_type) for n in model.graph)
    replaced = normalize_contrib(model, [1, 2], target="attention")
    assert sorted(contrib_attention_layers(model)) == [0]
    restore(model, [r for r in replaced if r.layer == 1])  # the per-graph values are still read by layer 2
    assert sorted(contrib_attention_layers(model)) == [0, 1] and len(_attention_nodes(model)) == 1
    restore(model, [r for r in replaced if r.layer == 2])
    assert sorted((n.domain, n.op_type) for n in model.graph) == before
    assert not [n for n in model.graph if n.name and n.name.startswith("unfused/")]
    assert not [n for n in model.graph.initializers if n.startswith("unfused/")]
    ids, mask, kv = (np.array([[1, 20, 7, 30, 31, 11]]), None, 2) if graph == "genai" else (MHA_IDS, MHA_MASK, 4)
    for x, y in zip(_generate(_session(load()), ids, mask=mask, kv_heads=kv),
                    _generate(_session(model), ids, mask=mask, kv_heads=kv)):
        np.testing.assert_array_equal(x, y)


def test_opset_raise_keeps_what_the_graph_computes():
    """The MHA graph (opset 14, IR 7) raised to opset 23 alone: ONNX Runtime loads it and it
    computes the same logits, bit for bit."""
    model = _mha("padding")
    assert raise_default_opset(model) == 14
    assert model.opset_imports[""] == 23 and model.ir_version >= 10
    for x, y in zip(_generate(_session(_mha("padding")), MHA_IDS, mask=MHA_MASK, kv_heads=4),
                    _generate(_session(model), MHA_IDS, mask=MHA_MASK, kv_heads=4)):
        np.testing.assert_array_equal(x, y)


def test_opset_raise_refuses_ops_whose_form_changed_before_any_change():
    """A ReduceMean with the axes attribute (an input from opset 18 on) cannot be raised to 23:
    refused by name, the graph untouched."""
    model = _mha("padding")
    x = model.graph.inputs[0]
    node = ir.node("ReduceMean", [x], {"axes": [1], "keepdims": 1}, name="old_reduce_mean")
    model.graph.append(node)
    assert opset_blockers(model) == ["ReduceMean (axes)"]
    before = model.graph.num_nodes()
    with pytest.raises(GraphPatternError, match=r"ReduceMean \(axes\).*--formulation naive"):
        normalize_contrib(model, [1, 2], target="attention")
    assert model.graph.num_nodes() == before and model.opset_imports[""] == 14
    assert sorted(contrib_attention_layers(model)) == [0, 1, 2]


def test_attention_form_partial_rotary_matches_the_eager_form():
    """cos/sin caches of hd/4 columns (rotary on half of each head: ONNX RotaryEmbedding's
    rotary_embedding_dim). ONNX Runtime's GQA refuses such caches for head size 16 (it needs a
    multiple of 8 columns), so the eager unfusing (its own rotate-half on the first dims) is the
    reference here; the full-rotary graph computes something else."""
    def load() -> ir.Model:
        model = ir.load(str(GRAPHS["genai"]))
        node = contrib_attention_layers(model)[0]
        for cache in (node.inputs[7], node.inputs[8]):  # shared by every layer
            half = np.ascontiguousarray(cache.const_value.numpy()[:, : tl.HEAD_DIM // 4])
            cache.const_value, cache.shape = ir.tensor(half), ir.Shape(list(half.shape))
        return model

    ids = np.array([[1, 20, 7, 30, 31, 11, 32, 21]])
    eager, attention = load(), load()
    normalize_contrib(eager, range(LAYERS))
    normalize_contrib(attention, range(LAYERS), target="attention")
    rotary = [n for n in attention.graph if n.op_type == "RotaryEmbedding"]
    assert {n.attributes["rotary_embedding_dim"].value for n in rotary} == {tl.HEAD_DIM // 2}
    a, b = _generate(_session(eager), ids), _generate(_session(attention), ids)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5)
    full = _generate(_session(ir.load(str(GRAPHS["genai"]))), ids)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, full)) > 1e-1


def test_attention_form_has_the_interleaved_rotary_the_eager_form_refuses():
    """GQA with rotary_interleaved=1: the Attention form computes what the fused graph does
    (ONNX RotaryEmbedding interleaved=1; batch 2 of unpadded rows, prefill + 3 decode steps); the
    eager unfusing refuses it by name and points at the Attention form."""
    def load() -> ir.Model:
        model = ir.load(str(GRAPHS["genai"]))
        for node in contrib_attention_layers(model).values():
            node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 1)
        return model

    with pytest.raises(GraphPatternError, match="rotary_interleaved=1.*--formulation fused-qk"):
        normalize_contrib(load(), [1])
    model = load()
    normalize_contrib(model, range(LAYERS), target="attention")
    assert {n.attributes["interleaved"].value for n in model.graph if n.op_type == "RotaryEmbedding"} == {1}
    ids = np.array([[1, 20, 7, 30, 31, 11, 32, 21], [1, 25, 26, 7, 11, 40, 41, 22]])
    a, b = _generate(_session(load()), ids), _generate(_session(model), ids)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5)
    plain = _generate(_session(ir.load(str(GRAPHS["genai"]))), ids)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, plain)) > 1e-1  # interleaving matters here
