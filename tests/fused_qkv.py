"""A Phi-3-style decoder graph with one fused q/k/v projection (``qkv_proj``), for the query-head
count of passes/locate.py. Uses only APIs that existed at 4d6a2f5 (benchmarks/abuse_cases.py
runs :func:`fused_qkv_case` against that commit too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from var_export.core.settings import VarSettings

FUSED_QKV = """
<ir_version: 8, opset_import: ["" : 18]>
fused ({inputs}) => ({outputs}) {{
    q_start = Constant<value = int64[1] {{0}}>()
    q_end = Constant<value = int64[1] {{{d}}}>()
    k_end = Constant<value = int64[1] {{{d2}}}>()
    v_end = Constant<value = int64[1] {{{d3}}}>()
    last = Constant<value = int64[1] {{2}}>()
    i0 = Constant<value = int64[1] {{0}}>()
    i1 = Constant<value = int64[1] {{1}}>()
    minus1 = Constant<value = int64[1] {{-1}}>()
    hdc = Constant<value = int64[1] {{{hd}}}>()
    merge_shape = Constant<value = int64[3] {{0, 0, {d}}}>()
    scale = Constant<value = float {{0.5}}>()
    one = Constant<value = float {{1.0}}>()
    neg = Constant<value = float {{-10000.0}}>()
    axes13 = Constant<value = int64[2] {{1, 2}}>()
    keep = Cast<to=1>(attention_mask)
    dropped = Sub(one, keep)
    bias = Mul(dropped, neg)
    mask_bias = Unsqueeze(bias, axes13)
    {layers}
}}
"""
FUSED_LAYER = """
    qkv_{i} = MatMul(x_{i}, wqkv_{i})
    q2_{i} = Slice(qkv_{i}, q_start, q_end, last)
    k2_{i} = Slice(qkv_{i}, q_end, k_end, last)
    v2_{i} = Slice(qkv_{i}, k_end, v_end, last)
    shp_{i} = Shape(x_{i})
    bdim_{i} = Gather<axis=0>(shp_{i}, i0)
    sdim_{i} = Gather<axis=0>(shp_{i}, i1)
    target_{i} = Concat<axis=0>(bdim_{i}, sdim_{i}, minus1, hdc)
    q4_{i} = Reshape(q2_{i}, target_{i})
    q_{i} = Transpose<perm=[0,2,1,3]>(q4_{i})
    k4_{i} = Reshape(k2_{i}, target_{i})
    k_{i} = Transpose<perm=[0,2,1,3]>(k4_{i})
    v4_{i} = Reshape(v2_{i}, target_{i})
    v_{i} = Transpose<perm=[0,2,1,3]>(v4_{i})
    pk_out_{i} = Concat<axis=2>(pk_{i}, k_{i})
    pv_out_{i} = Concat<axis=2>(pv_{i}, v_{i})
    kt_{i} = Transpose<perm=[0,1,3,2]>(pk_out_{i})
    qk_{i} = MatMul(q_{i}, kt_{i})
    scores_{i} = Mul(qk_{i}, scale)
    masked_{i} = Add(scores_{i}, mask_bias)
    probs_{i} = Softmax<axis=-1>(masked_{i})
    attn_{i} = MatMul(probs_{i}, pv_out_{i})
    attn_t_{i} = Transpose<perm=[0,2,1,3]>(attn_{i})
    merged_{i} = Reshape(attn_t_{i}, merge_shape)
    proj_{i} = MatMul(merged_{i}, wo_{i})
    x_{n} = Add(x_{i}, proj_{i})
"""


def fused_qkv_model(n_layers: int = 3, heads: int = 2, hd: int = 4) -> ir.Model:
    """A Phi-3-style decoder: one fused q/k/v projection sliced into Q, K, V, and a Q Reshape
    target built at run time (so the head count cannot be read from a constant)."""
    d = heads * hd
    ins = [f"float[B,S,{d}] x_0", "int64[B,T] attention_mask"]
    outs = [f"float[B,S,{d}] x_{n_layers}"]
    for i in range(n_layers):
        ins += [f"float[B,{heads},P,{hd}] pk_{i}", f"float[B,{heads},P,{hd}] pv_{i}",
                f"float[{d},{3 * d}] wqkv_{i}", f"float[{d},{d}] wo_{i}"]
        outs += [f"float[B,{heads},T,{hd}] pk_out_{i}", f"float[B,{heads},T,{hd}] pv_out_{i}"]
    text = FUSED_QKV.format(inputs=", ".join(ins), outputs=", ".join(outs), d=d, d2=2 * d, d3=3 * d, hd=hd,
                            layers="".join(FUSED_LAYER.format(i=i, n=i + 1) for i in range(n_layers)))
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    for v in [v for v in model.graph.inputs if v.name.startswith("w")]:
        model.graph.inputs.remove(v)
        shape = tuple(int(x) for x in v.shape)
        v.const_value = ir.tensor((rng.standard_normal(shape) * 0.3).astype(np.float32), name=v.name)
        model.graph.register_initializer(v)
    for v in model.graph.inputs:
        if v.name.startswith(("pk_", "pv_")):
            v.name = f"past_key_values.{v.name.split('_')[1]}.{'key' if v.name.startswith('pk') else 'value'}"
    for v in model.graph.outputs:
        if v.name.startswith(("pk_out_", "pv_out_")):
            i = v.name.split("_")[-1]
            v.name = f"present.{i}.{'key' if v.name.startswith('pk') else 'value'}"
    model.graph.inputs[0].name = "inputs_embeds"
    return model


def fused_qkv_case(work: Path) -> tuple[bool, str]:
    """Used by benchmarks/abuse_cases.py too: heads read right, hybrid graph loads and runs."""
    from var_export.passes.locate import locate_layers
    from var_export.rewrite import rewrite_decoder

    work.mkdir(parents=True, exist_ok=True)
    src = work / "fused_qkv.onnx"
    ir.save(fused_qkv_model(), str(src))
    heads = sorted({m.num_heads for m in locate_layers(ir.load(str(src))).matches})
    out = work / "fused_qkv_var.onnx"
    if out.exists():
        out.unlink()
    cal = {"fingerprint": {"num_heads": 2, "num_layers": 3}, "heads": [[1, 1], [2, 0]]}
    rewrite_decoder(src, out, VarSettings(sink_dims=(1, 2), tau=1.0, heads="hybrid", layers="1:"),
                    calibration=cal)
    import onnxruntime as ort

    # the VAR graph loads, and with no visual token it computes exactly the original graph
    plain = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    var = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    b, s = 2, 5
    feeds = {"inputs_embeds": rng.standard_normal((b, s, 8)).astype(np.float32),
             "attention_mask": np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)}
    for i in range(3):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((b, 2, 0, 4), np.float32)
    want = plain.run(None, feeds)[0]
    names = {i.name for i in var.get_inputs()}
    lv = next(i.shape[1] for i in var.get_inputs() if i.name == "past_sink_mask")
    extra = {"visual_token_mask": np.zeros((b, s), np.bool_), "past_sink_mask": np.zeros((b, lv, 0), np.bool_)}
    got = var.run(None, {**feeds, **{k: v for k, v in extra.items() if k in names}})[0]
    same = bool(np.allclose(got, want, atol=1e-6))
    return heads == [2] and same, f"query heads {heads} (expected [2]); hybrid graph loads, VAR-off output equal: {same}"
