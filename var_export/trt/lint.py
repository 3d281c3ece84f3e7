"""The hand-written TensorRT lint: a list of small rules over an ONNX graph, no TensorRT needed.

It is the fallback when no TensorRT is importable; with one, the real parser is the
authority (:mod:`var_export.trt.parser`) and a test shows both agree on the project's graphs.

Each rule is a function ``GraphFacts -> Iterable[LintFinding]``; :data:`RULES` lists them in
report order. :class:`GraphFacts` is read once (weights stay on disk) and shared by the rules:

- ``opset``: an opset newer than the parser this lint knows (warning);
- ``unsupported-op``, ``custom-domain-op``, ``recent-op``: op types the TensorRT ONNX parser
  does not implement, non-standard domains (``com.microsoft``), opset-23 ops only recent
  parsers implement;
- ``var-forbidden-op`` / ``data-dependent-shape``: ops with value-dependent shapes or control
  flow (anywhere), and in the VAR nodes (``var/...``) anything outside DESIGN.md §3's static set;
- ``attention-head-dim``: an ``Attention`` whose Q, K and V head sizes differ (TensorRT's
  IAttention requires one head size);
- ``bool-io``, ``int64``, ``io-dtype``, ``unknown-rank``, ``dynamic-input``, ``external-data``:
  graph I/O facts that need care when binding buffers and building profiles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import onnx

from var_export.core.contract import DECODER, VAR_PREFIX
from var_export.core.errors import BundleError, TensorRTLintError, VarExportError  # noqa: F401

log = logging.getLogger(__name__)

# The newest opset of the parser the op list below was taken from (onnx-tensorrt
# docs/operators.md, TensorRT 10: "opset 9 to opset 20"). Newer parsers accept more; a newer
# opset is a warning, not an error.
MAX_PARSER_OPSET = 20

# Ops the TensorRT 10 ONNX parser implements (onnx-tensorrt docs/operators.md, "Supported: Y").
TRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
    EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization
    LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
    Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Opset-23+ ops that only recent TensorRT 10.x parsers implement.
TRT_RECENT_OPS: frozenset[str] = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding"})

# Ops whose output shape depends on tensor *values*, or control flow: an error anywhere (the
# engine would need data-dependent-shape allocators / cannot be captured in a CUDA graph).
DATA_DEPENDENT_OPS: frozenset[str] = frozenset(
    {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "If", "Scan"}
)

# Inside the VAR nodes, also these (DESIGN.md §3: static, data-independent shapes only).
VAR_FORBIDDEN_OPS: frozenset[str] = DATA_DEPENDENT_OPS | frozenset(
    {"ScatterND", "ScatterElements", "Scatter", "GatherND", "TopK", "Range"}
)

SEVERITIES = ("error", "warning", "info")

Shape = list[int | str | None]


# ---------------------------------------------------------------------------------------------
# Findings and the report


@dataclasses.dataclass(frozen=True)
class LintFinding:
    """One thing the TensorRT parser/builder would reject (error) or that needs care."""

    severity: str  # "error" | "warning" | "info"
    code: str  # short stable id, e.g. "unsupported-op", "data-dependent-shape"
    message: str  # what was found and where
    fix: str  # what to do about it
    nodes: tuple[str, ...] = ()  # ONNX node names concerned (for comparing lints)

    def __str__(self) -> str:
        return f"{self.severity}: [{self.code}] {self.message} -> {self.fix}"


@dataclasses.dataclass
class LintReport:
    """The result of a lint: the hand rules, or the real parser (``authority``)."""

    source: str  # path of the graph, or "<in-memory model>"
    opset: int | None
    op_counts: dict[str, int]  # op type -> number of nodes (subgraphs included)
    dynamic_inputs: dict[str, Shape]  # input -> shape, for inputs with dynamic axes
    findings: list[LintFinding] = dataclasses.field(default_factory=list)
    authority: str = "var-export hand lint"  # or "tensorrt_rtx 1.7.1.116 ONNX parser" ...

    @property
    def errors(self) -> list[LintFinding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[LintFinding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing would stop the TensorRT parser/builder."""
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def error_nodes(self) -> set[str]:
        """Names of the ONNX nodes the errors point at."""
        return {n for f in self.errors for n in f.nodes}

    def format(self) -> str:
        head = (
            f"TensorRT lint of {self.source} ({self.authority}): {len(self.errors)} error(s), "
            f"{len(self.warnings)} warning(s), opset {self.opset}, "
            f"{sum(self.op_counts.values())} nodes"
        )
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def raise_if_errors(self) -> None:
        if self.errors:
            raise TensorRTLintError(self)


# ---------------------------------------------------------------------------------------------
# Graph facts, read once


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk_nodes(g)


def shape_of(vi: onnx.ValueInfoProto) -> Shape | None:
    """A value's shape: int (static), str (symbolic) or None (unknown) per axis; None: no rank."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims: Shape = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def elem_type(vi: onnx.ValueInfoProto) -> int:
    return int(vi.type.tensor_type.elem_type)


def node_key(node: onnx.NodeProto) -> str:
    """``Op`` for the standard domain, ``domain::Op`` otherwise."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed {node.op_type}>"


def load_graph(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The proto (weights stay on disk) and a printable source; a bundle dir gives its decoder."""
    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory model>"
    path = Path(model)
    if path.is_dir():
        path = path / DECODER
    if not path.is_file():
        raise BundleError(
            f"expected an ONNX file (or a bundle directory with {DECODER}); found nothing "
            f"at {path}. Check the path; write a bundle with `var-export export`."
        )
    try:
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise BundleError(
            f"expected an ONNX model in {path}; it could not be read ({type(exc).__name__}: "
            f"{exc}). Re-export the graph."
        ) from exc


@dataclasses.dataclass
class GraphFacts:
    """What the rules read: the proto, its nodes (subgraphs included), I/O and known shapes."""

    model: onnx.ModelProto
    source: str
    max_opset: int

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.nodes: list[onnx.NodeProto] = list(_walk_nodes(graph))
        self.opset: int | None = next(
            (int(i.version) for i in self.model.opset_import if i.domain in ("", "ai.onnx")), None
        )
        init = {t.name for t in graph.initializer}
        self.inputs = [vi for vi in graph.input if vi.name not in init]
        self.io = [*self.inputs, *graph.output]
        self.value_info = {
            vi.name: vi for vi in [*graph.value_info, *graph.input, *graph.output]
        }
        self.initializers = {t.name: t for t in graph.initializer}

    @property
    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node_key(node)] = counts.get(node_key(node), 0) + 1
        return counts

    @property
    def dynamic_inputs(self) -> dict[str, Shape]:
        out: dict[str, Shape] = {}
        for vi in self.inputs:
            shape = shape_of(vi)
            if shape is not None and any(not isinstance(d, int) for d in shape):
                out[vi.name] = shape
        return out

    def shape(self, value: str) -> Shape | None:
        if value in self.value_info:
            return shape_of(self.value_info[value])
        if value in self.initializers:
            return list(self.initializers[value].dims)
        return None


def _names(nodes: Sequence[str]) -> str:
    shown = ", ".join(nodes[:3])
    return shown + (f" (+{len(nodes) - 3} more)" if len(nodes) > 3 else "")


def _by_op(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for node in nodes:
        grouped.setdefault(node_key(node), []).append(node_label(node))
    return dict(sorted(grouped.items()))


# ---------------------------------------------------------------------------------------------
# Rules

Rule = Callable[[GraphFacts], Iterable[LintFinding]]


def rule_opset(facts: GraphFacts) -> Iterator[LintFinding]:
    if facts.opset is not None and facts.opset > facts.max_opset:
        yield LintFinding(
            "warning",
            "opset",
            f"the graph uses opset {facts.opset}; the TensorRT parser this lint knows covers "
            f"opsets up to {facts.max_opset}",
            f"use a TensorRT release whose parser supports opset {facts.opset}, or re-export "
            f"with `var-export export --opset {facts.max_opset}`",
        )


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def rule_unsupported_ops(facts: GraphFacts) -> Iterator[LintFinding]:
    bad = [
        n for n in facts.nodes
        if _standard(n) and n.op_type not in TRT_SUPPORTED_OPS | TRT_RECENT_OPS
    ]
    for op, where in _by_op(bad).items():
        yield LintFinding(
            "error",
            "unsupported-op",
            f"{len(where)} {op} node(s) ({_names(where)}): the TensorRT ONNX parser has no {op}",
            f"rewrite {op} with supported ops before export, or provide a TensorRT plugin",
            tuple(where),
        )


def rule_custom_domain(facts: GraphFacts) -> Iterator[LintFinding]:
    for op, where in _by_op(n for n in facts.nodes if not _standard(n)).items():
        if op.endswith("VarAttention"):
            yield LintFinding(
                "error", "custom-domain-op",
                f"{len(where)} {op} node(s) ({_names(where)}): the kernel formulation's ONNX Runtime CPU custom op",
                "rebuild with --formulation fused-qk (or naive): TensorRT has no VarAttention plugin",
                tuple(where),
            )
            continue
        yield LintFinding(
            "error",
            "custom-domain-op",
            f"{len(where)} {op} node(s) ({_names(where)}): a non-standard op domain",
            "export without ONNX Runtime contrib fusions (plain ONNX ops), or provide a "
            "TensorRT plugin; fused attention hides the probabilities VAR needs anyway",
            tuple(where),
        )


def rule_recent_ops(facts: GraphFacts) -> Iterator[LintFinding]:
    recent = (n for n in facts.nodes if _standard(n) and n.op_type in TRT_RECENT_OPS)
    for op, where in _by_op(recent).items():
        yield LintFinding(
            "warning",
            "recent-op",
            f"{len(where)} {op} node(s) ({_names(where)}): only recent TensorRT 10.x parsers "
            f"implement {op}",
            "check docs/operators.md of your TensorRT version, or export at opset <= 22",
        )


def rule_var_forbidden(facts: GraphFacts) -> Iterator[LintFinding]:
    var = (
        n for n in facts.nodes if n.name.startswith(VAR_PREFIX) and n.op_type in VAR_FORBIDDEN_OPS
    )
    for op, where in _by_op(var).items():
        yield LintFinding(
            "error",
            "var-forbidden-op",
            f"{len(where)} {op} node(s) in the VAR nodes ({_names(where)}): VAR must use only "
            "static, data-independent shapes (DESIGN.md §3)",
            "this is a bug in the VAR passes (passes/); rebuild the bundle with a fixed "
            "var-export and report it",
            tuple(where),
        )


def rule_data_dependent(facts: GraphFacts) -> Iterator[LintFinding]:
    dd = (
        n for n in facts.nodes
        if n.op_type in DATA_DEPENDENT_OPS and not n.name.startswith(VAR_PREFIX)
    )
    for op, where in _by_op(dd).items():
        yield LintFinding(
            "error",
            "data-dependent-shape",
            f"{len(where)} {op} node(s) ({_names(where)}): the output shape depends on tensor "
            "values (or control flow), which TensorRT engines and CUDA graphs cannot plan for",
            "fold it away before export (constant-fold, or express it with static-shape ops "
            "such as Where / masks)",
            tuple(where),
        )


def _head_size(facts: GraphFacts, node: onnx.NodeProto, index: int, heads_attr: str) -> int | None:
    """Last-axis head size of an Attention input: 4-D (B, H, S, hd), or 3-D with *_num_heads."""
    if index >= len(node.input) or not node.input[index]:
        return None
    shape = facts.shape(node.input[index])
    if not shape or not isinstance(shape[-1], int):
        return None
    if len(shape) == 4:
        return shape[-1]
    heads = next((a.i for a in node.attribute if a.name == heads_attr), 0)
    return shape[-1] // heads if len(shape) == 3 and heads else None


def rule_attention_head_dim(facts: GraphFacts) -> Iterator[LintFinding]:
    bad: list[str] = []
    sizes: list[str] = []
    for node in facts.nodes:
        if not (_standard(node) and node.op_type == "Attention"):
            continue
        q = _head_size(facts, node, 0, "q_num_heads")
        k = _head_size(facts, node, 1, "kv_num_heads")
        v = _head_size(facts, node, 2, "kv_num_heads")
        known = [s for s in (q, k, v) if s is not None]
        if len(set(known)) > 1:
            bad.append(node_label(node))
            sizes.append(f"{node_label(node)}: Q {q}, K {k}, V {v}")
    if bad:
        yield LintFinding(
            "error",
            "attention-head-dim",
            f"{len(bad)} Attention node(s) with different Q/K/V head sizes ({_names(sizes)}): "
            "TensorRT's attention layer needs one head size for Q, K and V",
            "compute that product with MatMul/Softmax (unfused) or pad V to the Q/K head size",
            tuple(bad),
        )


def rule_bool_io(facts: GraphFacts) -> Iterator[LintFinding]:
    names = [vi.name for vi in facts.io if elem_type(vi) == onnx.TensorProto.BOOL]
    if names:
        yield LintFinding(
            "info",
            "bool-io",
            f"bool graph I/O: {', '.join(names)}",
            "TensorRT >= 8.6 binds bool I/O (kBOOL, 1 byte per element): give it numpy bool / "
            "torch.bool buffers, not int32",
        )


def rule_int64(facts: GraphFacts) -> Iterator[LintFinding]:
    names = [vi.name for vi in facts.io if elem_type(vi) == onnx.TensorProto.INT64]
    n_init = sum(1 for t in facts.initializers.values() if t.data_type == onnx.TensorProto.INT64)
    if names or n_init:
        yield LintFinding(
            "warning",
            "int64",
            f"int64 graph I/O ({', '.join(names) or 'none'}) and {n_init} int64 initializer(s)",
            "use TensorRT >= 10 (native INT64); older parsers cast INT64 to INT32 and clamp",
        )


def rule_io_dtype(facts: GraphFacts) -> Iterator[LintFinding]:
    for vi in facts.io:
        if elem_type(vi) in (onnx.TensorProto.DOUBLE, onnx.TensorProto.STRING):
            yield LintFinding(
                "error",
                "io-dtype",
                f"graph I/O {vi.name} has type {onnx.TensorProto.DataType.Name(elem_type(vi))}",
                "export with float32/float16 I/O",
            )


def rule_unknown_rank(facts: GraphFacts) -> Iterator[LintFinding]:
    for vi in facts.inputs:
        if shape_of(vi) is None:
            yield LintFinding(
                "error",
                "unknown-rank",
                f"input {vi.name} has no shape (unknown rank)",
                "export with a known rank (TensorRT needs ranks at parse time)",
            )


def rule_dynamic_inputs(facts: GraphFacts) -> Iterator[LintFinding]:
    dynamic = facts.dynamic_inputs
    if dynamic:
        listed = ", ".join(f"{n}{d}" for n, d in dynamic.items())
        yield LintFinding(
            "info",
            "dynamic-input",
            f"{len(dynamic)} input(s) with dynamic axes need optimization profiles: {listed}",
            "build_engine / `var-export build-trt` makes them from the bundle manifest and "
            "--max-batch / --max-seq / --max-past (see make_profiles)",
        )


def rule_external_data(facts: GraphFacts) -> Iterator[LintFinding]:
    external = [
        t for t in facts.initializers.values() if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        files = sorted({e.value for t in external for e in t.external_data if e.key == "location"})
        yield LintFinding(
            "warning",
            "external-data",
            f"{len(external)} initializer(s) in external data ({', '.join(files)})",
            "keep the data file(s) beside the .onnx and parse with parse_from_file (build_engine "
            "does), not from bytes",
        )


RULES: tuple[Rule, ...] = (
    rule_opset,
    rule_unsupported_ops,
    rule_custom_domain,
    rule_recent_ops,
    rule_var_forbidden,
    rule_data_dependent,
    rule_attention_head_dim,
    rule_bool_io,
    rule_int64,
    rule_io_dtype,
    rule_unknown_rank,
    rule_dynamic_inputs,
    rule_external_data,
)


def lint_for_tensorrt(
    model_path_or_proto: str | os.PathLike[str] | onnx.ModelProto,
    *,
    max_opset: int = MAX_PARSER_OPSET,
    rules: Sequence[Rule] = RULES,
) -> LintReport:
    """Check an ONNX graph against what the TensorRT ONNX parser accepts, without TensorRT.

    ``model_path_or_proto``: an ``.onnx`` path, a bundle directory (its decoder is linted) or a
    ``ModelProto``. External weights are not loaded. Returns a :class:`LintReport`; its
    ``ok`` is False when an error finding would stop the parse or the build.
    """
    model, source = load_graph(model_path_or_proto)
    facts = GraphFacts(model, source, max_opset)
    findings = [f for rule in rules for f in rule(facts)]
    report = LintReport(
        source=source,
        opset=facts.opset,
        op_counts=facts.op_counts,
        dynamic_inputs=facts.dynamic_inputs,
        findings=findings,
    )
    log.debug("%s", report.format())
    return report
