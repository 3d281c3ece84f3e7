"""Small onnx-ir helpers shared by the VAR passes (names, constants, node building).

Every value and node the passes add is named ``var/...`` (docs/ARCHITECTURE.md,
"Naming inside VAR graphs"); the passes find each other's results by those names,
so each pass can run alone on a graph that already has the earlier passes applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from var_export.core.contract import (  # noqa: F401  (re-exported for the passes)
    APPLIED_KEY,
    ATTENTION_MASK,
    PAST_SINK_MASK,
    PRESENT_SINK_MASK,
    VAR_PREFIX,
    VISUAL_MASK,
)

SETTINGS_KEY = "var_export.settings"  # metadata: VarSettings as JSON
LAYERS_KEY = "var_export.var_layers"  # metadata: JSON list of VAR layers
HEADS_KEY = "var_export.heads"  # metadata: JSON list of [layer, head] (static/hybrid)

INT64_MAX = np.iinfo(np.int64).max


def is_var_node(node: ir.Node) -> bool:
    return bool(node.name) and node.name.startswith(VAR_PREFIX)


def layer_value_name(layer: int, what: str) -> str:
    """``var/L3/sink`` — the per-layer values the passes hand to each other."""
    return f"{VAR_PREFIX}L{layer}/{what}"


def value_map(graph: ir.Graph) -> dict[str, ir.Value]:
    """All named values of the top graph: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {}
    for v in graph.inputs:
        if v.name:
            values[v.name] = v
    for name, v in graph.initializers.items():
        values[name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                values[v.name] = v
    return values


def graph_input(graph: ir.Graph, name: str) -> ir.Value | None:
    for v in graph.inputs:
        if v.name == name:
            return v
    return None


def graph_output(graph: ir.Graph, name: str) -> ir.Value | None:
    for v in graph.outputs:
        if v.name == name:
            return v
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of a small constant (initializer or Constant node), else None.

    Only used on shape-sized tensors (Reshape targets); never on weights.
    """
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            if attr is not None:
                tensor = attr.as_tensor()
            else:
                for key in ("value_ints", "value_int"):
                    if key in producer.attributes:
                        return np.asarray(producer.attributes[key].value, dtype=np.int64)
    if tensor is None or tensor.size > 64:
        return None
    return tensor.numpy()


class Builder:
    """Appends ``var/``-named nodes to a graph; ``sort()`` restores topological order."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix.rstrip("/")
        self._counter = 0
        self._taken = {n.name for n in graph if n.name} | set(value_map(graph))

    def _fresh(self, name: str) -> str:
        full = f"{self.prefix}/{name}"
        candidate, i = full, 1
        while candidate in self._taken:
            candidate = f"{full}_{i}"
            i += 1
        self._taken.add(candidate)
        return candidate

    def const(self, name: str, array: Any, dtype: Any = None) -> ir.Value:
        """A small initializer named ``<prefix>/<name>``."""
        arr = np.asarray(array, dtype=dtype)
        value = ir.Value(name=self._fresh(name), const_value=ir.tensor(arr, name=None))
        value.const_value.name = value.name  # type: ignore[union-attr]
        value.shape = ir.Shape(arr.shape)
        value.dtype = ir.DataType.from_numpy(arr.dtype)
        self.graph.register_initializer(value)
        return value

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        name: str,
        attributes: dict[str, Any] | None = None,
        *,
        dtype: ir.DataType | None = None,
    ) -> ir.Value:
        """Append one node with a single output named ``<prefix>/<name>``."""
        out_name = self._fresh(name)
        node = ir.node(op_type, list(inputs), attributes or {}, name=out_name)
        node.outputs[0].name = out_name
        if dtype is not None:
            node.outputs[0].dtype = dtype
        self.graph.append(node)
        return node.outputs[0]


def cast(b: Builder, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
    from var_export.passes.locate import resolve_dtype

    if resolve_dtype(value) == to:
        return value
    return b.op("Cast", [value], name, {"to": to}, dtype=to)


def opset(graph: ir.Graph) -> int:
    return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 18)))


def shape(b: Builder, x: ir.Value, start: int, end: int, name: str) -> ir.Value:
    """``Shape(x)[start:end]`` (1-D int64): Shape's start/end are opset 15+; Shape then Slice below."""
    if opset(b.graph) >= 15:
        return b.op("Shape", [x], name, {"start": start, "end": end}, dtype=ir.DataType.INT64)
    full = b.op("Shape", [x], f"{name}_full", dtype=ir.DataType.INT64)
    bounds = [b.const(f"{name}_{what}", [v], np.int64) for what, v in (("start", start), ("end", end), ("axis", 0))]
    return b.op("Slice", [full, *bounds], name, dtype=ir.DataType.INT64)


def reduce(
    b: Builder, op_type: str, x: ir.Value, axes: Sequence[int], name: str, *, keepdims: bool
) -> ir.Value:
    """Reduce* with ``axes`` as an input (ReduceSum >= 13, others >= 18) or an attribute."""
    axes_as_input = opset(b.graph) >= (13 if op_type == "ReduceSum" else 18)
    keep = {"keepdims": int(keepdims)}
    if axes_as_input:
        return b.op(op_type, [x, b.const(f"{name}_axes", list(axes), np.int64)], name, keep)
    return b.op(op_type, [x], name, {**keep, "axes": list(axes)})


def unsqueeze(b: Builder, x: ir.Value, axes: Sequence[int], name: str) -> ir.Value:
    if opset(b.graph) >= 13:
        return b.op("Unsqueeze", [x, b.const(f"{name}_axes", list(axes), np.int64)], name)
    return b.op("Unsqueeze", [x], name, {"axes": list(axes)})


def squeeze(b: Builder, x: ir.Value, axes: Sequence[int], name: str) -> ir.Value:
    if opset(b.graph) >= 13:
        return b.op("Squeeze", [x, b.const(f"{name}_axes", list(axes), np.int64)], name)
    return b.op("Squeeze", [x], name, {"axes": list(axes)})


def shared(b: Builder, name: str) -> ir.Value | None:
    """A value an earlier VAR pass already made (``var/<name>``), if any."""
    return value_map(b.graph).get(f"{VAR_PREFIX}{name}")
