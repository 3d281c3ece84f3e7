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
    """Appends ``var/``-named nodes to a graph; ``sort()`` restores topological order.

    With a ``var/`` prefix nothing is built twice: ``op`` returns the output of an existing
    node with the same op, inputs and attributes (a Cast of the probabilities that another
    pass already made, ...), and ``const`` returns an existing ``var/`` initializer with the
    same dtype, shape and content. VAR graphs stay free of duplicate subexpressions by
    construction. Other prefixes (pre-passes such as ``unfuse_contrib``) always add.
    """

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix.rstrip("/")
        self.reuse = f"{self.prefix}/".startswith(VAR_PREFIX)
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
        """A small initializer named ``<prefix>/<name>`` (an equal ``var/`` one is reused)."""
        arr = np.asarray(array, dtype=dtype)
        existing = _equal_initializer(self.graph, arr) if self.reuse else None
        if existing is not None:
            return existing
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
        """One node with a single output named ``<prefix>/<name>`` (or the equal node's output)."""
        return self.ops(op_type, inputs, [name], attributes, dtype=dtype)[0]

    def ops(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        names: Sequence[str],
        attributes: dict[str, Any] | None = None,
        *,
        dtype: ir.DataType | None = None,
    ) -> list[ir.Value]:
        """One node with ``len(names)`` outputs (Split), unless an equal node exists."""
        node = ir.node(op_type, list(inputs), attributes or {}, num_outputs=len(names))
        twin = _equal_node(self.graph, node) if self.reuse else None
        if twin is not None:
            return list(twin.outputs)
        node.name = self._fresh(names[0])
        for i, (out, name) in enumerate(zip(node.outputs, names)):
            out.name = node.name if i == 0 else self._fresh(name)
            if dtype is not None:
                out.dtype = dtype
        self.graph.append(node)
        return list(node.outputs)


def _attr_key(node: ir.Node) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))


def _equal_node(graph: ir.Graph, node: ir.Node) -> ir.Node | None:
    """A node of ``graph`` with the same op, domain, inputs, attributes and output count;
    ``node`` (not yet in the graph) is detached from its inputs when one is found."""
    first = next((v for v in node.inputs if v is not None), None)
    if first is None:
        return None
    key = (node.domain, node.op_type, len(node.outputs), _attr_key(node))
    for other in first.consumers():
        if other is node or other.graph is not graph or len(other.inputs) != len(node.inputs):
            continue
        if (other.domain, other.op_type, len(other.outputs), _attr_key(other)) != key:
            continue
        if all(a is b for a, b in zip(other.inputs, node.inputs)):
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)
            return other
    return None


def _equal_initializer(graph: ir.Graph, arr: np.ndarray) -> ir.Value | None:
    """A ``var/`` initializer with the same dtype, shape and content as ``arr`` (small ones)."""
    if arr.size > 4096:
        return None
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if not name.startswith(VAR_PREFIX) or tensor is None or tensor.size != arr.size:
            continue
        held = tensor.numpy()
        if held.dtype == arr.dtype and held.shape == arr.shape and np.array_equal(held, arr):
            return value
    return None


def resolve_dtype(value: ir.Value | None, depth: int = 0) -> ir.DataType:
    """The element type of ``value``; walks Cast/Where/Softmax when the graph has no value_info."""
    if value is None or depth > 32:
        return ir.DataType.FLOAT
    if value.dtype is not None:
        return value.dtype
    producer = value.producer()
    if producer is None:
        return ir.DataType.FLOAT
    if producer.op_type == "Cast":
        return ir.DataType(producer.attributes.get_int("to", int(ir.DataType.FLOAT)))
    if producer.op_type == "Where":
        return resolve_dtype(producer.inputs[2], depth + 1)
    return resolve_dtype(producer.inputs[0], depth + 1)


def cast(b: Builder, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
    """``value`` as ``to`` (itself when it already is; an existing Cast is reused)."""
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
