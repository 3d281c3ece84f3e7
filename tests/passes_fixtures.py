"""Test graphs and a numpy implementation of DESIGN.md §1 for the passes' tests.

* ``tiny_attention_model``: hand-written ONNX text, ``n_layers`` pre-norm-free attention
  blocks ``x + Wo(softmax(QK^T/sqrt(d) + mask) V)`` with a KV cache, optional Optimum-style
  ``Where(IsNaN)`` guard and fp16 probabilities.
* ``export_tiny_llama``: a dynamo export of a small random LlamaForCausalLM (GQA, eager).
* ``numpy_sink_flags`` / ``numpy_var``: DESIGN.md §1 written literally in numpy (float64).
* ``probe``: expose each VAR layer's residual, probabilities, V and probs@V as outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from var_export.passes.locate import locate_layers

# ---------------------------------------------------------------- tiny hand-written graphs

_LAYER = """
    q2_{i} = MatMul(x_{i}, wq_{i})
    q4_{i} = Reshape(q2_{i}, split_shape)
    q_{i} = Transpose<perm=[0,2,1,3]>(q4_{i})
    k2_{i} = MatMul(x_{i}, wk_{i})
    k4_{i} = Reshape(k2_{i}, split_shape)
    k_{i} = Transpose<perm=[0,2,1,3]>(k4_{i})
    v2_{i} = MatMul(x_{i}, wv_{i})
    v4_{i} = Reshape(v2_{i}, split_shape)
    v_{i} = Transpose<perm=[0,2,1,3]>(v4_{i})
    pk_out_{i} = Concat<axis=2>(pk_{i}, k_{i})
    pv_out_{i} = Concat<axis=2>(pv_{i}, v_{i})
    kt_{i} = Transpose<perm=[0,1,3,2]>(pk_out_{i})
    qk_{i} = MatMul(q_{i}, kt_{i})
    scores_{i} = Mul(qk_{i}, scale)
    masked_{i} = Add(scores_{i}, mask_bias)
    probs_{i} = Softmax<axis=-1>(masked_{i})
    {probs_to_v}
    attn_t_{i} = Transpose<perm=[0,2,1,3]>(attn_{i})
    merged_{i} = Reshape(attn_t_{i}, merge_shape)
    proj_{i} = MatMul(merged_{i}, wo_{i})
    x_{next} = Add(x_{i}, proj_{i})
"""

_PLAIN = "attn_{i} = MatMul(probs_{i}, pv_out_{i})"
_GUARD = """nan_{i} = IsNaN(probs_{i})
    guarded_{i} = Where(nan_{i}, zero, probs_{i})
    attn_{i} = MatMul(guarded_{i}, pv_out_{i})"""
_FP16 = """probs16_{i} = Cast<to=10>(probs_{i})
    v16_{i} = Cast<to=10>(pv_out_{i})
    attn16_{i} = MatMul(probs16_{i}, v16_{i})
    attn_{i} = Cast<to=1>(attn16_{i})"""


def tiny_attention_text(
    n_layers: int = 2, heads: int = 2, head_dim: int = 4, *, variant: str = "plain"
) -> str:
    """ONNX text of the tiny decoder; weights are graph inputs named w*_{i}."""
    d = heads * head_dim
    body = {"plain": _PLAIN, "guard": _GUARD, "fp16": _FP16}[variant]
    ins = [f"float[B,S,{d}] x_0", "int64[B,T] attention_mask"]
    outs = [f"float[B,S,{d}] x_{n_layers}"]
    nodes = []
    for i in range(n_layers):
        ins += [f"float[B,{heads},P,{head_dim}] pk_{i}", f"float[B,{heads},P,{head_dim}] pv_{i}"]
        ins += [f"float[{d},{d}] w{w}_{i}" for w in "qkvo"]
        outs += [f"float[B,{heads},T,{head_dim}] pk_out_{i}", f"float[B,{heads},T,{head_dim}] pv_out_{i}"]
        nodes.append(_LAYER.format(i=i, next=i + 1, probs_to_v=body.format(i=i)))
    return f"""
<ir_version: 8, opset_import: ["" : 18]>
tiny ({", ".join(ins)}) => ({", ".join(outs)}) {{
    split_shape = Constant<value = int64[4] {{0, 0, {heads}, {head_dim}}}>()
    merge_shape = Constant<value = int64[3] {{0, 0, {d}}}>()
    scale = Constant<value = float {{{1.0 / np.sqrt(head_dim)}}}>()
    zero = Constant<value = float {{0.0}}>()
    one = Constant<value = float {{1.0}}>()
    neg = Constant<value = float {{-10000.0}}>()
    axes13 = Constant<value = int64[2] {{1, 2}}>()
    keep = Cast<to=1>(attention_mask)
    dropped = Sub(one, keep)
    bias = Mul(dropped, neg)
    mask_bias = Unsqueeze(bias, axes13)
    {"".join(nodes)}
}}
"""


def tiny_attention_model(
    n_layers: int = 2,
    heads: int = 2,
    head_dim: int = 4,
    *,
    variant: str = "plain",
    layer_ids: list[int] | None = None,
    seed: int = 0,
    weight_scale: float = 0.1,
) -> ir.Model:
    """The tiny decoder as an onnx-ir model with decoder-contract names.

    ``layer_ids`` renames the cache inputs (layer i reads past_key_values.{layer_ids[i]});
    node names are set to misleading ``layers.{99-i}...`` so tests prove names are unused.
    """
    proto = onnx.parser.parse_model(tiny_attention_text(n_layers, heads, head_dim, variant=variant))
    onnx.checker.check_model(proto)
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    rng = np.random.default_rng(seed)
    d = heads * head_dim
    ids = layer_ids or list(range(n_layers))
    for v in list(graph.inputs):
        name = v.name or ""
        if name.startswith("w"):
            graph.inputs.remove(v)
            v.const_value = ir.tensor((rng.standard_normal((d, d)) * weight_scale).astype(np.float32), name=name)
            graph.register_initializer(v)
        elif name.startswith("pk_") or name.startswith("pv_"):
            i = int(name.split("_")[1])
            v.name = f"past_key_values.{ids[i]}.{'key' if name.startswith('pk') else 'value'}"
    for v in graph.outputs:
        name = v.name or ""
        if name.startswith("pk_out_") or name.startswith("pv_out_"):
            i = int(name.split("_")[-1])
            v.name = f"present.{ids[i]}.{'key' if name.startswith('pk') else 'value'}"
    graph.inputs[0].name = "inputs_embeds"
    for j, node in enumerate(graph):
        node.name = f"layers.{99 - j % 7}.{node.op_type.lower()}_{j}"
    return model


# ---------------------------------------------------------------- real dynamo export


@dataclasses.dataclass
class LlamaSpec:
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 96
    seed: int = 0


def export_tiny_llama(path: Path, spec: LlamaSpec = LlamaSpec()) -> Path:  # noqa: B008
    """Dynamo export of a random LlamaForCausalLM decoder with the decoder contract IO."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    n = spec.layers

    class Decoder(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
            cache = DynamicCache(config=self.m.config)
            for i in range(n):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            res = [out.logits]
            for i in range(n):
                res += [out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values]
            return tuple(res)

    hd = spec.hidden // spec.heads
    b, s, p = 2, 3, 4
    args = (
        torch.randn(b, s, spec.hidden),
        torch.ones(b, s + p, dtype=torch.int64),
        torch.arange(p, p + s).repeat(b, 1),
        *[torch.randn(b, spec.kv_heads, p, hd) for _ in range(2 * n)],
    )
    names = ["inputs_embeds", "attention_mask", "position_ids"]
    names += [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    onames = ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dyn = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in range(2 * n)),
    )
    with torch.no_grad():
        program = torch.onnx.export(
            Decoder(model).eval(), args, dynamo=True, input_names=names, output_names=onames,
            dynamic_shapes=dyn, opset_version=18, verbose=False,
        )  # fmt: skip
    program.save(str(path))
    return path


# ---------------------------------------------------------------- numpy DESIGN.md §1


def numpy_sink_flags(x: np.ndarray, sink_dims: tuple[int, ...], tau: float) -> np.ndarray:
    """(B, S, D) residual -> (B, S) sink flags, float64."""
    x = x.astype(np.float64)
    n = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    return np.abs(n[..., list(sink_dims)]).max(axis=-1) > tau


def numpy_var(
    a: np.ndarray,  # (B, H, S, T) probabilities
    visual: np.ndarray,  # (B, T) bool
    sink: np.ndarray,  # (B, T) bool
    *,
    rho: float,
    summ: float,
    p: float,
    mode: str,
    heads: list[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md §1 row by row: returns (a', selected (B, H, S))."""
    a = a.astype(np.float64)
    bsz, nh, s, t = a.shape
    past = t - s
    out = a.copy()
    selected = np.zeros((bsz, nh, s), dtype=bool)
    for b in range(bsz):
        vis = visual[b]
        s_v = sink[b] & vis
        s_t = sink[b] & ~vis
        v_ns = vis & ~s_v
        if not s_v.any():
            continue
        for q in range(s):
            qpos = past + q
            if vis[qpos] or not vis[: qpos + 1].any():
                continue  # not eligible
            for h in range(nh):
                row = a[b, h, q]
                if mode in ("static", "hybrid") and h not in (heads or []):
                    continue
                if mode in ("dynamic", "hybrid"):
                    portion = row[s_v].sum() / (row[vis] + 1e-6).sum()
                    if not (portion <= rho and row[vis].sum() >= summ):
                        continue
                rest = row[v_ns].sum()
                if not rest > 0:
                    continue
                budget = (1 - p) * (row[s_v].sum() + row[s_t].sum())
                new = row.copy()
                new[s_v | s_t] = p * row[s_v | s_t]
                new[v_ns] = row[v_ns] + budget * row[v_ns] / rest
                out[b, h, q] = new
                selected[b, h, q] = True
    return out, selected


def probe(model: ir.Model) -> dict[int, dict[str, str]]:
    """Add graph outputs for each located layer's residual, probs, V and probs@V.

    Returns {layer: {"residual": name, "probs": name, "v": name, "attn": name}}.
    """
    names: dict[int, dict[str, str]] = {}
    existing = {v.name for v in model.graph.outputs}
    for m in locate_layers(model).matches:
        entry = {}
        for key, value in (
            ("residual", m.residual),
            ("probs", m.probs),
            ("v", m.pv_matmul.inputs[1]),
            ("attn", m.pv_matmul.outputs[0]),
        ):
            assert value is not None and value.name
            if value.name not in existing and not value.is_graph_input():
                model.graph.outputs.append(value)
                existing.add(value.name)
            entry[key] = value.name
        names[m.layer] = entry
    return names


def to_session(model: ir.Model | Path):  # type: ignore[no-untyped-def]
    """An ORT CPU session, no graph optimisation; a path keeps its external data."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else ir.serde.serialize_model(model).SerializeToString()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------ graph hygiene


def duplicates_added(base: ir.Model, model: ir.Model) -> tuple[int, list[str]]:
    """(nodes onnx-ir's CSE removes from ``model`` beyond those it removes from ``base``,
    names of ``var/`` initializers whose content another one already holds)."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    removed = []
    for m in (base, model):
        m = m.clone()
        n = m.graph.num_nodes()
        CommonSubexpressionEliminationPass()(m)
        removed.append(n - m.graph.num_nodes())
    seen: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    twins = []
    for name, value in model.graph.initializers.items():
        if name.startswith("var/") and value.const_value is not None:
            arr = value.const_value.numpy()
            key = (str(arr.dtype), arr.shape, arr.tobytes())
            if key in seen:
                twins.append(f"{name} = {seen[key]}")
            seen.setdefault(key, name)
    return removed[1] - removed[0], twins
