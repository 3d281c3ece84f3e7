"""TensorRT: a preflight lint that needs no TensorRT, and the engine build (optional extra).

:func:`lint_for_tensorrt` reads an ONNX graph (weights stay on disk) and reports what the
TensorRT ONNX parser would reject or what needs care:

- op types the parser does not implement, custom-domain ops (``com.microsoft``), an opset
  newer than the parser's;
- data-dependent shapes (``NonZero``, ``Unique``, ``Loop``, ``If`` ...) anywhere, and in the
  VAR nodes (named ``var/...``) anything outside DESIGN.md §3's static op set (no ``ScatterND``,
  no ``NonZero``, no ``Loop``/``If``): VAR must stay CUDA-graph friendly;
- bool and int64 graph I/O (supported by TensorRT >= 8.6 and >= 10 respectively: reported),
- dynamic input axes (each needs an optimization profile; listed),
- external data (the ``.data`` file must stay beside the ``.onnx``).

:func:`build_engine` builds a serialized engine (``.plan``) with the ``tensorrt`` Python API
(``pip install var-export[trt]`` on a machine with an NVIDIA GPU). Its optimization profiles
come from :func:`make_profiles`, a pure function over the graph's input shapes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from var_export.core.contract import DECODER, VAR_PREFIX
from var_export.core.errors import (
    BundleError,
    ConfigError,
    TensorRTLintError,
    TensorRTUnavailableError,
    VarExportError,
)

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


# ---------------------------------------------------------------------------------------------
# Lint


@dataclasses.dataclass(frozen=True)
class LintFinding:
    """One thing the TensorRT parser/builder would reject (error) or that needs care."""

    severity: str  # "error" | "warning" | "info"
    code: str  # short stable id, e.g. "unsupported-op", "data-dependent-shape"
    message: str  # what was found and where
    fix: str  # what to do about it

    def __str__(self) -> str:
        return f"{self.severity}: [{self.code}] {self.message} -> {self.fix}"


@dataclasses.dataclass
class LintReport:
    """The result of :func:`lint_for_tensorrt`."""

    source: str  # path of the graph, or "<in-memory model>"
    opset: int | None
    op_counts: dict[str, int]  # op type -> number of nodes (subgraphs included)
    dynamic_inputs: dict[str, list[int | str | None]]  # input -> shape, for inputs with dynamic axes
    findings: list[LintFinding] = dataclasses.field(default_factory=list)

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

    def format(self) -> str:
        head = (
            f"TensorRT lint of {self.source}: {len(self.errors)} error(s), "
            f"{len(self.warnings)} warning(s), opset {self.opset}, "
            f"{sum(self.op_counts.values())} nodes"
        )
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def raise_if_errors(self) -> None:
        if self.errors:
            raise TensorRTLintError(self)


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


def _shape_of(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return int(vi.type.tensor_type.elem_type)


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
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
        # Weights stay on disk: the lint needs structure only.
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise BundleError(
            f"expected an ONNX model in {path}; it could not be read ({type(exc).__name__}: "
            f"{exc}). Re-export the graph."
        ) from exc


def lint_for_tensorrt(
    model_path_or_proto: str | os.PathLike[str] | onnx.ModelProto,
    *,
    max_opset: int = MAX_PARSER_OPSET,
) -> LintReport:
    """Check an ONNX graph against what the TensorRT ONNX parser accepts, without TensorRT.

    ``model_path_or_proto``: an ``.onnx`` path, a bundle directory (its decoder is linted) or a
    ``ModelProto``. External weights are not loaded. Returns a :class:`LintReport`; its
    ``ok`` is False when an error finding would stop the parse or the build.
    """
    model, source = _load(model_path_or_proto)
    graph = model.graph
    findings: list[LintFinding] = []

    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    if opset is not None and opset > max_opset:
        findings.append(
            LintFinding(
                "warning",
                "opset",
                f"the graph uses opset {opset}; the TensorRT parser this lint knows covers "
                f"opsets up to {max_opset}",
                f"use a TensorRT release whose parser supports opset {opset}, or re-export with "
                f"`var-export export --opset {max_opset}`",
            )
        )

    op_counts: dict[str, int] = {}
    unsupported: dict[str, list[str]] = {}
    recent: dict[str, list[str]] = {}
    custom: dict[str, list[str]] = {}
    data_dependent: dict[str, list[str]] = {}
    var_forbidden: dict[str, list[str]] = {}
    for node in _walk_nodes(graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        op_counts[key] = op_counts.get(key, 0) + 1
        where = node.name or f"<unnamed {node.op_type}>"
        if node.domain not in ("", "ai.onnx"):
            custom.setdefault(key, []).append(where)
        elif node.op_type in TRT_RECENT_OPS:
            recent.setdefault(node.op_type, []).append(where)
        elif node.op_type not in TRT_SUPPORTED_OPS:
            unsupported.setdefault(node.op_type, []).append(where)
        if node.name.startswith(VAR_PREFIX) and node.op_type in VAR_FORBIDDEN_OPS:
            var_forbidden.setdefault(node.op_type, []).append(where)
        elif node.op_type in DATA_DEPENDENT_OPS:
            data_dependent.setdefault(node.op_type, []).append(where)

    def names(nodes: list[str]) -> str:
        shown = ", ".join(nodes[:3])
        return shown + (f" (+{len(nodes) - 3} more)" if len(nodes) > 3 else "")

    for op, where in sorted(unsupported.items()):
        findings.append(
            LintFinding(
                "error",
                "unsupported-op",
                f"{len(where)} {op} node(s) ({names(where)}): the TensorRT ONNX parser has no {op}",
                f"rewrite {op} with supported ops before export, or provide a TensorRT plugin",
            )
        )
    for op, where in sorted(custom.items()):
        findings.append(
            LintFinding(
                "error",
                "custom-domain-op",
                f"{len(where)} {op} node(s) ({names(where)}): a non-standard op domain",
                "export without ONNX Runtime contrib fusions (plain ONNX ops), or provide a "
                "TensorRT plugin; fused attention hides the probabilities VAR needs anyway",
            )
        )
    for op, where in sorted(recent.items()):
        findings.append(
            LintFinding(
                "warning",
                "recent-op",
                f"{len(where)} {op} node(s) ({names(where)}): only recent TensorRT 10.x parsers "
                f"implement {op}",
                "check docs/operators.md of your TensorRT version, or export at opset <= 22",
            )
        )
    for op, where in sorted(var_forbidden.items()):
        findings.append(
            LintFinding(
                "error",
                "var-forbidden-op",
                f"{len(where)} {op} node(s) in the VAR nodes ({names(where)}): VAR must use only "
                "static, data-independent shapes (DESIGN.md §3)",
                "this is a bug in the VAR passes (passes/); rebuild the bundle with a fixed "
                "var-export and report it",
            )
        )
    for op, where in sorted(data_dependent.items()):
        findings.append(
            LintFinding(
                "error",
                "data-dependent-shape",
                f"{len(where)} {op} node(s) ({names(where)}): the output shape depends on tensor "
                "values (or control flow), which TensorRT engines and CUDA graphs cannot plan for",
                "fold it away before export (constant-fold, or express it with static-shape ops "
                "such as Where / masks)",
            )
        )

    # Graph I/O: bool and int64, dynamic axes.
    initializer_names = {t.name for t in graph.initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in initializer_names]
    bool_io = [
        vi.name for vi in [*real_inputs, *graph.output] if _elem_type(vi) == onnx.TensorProto.BOOL
    ]
    if bool_io:
        findings.append(
            LintFinding(
                "info",
                "bool-io",
                f"bool graph I/O: {', '.join(bool_io)}",
                "TensorRT >= 8.6 binds bool I/O (kBOOL, 1 byte per element): give it numpy bool / "
                "torch.bool buffers, not int32",
            )
        )
    int64_io = [
        vi.name for vi in [*real_inputs, *graph.output] if _elem_type(vi) == onnx.TensorProto.INT64
    ]
    int64_init = sum(1 for t in graph.initializer if t.data_type == onnx.TensorProto.INT64)
    if int64_io or int64_init:
        findings.append(
            LintFinding(
                "warning",
                "int64",
                f"int64 graph I/O ({', '.join(int64_io) or 'none'}) and {int64_init} int64 "
                "initializer(s)",
                "use TensorRT >= 10 (native INT64); older parsers cast INT64 to INT32 and clamp",
            )
        )
    for vi in [*real_inputs, *graph.output]:
        if _elem_type(vi) in (onnx.TensorProto.DOUBLE, onnx.TensorProto.STRING):
            findings.append(
                LintFinding(
                    "error",
                    "io-dtype",
                    f"graph I/O {vi.name} has type "
                    f"{onnx.TensorProto.DataType.Name(_elem_type(vi))}",
                    "export with float32/float16 I/O",
                )
            )

    dynamic: dict[str, list[int | str | None]] = {}
    for vi in real_inputs:
        shape = _shape_of(vi)
        if shape is None:
            findings.append(
                LintFinding(
                    "error",
                    "unknown-rank",
                    f"input {vi.name} has no shape (unknown rank)",
                    "export with a known rank (TensorRT needs ranks at parse time)",
                )
            )
            continue
        if any(not isinstance(d, int) for d in shape):
            dynamic[vi.name] = shape
    if dynamic:
        listed = ", ".join(f"{n}{d}" for n, d in dynamic.items())
        findings.append(
            LintFinding(
                "info",
                "dynamic-input",
                f"{len(dynamic)} input(s) with dynamic axes need optimization profiles: {listed}",
                "build_engine / `var-export build-trt` makes them from --max-batch / --max-seq / "
                "--max-past (see make_profiles)",
            )
        )

    external = [
        t.name
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        files = sorted(
            {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        )
        findings.append(
            LintFinding(
                "warning",
                "external-data",
                f"{len(external)} initializer(s) in external data ({', '.join(files)})",
                "keep the data file(s) beside the .onnx and parse with parse_from_file (build_engine "
                "does), not from bytes",
            )
        )

    report = LintReport(
        source=source, opset=opset, op_counts=op_counts, dynamic_inputs=dynamic, findings=findings
    )
    log.debug("%s", report.format())
    return report


# ---------------------------------------------------------------------------------------------
# Optimization profiles (pure)


@dataclasses.dataclass(frozen=True)
class ProfileLimits:
    """min / opt / max of the dynamic axes of one optimization profile.

    ``past`` may start at 0 (prefill feeds an empty KV cache). The total length
    T = past + sequence gets ``(min_past + min_seq, opt_past + opt_seq, max_past + max_seq)``.
    """

    batch: tuple[int, int, int] = (1, 1, 4)  # B
    sequence: tuple[int, int, int] = (1, 1, 1024)  # S: new tokens (prompt at prefill, 1 decoding)
    past: tuple[int, int, int] = (0, 512, 1024)  # P: cached tokens
    image: tuple[int, int, int] = (336, 336, 336)  # H, W of pixel_values when they are dynamic

    def __post_init__(self) -> None:
        for name in ("batch", "sequence", "past", "image"):
            lo, opt, hi = getattr(self, name)
            floor = 0 if name == "past" else 1
            if not floor <= lo <= opt <= hi:
                raise ConfigError(
                    f"profile {name}: expected {floor} <= min <= opt <= max, found "
                    f"({lo}, {opt}, {hi}). Fix --max-{'seq' if name == 'sequence' else name}."
                )

    @property
    def total(self) -> tuple[int, int, int]:
        return tuple(p + s for p, s in zip(self.past, self.sequence))  # type: ignore[return-value]

    @classmethod
    def from_max(
        cls,
        *,
        max_batch: int | None = None,
        max_seq: int | None = None,
        max_past: int | None = None,
        opt_batch: int | None = None,
    ) -> ProfileLimits:
        """Defaults with the maxima overridden (opt: batch 1 or given, sequence 1, past max/2)."""
        d = cls()
        mb = int(max_batch) if max_batch is not None else d.batch[2]
        ms = int(max_seq) if max_seq is not None else d.sequence[2]
        mp = int(max_past) if max_past is not None else d.past[2]
        ob = int(opt_batch) if opt_batch is not None else min(1, mb)
        for flag, v, lo in (("--max-batch", mb, 1), ("--max-seq", ms, 1), ("--max-past", mp, 0)):
            if v < lo:
                raise ConfigError(f"{flag} must be >= {lo}, found {v}.")
        return cls(batch=(1, ob, mb), sequence=(1, 1, ms), past=(0, mp // 2, mp))


# Axis roles of the contract's inputs (DESIGN.md §3): input name -> role per axis
# (None = take the static size from the graph).
def _axis_roles(name: str, rank: int) -> list[str | None] | None:
    if name in ("inputs_embeds",):
        return ["batch", "sequence", None]
    if name in ("input_ids", "position_ids"):
        return ["batch", "sequence"]
    if name in ("attention_mask", "visual_token_mask"):
        return ["batch", "total"]
    if name == "past_sink_mask":
        return ["batch", None, "past"]
    if name.startswith("past_key_values.") or name.startswith("past_key."):
        return ["batch", None, "past", None]
    if name == "pixel_values":
        return ["batch", None, "image", "image"]
    return None


_SYMBOL_ROLES = {
    "batch": "batch",
    "batch_size": "batch",
    "sequence": "sequence",
    "sequence_length": "sequence",
    "past_sequence": "past",
    "past_sequence_length": "past",
    "total_sequence": "total",
    "total_sequence_length": "total",
    "height": "image",
    "width": "image",
}


def make_profiles(
    input_shapes: Mapping[str, Sequence[int | str | None]],
    limits: ProfileLimits | Sequence[ProfileLimits] | None = None,
) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Optimization profiles for a graph: one dict ``input -> (min, opt, max)`` per limits.

    ``input_shapes``: the graph's inputs with static sizes (int) or symbolic/unknown axes
    (str / None), e.g. from :func:`graph_input_shapes`. Each dynamic axis gets its role from the
    contract's input names (DESIGN.md §3: batch, sequence, past, total = past + sequence) or,
    for other inputs, from the symbolic name (``batch``, ``sequence``, ``past_sequence`` ...).
    Static inputs are left out. Raises ConfigError for a dynamic axis with no known role.
    """
    if limits is None:
        limits = [ProfileLimits()]
    elif isinstance(limits, ProfileLimits):
        limits = [limits]
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = []
    for lim in limits:
        ranges = {
            "batch": lim.batch,
            "sequence": lim.sequence,
            "past": lim.past,
            "total": lim.total,
            "image": lim.image,
        }
        profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        for name, shape in input_shapes.items():
            if all(isinstance(d, int) for d in shape):
                continue
            roles = _axis_roles(name, len(shape))
            if roles is not None and len(roles) != len(shape):
                roles = None
            lo: list[int] = []
            opt: list[int] = []
            hi: list[int] = []
            for axis, d in enumerate(shape):
                if isinstance(d, int):
                    lo.append(d)
                    opt.append(d)
                    hi.append(d)
                    continue
                role = roles[axis] if roles is not None else None
                if role is None and isinstance(d, str):
                    role = _SYMBOL_ROLES.get(d)
                if role is None:
                    raise ConfigError(
                        f"input {name} axis {axis} is dynamic ({d!r}) and has no known role; "
                        "expected one of the contract's inputs (DESIGN.md §3) or a symbolic "
                        f"axis named {sorted(_SYMBOL_ROLES)}. Re-export with named axes."
                    )
                r = ranges[role]
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            profile[name] = (tuple(lo), tuple(opt), tuple(hi))
        profiles.append(profile)
    return profiles


def graph_input_shapes(model: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """The graph's (non-initializer) inputs and their shapes (int static, str/None dynamic)."""
    proto, _ = _load(model)
    init = {t.name for t in proto.graph.initializer}
    out: dict[str, list[int | str | None]] = {}
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        shape = _shape_of(vi)
        if shape is None:
            raise ConfigError(f"input {vi.name} has unknown rank; TensorRT needs ranks.")
        out[vi.name] = shape
    return out


# ---------------------------------------------------------------------------------------------
# Engine build (needs tensorrt + a CUDA GPU)

INSTALL_HINT = (
    "install the tensorrt package (>= 10; the `trt` extra: `pip install var-export[trt]`) on a machine "
    "with an NVIDIA GPU and driver, then run `var-export build-trt BUNDLE --out engine.plan` "
    "there. Meanwhile the bundle runs with ONNX Runtime (`var-export run BUNDLE ...`)"
)

# progress(phase, done, total)
ProgressFn = Callable[[str, int, int], None]


def _cuda_device_count() -> int:
    """Number of CUDA devices through the driver API (0 without a driver or GPU)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        try:
            if cuda.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def import_tensorrt() -> Any:
    """``import tensorrt`` and check for a CUDA GPU; TensorRTUnavailableError otherwise."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"expected the TensorRT Python package; `import tensorrt` failed ({exc}). "
            f"To build an engine, {INSTALL_HINT}."
        ) from exc
    n = _cuda_device_count()
    if n < 1:
        raise TensorRTUnavailableError(
            f"expected a CUDA GPU for TensorRT {getattr(trt, '__version__', '?')}; found no NVIDIA "
            f"driver / GPU on this machine. To build an engine, {INSTALL_HINT}."
        )
    return trt


def resolve_graph(bundle_or_graph: Any) -> Path:
    """The ONNX file to build: a bundle (object or directory) -> its decoder; a file -> itself."""
    path = getattr(bundle_or_graph, "path", bundle_or_graph)
    path = Path(path)
    if path.is_dir():
        graph_paths = getattr(bundle_or_graph, "graphs", None) or getattr(
            bundle_or_graph, "paths", None
        )
        if isinstance(graph_paths, Mapping) and DECODER in graph_paths:
            return Path(graph_paths[DECODER])
        path = path / DECODER
    if not path.is_file():
        raise BundleError(
            f"expected a bundle directory with {DECODER} or an .onnx file; found nothing at "
            f"{path}. Write a bundle with `var-export export` first."
        )
    return path


def _atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _progress_monitor(trt: Any, progress: ProgressFn | None) -> Any | None:
    """A trt.IProgressMonitor forwarding the top-level build phases to ``progress``."""
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.totals: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.totals[phase_name] = int(num_steps)
            if parent_phase is None:
                progress(phase_name, 0, int(num_steps))

        def step_complete(self, phase_name: str, step: int) -> bool:
            progress(phase_name, int(step) + 1, self.totals.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            total = self.totals.get(phase_name, 0)
            progress(phase_name, total, total)

    return Monitor()


def build_engine(
    bundle_or_decoder: Any,
    out_plan: str | os.PathLike[str],
    *,
    fp16: bool = False,
    profiles: ProfileLimits | Sequence[ProfileLimits] | None = None,
    workspace_gb: float = 4.0,
    lint: bool = True,
    progress: ProgressFn | None = None,
) -> Path:
    """Build a TensorRT engine from a bundle's decoder (or any ``.onnx``) and write ``out_plan``.

    ``profiles``: one :class:`ProfileLimits` per optimization profile (default: one profile,
    batch 1..4, sequence 1..1024, past 0..1024). ``fp16`` enables FP16 kernels (the graph's
    softmax stays as exported). The plan is written atomically (temp file + rename).
    Raises TensorRTUnavailableError without tensorrt or a GPU, TensorRTLintError when the lint
    finds a blocking problem, VarExportError when the parser or the builder fails.
    """
    graph = resolve_graph(bundle_or_decoder)
    out_plan = Path(out_plan)
    trt = import_tensorrt()
    if lint:
        lint_for_tensorrt(graph).raise_if_errors()
    shapes = graph_input_shapes(graph)
    plans = make_profiles(shapes, profiles)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
        trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"
    ):  # TensorRT 8.x needs it; 10 ignores (deprecated)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("parsing %s", graph)
    if not parser.parse_from_file(str(graph)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise VarExportError(
            f"expected the TensorRT ONNX parser to accept {graph}; it reported: "
            f"{'; '.join(errors) or 'no detail'}. Run `var-export build-trt --lint-only` and "
            "report the graph if the lint passed."
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for plan in plans:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    log.info(
        "building TensorRT engine (%s, %d profile(s), workspace %.1f GB)",
        "fp16" if fp16 else "fp32",
        len(plans),
        workspace_gb,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VarExportError(
            f"expected TensorRT to build an engine from {graph}; the builder returned nothing "
            "(see the TensorRT log above). Try a larger --workspace-gb or smaller --max-* limits."
        )
    _atomic_write_bytes(out_plan, memoryview(serialized))
    log.info("wrote %s in %.1f s", out_plan, time.perf_counter() - t0)
    return out_plan


def describe_profiles(
    profiles: Iterable[Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
) -> str:
    """Human-readable profile table (one line per input)."""
    lines = []
    for i, prof in enumerate(profiles):
        for name, (lo, opt, hi) in prof.items():
            lines.append(f"profile {i}: {name}: min {list(lo)} opt {list(opt)} max {list(hi)}")
    return "\n".join(lines)
