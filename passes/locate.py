"""Locate, per decoder layer, where VAR hooks into an exported decoder graph.

For every ``Softmax`` we try to read one attention layer:

1. **probabilities** — follow the Softmax output forward through optional
   ``Cast`` / ``Where`` (the sdpa ``Where(IsNaN(p), 0, p)`` guard of Optimum exports) /
   ``Identity`` / ``Dropout`` nodes to a ``MatMul`` that takes it as its first input:
   the *probs-V MatMul*. VAR is inserted right before it.
2. **layer index** — walk backward from the Softmax input through the score
   arithmetic (``Add``/``Mul``/``Div``/``Where``/``Cast``...) to the *score MatMul*
   ``Q @ K^T``, then along the data inputs of its K operand (not through ``Shape``
   nor the shape operands of ``Reshape``/``Expand``/...) to the nearest graph input
   called ``past_key_values.{i}.key`` (also ``past.{i}.key``, ``past_key_values_{i}_key``).
   The index never comes from node names. The V operand must reach
   ``past_key_values.{i}.value`` of the same ``i`` when the graph has value inputs.
3. **residual stream** (heuristic, pre-norm LLaMA-style blocks): follow the probs-V
   MatMul output forward through ``Transpose``/``Reshape``/``Cast``/``Identity`` to the
   output-projection ``MatMul`` (or ``Gemm``), then through an optional bias ``Add``
   with a constant operand and ``Cast``s, to the first ``Add`` whose other operand is
   not a constant: the residual ``Add``. Its other operand is the residual stream
   entering the layer (the tensor the input RMSNorm reads).
4. **query heads** — dim 1 of the probabilities' static shape, else of the score
   MatMul's first input, else from the Q ``Reshape`` constant ``[.., .., H, hd]``
   (``H = -1`` resolved as ``D / hd``), else (Optimum / TorchScript build that target at
   run time) the Q projection's output width / the head size (dim 3) of the layer's
   ``past_key_values.{i}.key`` input.

Nodes named ``var/...`` (added by the VAR passes) are transparent, so locating a
graph that already carries VAR nodes finds the same layers.

Fused attention ops hide the probabilities: the ONNX ``Attention`` op and ORT's
``MultiHeadAttention`` / ``GroupQueryAttention`` (and other com.microsoft attention
ops) raise a ``GraphPatternError`` naming them and their layer; for ONNX ``Attention``
graphs it points at the fused formulation, ``passes.fused_var``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes._ir import constant_array, is_constant, is_var_node, resolve_dtype

__all__ = [
    "LayerMatch",
    "LocateResult",
    "check_softmax",
    "find_residual",
    "format_rejected",
    "locate_layers",
    "nearest_input",
    "resolve_dtype",
    "static_dim",
]

PAST_KEY_RE = re.compile(r"^past(?:_key_values)?[._](\d+)[._]key$")
PAST_VALUE_RE = re.compile(r"^past(?:_key_values)?[._](\d+)[._]value$")

FUSED_ATTENTION_OPS = {
    ("", "Attention"),
    ("ai.onnx", "Attention"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "PackedAttention"),
    ("com.microsoft", "PackedMultiHeadAttention"),
    ("com.microsoft", "SparseAttention"),
    ("com.microsoft", "DecoderMaskedMultiHeadAttention"),
}

# Ops between Softmax and the probs-V MatMul (the probabilities pass through them).
_PROBS_PASS_THROUGH = {"Cast", "Where", "Identity", "Dropout"}
# Ops between the score MatMul and the Softmax (scale, mask, soft-capping).
_SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Tanh", "Max", "Min"}
# Ops whose non-first inputs are shapes/indices, not data.
_DATA_INPUT0_ONLY = {
    "Reshape", "Expand", "Slice", "Gather", "Unsqueeze", "Squeeze", "Tile", "Pad", "GatherElements",
}  # fmt: skip
_NO_DATA = {"Shape", "Size", "ConstantOfShape", "Range"}
# Ops between the probs-V MatMul and the output projection.
_HEADS_MERGE_OPS = {"Transpose", "Reshape", "Cast", "Identity"}


@dataclasses.dataclass
class LayerMatch:
    """Where VAR hooks into one decoder layer."""

    layer: int  # decoder layer index, from which past_key_values.{i}.key reaches the scores
    softmax: ir.Node  # the attention Softmax
    probs: ir.Value  # (B, H, S, T) probabilities as the probs-V MatMul reads them (pre-VAR)
    pv_matmul: ir.Node  # MatMul(probs, V): VAR rewrites its first input
    score_matmul: ir.Node  # MatMul(Q, K^T) feeding the Softmax
    residual: ir.Value  # (B, S, D) residual stream entering the layer
    residual_add: ir.Node  # the Add of the attention output to the residual stream
    num_heads: int | None  # query heads H (None when the graph does not tell)
    probs_dtype: ir.DataType  # dtype of `probs` at the MatMul
    probs_fp16: bool  # probabilities are float16/bfloat16 at the MatMul
    probs_path: tuple[str, ...]  # op types between Softmax and the probs-V MatMul
    layer_source: str  # name of the graph input that fixed `layer`
    num_heads_source: str = ""  # where `num_heads` was read

    def describe(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "softmax": self.softmax.name,
            "probs": self.probs.name,
            "pv_matmul": self.pv_matmul.name,
            "score_matmul": self.score_matmul.name,
            "residual": self.residual.name,
            "residual_add": self.residual_add.name,
            "num_heads": self.num_heads,
            "num_heads_from": self.num_heads_source,
            "probs_dtype": self.probs_dtype.name.lower(),
            "probs_path": list(self.probs_path),
            "layer_from": self.layer_source,
        }


@dataclasses.dataclass
class LocateResult:
    matches: list[LayerMatch]
    rejected: list[tuple[str, str]]  # (softmax node name, why it is not a decoder attention)


def _real_consumers(value: ir.Value) -> list[ir.Node]:
    return [n for n in value.consumers()]


def _follow_probs(softmax: ir.Node) -> tuple[ir.Node, ir.Value, tuple[str, ...]] | str:
    """Softmax output → (probs-V MatMul, its probs input, path) or a reason."""
    start = softmax.outputs[0]
    # DFS over pass-through ops; var/ nodes are transparent.
    found: list[tuple[ir.Node, ir.Value, tuple[str, ...]]] = []
    stack: list[tuple[ir.Value, ir.Value, tuple[str, ...]]] = [(start, start, ())]
    seen: set[int] = set()
    while stack:
        value, last_original, path = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        for node in _real_consumers(value):
            if is_var_node(node):
                for out in node.outputs:
                    stack.append((out, last_original, path))
                continue
            if node.op_type == "MatMul" and node.inputs[0] is value:
                found.append((node, last_original, path))
            elif node.op_type in _PROBS_PASS_THROUGH:
                if node.op_type == "Where" and node.inputs[0] is value:
                    continue  # used as the condition, not as data
                if node.op_type == "Dropout" and node.inputs[0] is not value:
                    continue
                out = node.outputs[0]
                stack.append((out, out, (*path, node.op_type)))
    unique = {id(m[0]): m for m in found}
    if not unique:
        return "its output does not reach a MatMul as first input (through Cast/Where/Identity)"
    if len(unique) > 1:
        return f"its output feeds {len(unique)} MatMuls; expected exactly one probs @ V"
    return next(iter(unique.values()))


def _find_score_matmul(softmax: ir.Node) -> ir.Node | None:
    """The nearest MatMul (Q @ K^T) behind the Softmax through the score arithmetic."""

    def follow(node: ir.Node) -> Sequence[ir.Value | None]:
        return node.inputs if node.op_type in _SCORE_OPS or is_var_node(node) else ()

    for producer in _upstream(softmax.inputs[0], follow, limit=1 << 20):
        if producer.op_type == "MatMul" and not is_var_node(producer):
            return producer
    return None


def nearest_input(value: ir.Value | None, pattern: re.Pattern[str]) -> tuple[int, str] | None:
    """Breadth-first along data inputs to the nearest graph input matching ``pattern``."""
    queue = collections.deque([value])
    seen: set[int] = set()
    while queue:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input() and v.name:
            m = pattern.match(v.name)
            if m:
                return int(m.group(1)), v.name
        producer = v.producer()
        if producer is None or producer.op_type in _NO_DATA:
            continue
        if producer.op_type in _DATA_INPUT0_ONLY:
            queue.append(producer.inputs[0])
        else:
            queue.extend(producer.inputs)
    return None


def find_residual(pv_matmul: ir.Node) -> tuple[ir.Node, ir.Value] | str:
    """From the attention output (probs @ V, or a fused attention node) forward to the
    residual Add: (that Add, the residual stream entering the layer), or a reason."""
    value = pv_matmul.outputs[0]
    saw_projection = False
    for _ in range(16):
        consumers = [n for n in value.consumers() if not is_var_node(n)]
        through_var = [n for n in value.consumers() if is_var_node(n) and n.inputs[0] is value]
        if not consumers and len(through_var) == 1 and through_var[0].op_type in ("Slice", "Cast"):
            value = through_var[0].outputs[0]  # a VAR score shift slices the attention output back
            continue
        if len(consumers) != 1:
            where = "output projection" if not saw_projection else "residual Add"
            return (
                f"looking for the {where}, {value.name!r} has {len(consumers)} consumers "
                f"({[n.op_type for n in consumers]}); expected one"
            )
        node = consumers[0]
        if not saw_projection:
            if node.op_type in _HEADS_MERGE_OPS and node.inputs[0] is value:
                value = node.outputs[0]
                continue
            if node.op_type in ("MatMul", "Gemm") and node.inputs[0] is value:
                saw_projection = True
                value = node.outputs[0]
                continue
            return f"after probs @ V found {node.op_type}, expected Transpose/Reshape then the output projection MatMul"
        if node.op_type in ("Cast", "Identity"):
            value = node.outputs[0]
            continue
        if node.op_type == "Add":
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            if is_constant(other):  # projection bias
                value = node.outputs[0]
                continue
            assert other is not None
            return node, other
        return f"after the output projection found {node.op_type}, expected the residual Add"
    return "no residual Add within 16 nodes after probs @ V"


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """``value.shape[axis]`` when it is a static int, else None."""
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _upstream(
    value: ir.Value | None, follow: Callable[[ir.Node], Sequence[ir.Value | None]], limit: int
) -> Iterator[ir.Node]:
    """Producers breadth-first backward from ``value``; ``follow(node)`` names the inputs to
    walk on from ``node`` (empty: stop there). At most ``limit`` values are visited."""
    queue = collections.deque([value])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is not None:
            yield producer
            queue.extend(follow(producer))


def _reshape_heads(q: ir.Value | None) -> int | None:
    """H from the Q Reshape target [B, S, H, hd] (H may be -1 = D / hd), constant or a Concat
    of constant parts."""

    def follow(node: ir.Node) -> Sequence[ir.Value | None]:
        if node.op_type in ("Transpose", "Mul", "Div", "Cast", "Concat", "Neg", "Slice"):
            return node.inputs[:1]
        return node.inputs if node.op_type == "Add" else ()

    for producer in _upstream(q, follow, 33):
        if producer.op_type != "Reshape":
            continue
        target = constant_array(producer.inputs[1])
        if target is None and producer.inputs[1] is not None:
            concat = producer.inputs[1].producer()
            if concat is not None and concat.op_type == "Concat":
                parts = [constant_array(x) for x in concat.inputs]
                if all(p is not None and p.size == 1 for p in parts[2:]):
                    target = [0, 0, *[int(p.reshape(-1)[0]) for p in parts[2:]]]  # type: ignore[union-attr]
        if target is not None and len(target) == 4:
            h, hd = int(target[2]), int(target[3])
            if h > 0:
                return h
            d = static_dim(producer.inputs[0], 2)
            if h == -1 and hd > 0 and d is not None:
                return d // hd
    return None


def _q_width(q: ir.Value | None) -> int | None:
    """Output width of the Q projection: the first MatMul/Gemm with a 2-D constant-shaped
    weight walking back from the score MatMul's Q operand (shapes only, no data read)."""

    def follow(node: ir.Node) -> Sequence[ir.Value | None]:
        if node.op_type in ("Reshape", "Slice", "Transpose", "RotaryEmbedding"):  # rotary: ORT contrib
            return node.inputs[:1]
        if node.op_type in ("Mul", "Div", "Add", "Cast", "Concat", "Neg", "Identity", "Split", "Sub"):
            return node.inputs
        return ()

    for node in _upstream(q, follow, 64):
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        shape = None if w is None else (w.const_value.shape if w.const_value is not None else w.shape)
        if shape is not None and len(shape) == 2 and isinstance(shape[1], int):
            trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            return int(shape[0] if trans_b else shape[1])
    return None


def _fused_q_width(q: ir.Value | None, projection_width: int | None) -> int | None:
    """Width of Q cut from a fused q/k/v projection (Phi-3 ``qkv_proj``): the Slice or Split
    feeding the Q Reshape (constant bounds on the last axis), else None."""

    def follow(node: ir.Node) -> Sequence[ir.Value | None]:
        if node.op_type in ("Transpose", "Mul", "Div", "Cast", "Concat", "Neg", "Slice"):
            return node.inputs[:1]
        return node.inputs if node.op_type == "Add" else ()

    reshape = next((n for n in _upstream(q, follow, 33) if n.op_type == "Reshape"), None)
    data = None if reshape is None else reshape.inputs[0]
    cut = None if data is None else data.producer()
    if cut is None or cut.op_type not in ("Slice", "Split"):
        return None
    # the projection output is (B, S, width) when the graph does not record its rank
    rank = 3 if cut.inputs[0] is None or cut.inputs[0].shape is None else len(cut.inputs[0].shape)
    if cut.op_type == "Split":
        axis = cut.attributes.get_int("axis", 0)
        sizes = constant_array(cut.inputs[1]) if len(cut.inputs) > 1 else None
        if sizes is None and "split" in cut.attributes:
            sizes = np.asarray(cut.attributes.get_ints("split"))
        if sizes is None or axis not in (-1, rank - 1):
            return None
        return int(sizes.reshape(-1)[list(cut.outputs).index(data)])
    starts, ends = constant_array(cut.inputs[1]), constant_array(cut.inputs[2])
    axes = constant_array(cut.inputs[3]) if len(cut.inputs) > 3 else None
    if starts is None or ends is None or starts.size != 1 or (axes is not None and axes.size != 1):
        return None
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    if axis not in (-1, rank - 1):
        return None
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    if projection_width is not None:
        start, end = (x + projection_width if x < 0 else min(x, projection_width) for x in (start, end))
    return end - start if 0 <= start < end < 2**31 else None


def _num_heads(
    probs: ir.Value, score_matmul: ir.Node, softmax: ir.Node, past_key: ir.Value | None
) -> tuple[int | None, str]:
    """Query heads H and where they were read (DESIGN.md §4 "locate")."""
    for v in (softmax.outputs[0], probs, score_matmul.outputs[0], score_matmul.inputs[0]):
        h = static_dim(v, 1)
        if h is not None and (v.shape is not None and len(v.shape) == 4):
            return h, f"dim 1 of {v.name!r}"
    h = _reshape_heads(score_matmul.inputs[0])
    if h is not None:
        return h, "the Q Reshape target"
    # Optimum / TorchScript build the Q Reshape target at run time: Q projection width / hd.
    head_dim = static_dim(past_key, 3)
    width = _q_width(score_matmul.inputs[0])
    fused = _fused_q_width(score_matmul.inputs[0], width)  # Q cut from a fused q/k/v projection
    if head_dim and fused and fused % head_dim == 0:
        return fused // head_dim, f"Q slice width {fused} of a fused q/k/v projection / head dim {head_dim}"
    if head_dim and width and width % head_dim == 0:
        return width // head_dim, f"Q projection width {width} / head dim {head_dim} of {past_key.name!r}"  # type: ignore[union-attr]
    return None, "not found (no static dim 1, no constant Q Reshape target, no Q projection width)"


def check_softmax(softmax: ir.Node) -> LayerMatch | str:
    """Read one attention layer around ``softmax``; a reason string when it does not match."""
    axis = softmax.attributes.get_int("axis", -1)
    rank = None if softmax.inputs[0] is None or softmax.inputs[0].shape is None else len(softmax.inputs[0].shape)
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"Softmax axis is {axis}, expected the last axis (-1)"
    followed = _follow_probs(softmax)
    if isinstance(followed, str):
        return followed
    pv_matmul, probs, path = followed
    score_matmul = _find_score_matmul(softmax)
    if score_matmul is None:
        return "no score MatMul (Q @ K^T) before it through Add/Mul/Div/Where/Cast"
    key = nearest_input(score_matmul.inputs[1], PAST_KEY_RE)
    if key is None:
        return (
            "the K operand of its score MatMul reaches no graph input named "
            "past_key_values.{i}.key (the layer index is read from it)"
        )
    layer, key_name = key
    value = nearest_input(pv_matmul.inputs[1], PAST_VALUE_RE)
    if value is not None and value[0] != layer:
        return f"K comes from {key_name} (layer {layer}) but V from {value[1]} (layer {value[0]})"
    residual = find_residual(pv_matmul)
    if isinstance(residual, str):
        return f"layer {layer}: residual stream not found: {residual}"
    residual_add, residual_value = residual
    dtype = resolve_dtype(probs)
    graph_inputs = softmax.graph.inputs if softmax.graph is not None else []
    past_key = next((v for v in graph_inputs if v.name == key_name), None)
    num_heads, num_heads_source = _num_heads(probs, score_matmul, softmax, past_key)
    return LayerMatch(
        layer=layer,
        softmax=softmax,
        probs=probs,
        pv_matmul=pv_matmul,
        score_matmul=score_matmul,
        residual=residual_value,
        residual_add=residual_add,
        num_heads=num_heads,
        probs_dtype=dtype,
        probs_fp16=dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16),
        probs_path=path,
        layer_source=key_name,
        num_heads_source=num_heads_source,
    )


def _fused_attention_error(model: ir.Model, fused: list[ir.Node]) -> GraphPatternError:
    lines = []
    for node in fused:
        layer = None
        for inp in node.inputs:
            hit = nearest_input(inp, PAST_KEY_RE)
            if hit is not None and (layer is None or hit[0] > layer):
                layer = hit[0]  # the past key closest to this op is an input of it
        direct = [
            int(m.group(1))
            for inp in node.inputs
            if inp is not None and inp.name and (m := PAST_KEY_RE.match(inp.name))
        ]
        if direct:
            layer = direct[0]
        where = f"layer {layer}" if layer is not None else "layer unknown"
        domain = node.domain or "ai.onnx"
        lines.append(f"  {where}: {domain}::{node.op_type} (node {node.name!r})")
    onnx_attention = all((n.domain or "ai.onnx") == "ai.onnx" and n.op_type == "Attention" for n in fused)
    fix = (
        "\nThese are ONNX Attention ops (opset 23): the fused formulation handles them without "
        "unfusing, var_export.passes.fused_var.apply_fused_var (same contract as apply_var). Or re-export "
        "with eager attention (`var-export export`) for passes.pipeline.apply_var."
        if onnx_attention
        else "\nExpected an unfused attention (MatMul -> Softmax -> MatMul). Re-export without "
        "fused attention (eager attention, opset < 23, no ORT attention fusion), e.g. "
        "`var-export export` of this project."
        + ("\ncom.microsoft::GroupQueryAttention is unfused on the VAR layers by `var-export rewrite` "
           "(var_export.passes.unfuse_contrib.normalize_contrib); check --layers."
           if any(n.op_type == "GroupQueryAttention" for n in fused) else "")
    )
    return GraphPatternError(
        "fused attention ops hide the attention probabilities that VAR rewrites:\n"
        + "\n".join(lines)
        + fix
    )


def format_rejected(rejected: list[tuple[str, str]]) -> str:
    """One ``\n  Softmax 'name': why`` line per rejected candidate."""
    return "".join(f"\n  Softmax {name!r}: {why}" for name, why in rejected)


def locate_layers(model: ir.Model) -> LocateResult:
    """All decoder attention layers of ``model``, sorted by layer index.

    Raises GraphPatternError for fused attention ops when no unfused layer is found, for none
    found, or for two Softmax nodes claiming the same layer. Fused attention ops beside unfused
    layers (``passes.unfuse_contrib`` unfuses only the VAR layers) are listed in ``rejected``.
    """
    graph = model.graph
    fused = [n for n in graph if (n.domain or "", n.op_type) in FUSED_ATTENTION_OPS]
    matches: list[LayerMatch] = []
    rejected: list[tuple[str, str]] = []
    softmaxes = [n for n in graph if n.op_type == "Softmax" and not is_var_node(n)]
    for softmax in softmaxes:
        result = check_softmax(softmax)
        if isinstance(result, str):
            rejected.append((softmax.name or "<unnamed>", result))
        else:
            matches.append(result)
    if fused and not matches:
        raise _fused_attention_error(model, fused)
    for node in fused:  # a graph unfused on some layers only (passes.unfuse_contrib)
        rejected.append((node.name or "<unnamed>", f"{node.domain or 'ai.onnx'}::{node.op_type}: fused "
                         "attention, left as it is"))
    if not matches:
        past = [v.name for v in graph.inputs if v.name and PAST_KEY_RE.match(v.name)]
        searched = (
            "Searched: Softmax nodes whose output feeds MatMul(probs, V) (through "
            "Cast/Where/IsNaN guards) and whose score MatMul's K operand comes from a "
            "past_key_values.{i}.key graph input; fused Attention / MultiHeadAttention / "
            "GroupQueryAttention ops."
        )
        found = (
            f"Found: {len(softmaxes)} Softmax node(s), 0 fused attention ops, "
            f"past key inputs: {past or 'none'}."
        )
        raise GraphPatternError(
            f"no decoder attention layer found in graph {graph.name!r}. {searched} {found}"
            f"{format_rejected(rejected)}\n"
            "Expected a decoder exported with eager attention and a KV cache "
            "(inputs past_key_values.{i}.key/value); export it with `var-export export`."
        )
    by_layer: dict[int, LayerMatch] = {}
    for m in matches:
        if m.layer in by_layer:
            raise GraphPatternError(
                f"two Softmax nodes ({by_layer[m.layer].softmax.name!r}, {m.softmax.name!r}) both "
                f"read keys from {m.layer_source}; expected one attention per layer."
            )
        by_layer[m.layer] = m
    return LocateResult(matches=[by_layer[i] for i in sorted(by_layer)], rejected=rejected)
