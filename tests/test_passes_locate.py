"""locate, sink detection alone, errors, idempotency, op set, no torch import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from passes_fixtures import duplicates_added, tiny_attention_model, to_session

from var_export.core.errors import AlreadyAppliedError, ConfigError, GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import (
    ClassMassesPass,
    HeadSelectionPass,
    RedistributionPass,
    SinkDetectionPass,
    apply_var,
    locate_layers,
)

SETTINGS = VarSettings(sink_dims=(1, 6), tau=3.0, heads="dynamic", layers="0:")
ALLOWED_VAR_OPS = {
    "Abs", "Add", "And", "Cast", "Concat", "CumSum", "Div", "Equal", "Gather", "Greater",
    "GreaterOrEqual", "Identity", "LessOrEqual", "MatMul", "Max", "Mul", "Not", "ReduceMax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "Shape", "Slice", "Split", "Sqrt", "Squeeze", "Sub",
    "Transpose", "Unsqueeze", "Where",
}  # fmt: skip


@pytest.mark.parametrize("variant,path,dtype", [("plain", [], "float"), ("guard", ["Where"], "float"), ("fp16", ["Cast"], "float16")])
def test_locate_reads_layer_from_past_key_input_not_names(variant, path, dtype):
    model = tiny_attention_model(n_layers=2, variant=variant, layer_ids=[4, 2])
    matches = locate_layers(model).matches
    assert [m.layer for m in matches] == [2, 4]  # sorted by layer; graph order is 4, 2
    by_layer = {m.layer: m for m in matches}
    assert by_layer[4].residual.name == "inputs_embeds"
    assert by_layer[2].residual.name == "x_1"
    assert by_layer[4].residual_add.op_type == "Add"
    assert all(m.num_heads == 2 for m in matches)
    assert all(m.pv_matmul.op_type == "MatMul" and m.score_matmul.op_type == "MatMul" for m in matches)
    assert list(by_layer[2].probs_path) == path
    assert by_layer[2].probs_dtype.name.lower() == dtype
    assert by_layer[2].layer_source == "past_key_values.2.key"


@pytest.mark.parametrize("exporter", ["optimum", "legacy"])
def test_locate_reads_query_heads_built_at_run_time(exporter):
    """Optimum / TorchScript build the Q Reshape target at run time: H = q_proj width / hd."""
    from tests.fixtures.foreign.make_fixtures import GRAPHS

    matches = locate_layers(ir.load(str(GRAPHS[exporter]))).matches
    assert [m.layer for m in matches] == [0, 1, 2]
    assert all(m.num_heads == 4 for m in matches)  # 64-wide q_proj, head dim 16 (GQA: 2 KV heads)
    assert all("Q projection width 64 / head dim 16" in m.describe()["num_heads_from"] for m in matches)


def test_no_attention_lists_what_was_searched():
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,4] x) => (float[2,4] y) { s = Softmax<axis=-1>(x)
                                             y = Relu(s) }"""
    )
    with pytest.raises(GraphPatternError) as err:
        apply_var(ir.serde.deserialize_model(proto), SETTINGS, None)
    msg = str(err.value)
    assert "no decoder attention layer" in msg and "Searched" in msg
    assert "1 Softmax node(s)" in msg and "does not reach a MatMul" in msg


def test_softmax_without_kv_cache_says_why():
    model = tiny_attention_model(n_layers=1)
    model.graph.inputs[2].name = "cache_k"  # past_key_values.0.key renamed away
    with pytest.raises(GraphPatternError, match="past_key_values"):
        locate_layers(model)


def test_missing_layer_lists_each_ignored_softmax_on_its_own_line():
    model = tiny_attention_model(n_layers=2)
    next(v for v in model.graph.inputs if v.name == "past_key_values.1.key").name = "cache_k"
    with pytest.raises(GraphPatternError) as err:
        apply_var(model, SETTINGS, None, num_layers=2)
    msg = str(err.value)
    assert "VAR layers [1] were not found" in msg and "[(" not in msg
    lines = [line for line in msg.splitlines() if line.startswith("  Softmax ")]
    assert len(lines) == 1 and "past_key_values.1.value (layer 1)" in lines[0]  # the reason


def test_fused_attention_is_named_with_its_layer():
    proto = onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>
        g (float[1,2,8] q, float[1,2,8] k, float[1,2,8] v, float[1,2,3,4] pk, float[1,2,3,4] pv)
          => (float[1,2,8] y) {
            y, a, b = com.microsoft.MultiHeadAttention<num_heads=2>(q, k, v, , , , pk, pv)
        }"""
    )
    model = ir.serde.deserialize_model(proto)
    model.graph.inputs[3].name = "past_key_values.7.key"
    with pytest.raises(GraphPatternError) as err:
        locate_layers(model)
    assert "layer 7" in str(err.value) and "com.microsoft::MultiHeadAttention" in str(err.value)
    assert "fused_var" not in str(err.value)  # the fused formulation handles ONNX Attention only


def test_apply_twice_is_an_error_and_input_is_untouched():
    base = tiny_attention_model(n_layers=2)
    n_before = base.graph.num_nodes()
    once, _ = apply_var(base, SETTINGS, None)
    assert base.graph.num_nodes() == n_before  # not in place by default
    assert once.metadata_props["var_export.applied"] == "1"
    with pytest.raises(AlreadyAppliedError, match="already baked"):
        apply_var(once, SETTINGS, None)
    # a partial rewrite (sink detection only, no marker) is refused too
    partial = tiny_attention_model(n_layers=2)
    SinkDetectionPass(SETTINGS)(partial)
    with pytest.raises(AlreadyAppliedError, match="present_sink_mask"):
        apply_var(partial, SETTINGS, None)


def test_each_pass_is_idempotent_and_reports_modified():
    model = tiny_attention_model(n_layers=2)
    assert SinkDetectionPass(SETTINGS)(model).modified
    assert not SinkDetectionPass(SETTINGS)(model).modified
    assert ClassMassesPass(SETTINGS)(model).modified
    assert not ClassMassesPass(SETTINGS)(model).modified
    assert HeadSelectionPass(SETTINGS)(model).modified
    assert not HeadSelectionPass(SETTINGS)(model).modified
    assert RedistributionPass(SETTINGS)(model).modified
    n = model.graph.num_nodes()
    assert not RedistributionPass(SETTINGS)(model).modified
    assert model.graph.num_nodes() == n
    assert [m.layer for m in locate_layers(model).matches] == [0, 1]  # still found


def test_redistribution_before_selection_changes_nothing():
    model = tiny_attention_model(n_layers=1)
    SinkDetectionPass(SETTINGS)(model)
    assert not RedistributionPass(SETTINGS)(model).modified


def test_var_nodes_use_static_shape_ops_and_var_names():
    base = tiny_attention_model(n_layers=2)
    model, _ = apply_var(base, SETTINGS.replace(heads="hybrid"), [(1, 0)])
    var_nodes = [n for n in model.graph if n.name.startswith("var/")]
    assert var_nodes
    assert {n.op_type for n in var_nodes} <= ALLOWED_VAR_OPS, {n.op_type for n in var_nodes} - ALLOWED_VAR_OPS
    # hybrid: layer 0 has no candidate head -> only sink detection nodes, no redistribution
    assert not any(n.name.startswith("var/L0/") and "probs" in n.name for n in var_nodes)
    assert any(n.name.startswith("var/L1/probs_var") for n in var_nodes)
    m0 = {m.layer: m for m in locate_layers(model).matches}[0]
    assert m0.pv_matmul.inputs[0] is m0.softmax.outputs[0]
    assert not any(c.name.startswith("var/") for c in m0.softmax.outputs[0].consumers())


def test_sink_detection_alone_adds_contract_io():
    model = tiny_attention_model(n_layers=3, heads=2, head_dim=8)
    SinkDetectionPass(SETTINGS.replace(layers="1:"))(model)
    ins = {v.name: v for v in model.graph.inputs}
    assert ins["visual_token_mask"].dtype == ir.DataType.BOOL
    assert ins["past_sink_mask"].dtype == ir.DataType.BOOL and ins["past_sink_mask"].shape[1] == 2
    out = model.graph.outputs[-1]
    assert out.name == "present_sink_mask" and out.dtype == ir.DataType.BOOL
    sess = to_session(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    x[0, 1, 6] = 50.0
    feeds = {"inputs_embeds": x, "attention_mask": np.array([[0, 1, 1]]), "visual_token_mask": np.zeros((1, 3), bool),
             "past_sink_mask": np.zeros((1, 2, 0), bool)}  # fmt: skip
    for i in range(3):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, 2, 0, 8), np.float32)
    present = sess.run(["present_sink_mask"], feeds)[0]
    assert present.shape == (1, 2, 3) and present[0, :, 1].all() and not present[0, :, 0].any()


def test_config_errors():
    base = tiny_attention_model(n_layers=2)
    with pytest.raises(ConfigError, match="head list"):
        apply_var(base, SETTINGS.replace(heads="static"), None)
    with pytest.raises(ConfigError, match="out of range"):
        apply_var(base, SETTINGS.replace(heads="static"), [(0, 5)])
    with pytest.raises(ConfigError, match="sink dims"):
        apply_var(base, SETTINGS.replace(sink_dims=(99,)), None)
    with pytest.raises(GraphPatternError, match="not found"):
        apply_var(base, SETTINGS.replace(layers="2,3"), None, num_layers=4)
    with pytest.raises(ConfigError):
        apply_var(base, SETTINGS.replace(layers="5"), None)


def test_passes_never_import_torch():
    code = "import sys, var_export.passes, var_export.passes.pipeline; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.parametrize("variant", ["plain", "fp16"])
@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
def test_var_graph_has_no_duplicate_subexpressions(variant, mode):
    base = tiny_attention_model(n_layers=3, variant=variant)
    model, _ = apply_var(base, SETTINGS.replace(heads=mode), [(0, 1), (1, 0), (2, 0)])
    nodes, constants = duplicates_added(base, model)
    assert nodes == 0 and constants == []
    # fp16 probabilities are cast to fp32 once per layer (for the class masses); the weights are
    # applied in fp16, so no (B, H, S, T) tensor is cast back
    probs = {m.layer: m.probs for m in locate_layers(model).matches}[1]
    casts = [n for n in probs.consumers() if n.op_type == "Cast"]
    assert len(casts) == (1 if variant == "fp16" else 0)
    assert not any(n.op_type == "Cast" and n.inputs[0].name.startswith("var/L1/probs") for n in model.graph)


def test_passes_locate_once_when_given_the_analysis(monkeypatch):
    from var_export.passes import analysis as analysis_module

    calls = []
    real = analysis_module.locate_layers
    monkeypatch.setattr(analysis_module, "locate_layers", lambda m: calls.append(1) or real(m))
    apply_var(tiny_attention_model(n_layers=2), SETTINGS, None)
    assert len(calls) == 1
