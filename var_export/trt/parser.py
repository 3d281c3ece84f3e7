"""TensorRT's own ONNX parser as the lint, and the parsed network the builder starts from.

:func:`parser_lint` parses a graph with the real parser (after
:func:`var_export.safety.check_external_data`, so an untrusted graph never makes it read a
file outside its folder) and asks ``supports_model_v2`` for the support verdict; every parser
error is mapped back to the ONNX node's name and op type. The project's own policy rules of
the hand lint (no data-dependent shapes, DESIGN.md §3's static VAR op set) still apply, and its
I/O notes (bool, int64, dynamic inputs) are kept; what the parser decides (op support, opset,
head sizes of Attention) comes from the parser alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import onnx

from var_export.safety import check_external_data
from var_export.trt.flavour import Flavour
from var_export.trt.lint import GraphFacts, LintFinding, LintReport, lint_for_tensorrt, load_graph

log = logging.getLogger(__name__)

# Hand-lint codes that stay in force with the real parser: project policy (VAR graphs stay
# static, CUDA-graph friendly) and notes about binding I/O, which no parser reports.
POLICY_CODES = frozenset({"var-forbidden-op", "data-dependent-shape"})
NOTE_CODES = frozenset({"bool-io", "int64", "dynamic-input", "external-data"})


def make_logger(flavour: Flavour) -> Any:
    """A TensorRT logger that forwards to :mod:`logging` and keeps the error lines."""
    trt = flavour.trt

    class Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT error: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.debug("TensorRT: %s", msg)

    return Logger()


@dataclasses.dataclass
class Parsed:
    """A parsed network and what it took to make it (keep ``builder`` and ``parser`` alive)."""

    flavour: Flavour
    logger: Any
    builder: Any
    network: Any
    parser: Any
    ok: bool
    errors: list[LintFinding]


def parse(flavour: Flavour, graph: Path | onnx.ModelProto) -> Parsed:
    """Parse ``graph`` into a strongly typed network; errors mapped to ONNX nodes."""
    trt = flavour.trt
    logger = make_logger(flavour)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if isinstance(graph, onnx.ModelProto):
        ok = parser.parse(graph.SerializeToString())
        nodes = list(graph.graph.node)
    else:
        check_external_data(graph)
        ok = parser.parse_from_file(os.fspath(graph))
        nodes = list(load_graph(graph)[0].graph.node)
    errors = [_error_finding(parser.get_error(i), nodes) for i in range(parser.num_errors)]
    return Parsed(flavour, logger, builder, network, parser, bool(ok) and not errors, errors)


def _error_finding(error: Any, nodes: list[onnx.NodeProto]) -> LintFinding:
    """One parser error as a finding naming the ONNX node (name, op type, index)."""
    index = int(error.node())
    name, op = str(error.node_name() or ""), str(error.node_operator() or "")
    if 0 <= index < len(nodes):
        name = name or nodes[index].name
        op = op or nodes[index].op_type
    # (without a GPU the parser also logs a harmless "cudaError 35" line: left out)
    lines = [ln.strip() for ln in str(error.desc()).splitlines() if ln.strip()]
    desc = " ".join(ln for ln in lines if "catchCudaError" not in ln)
    where = f"{op or '?'} node {name or '?'} (#{index})" if index >= 0 else "the graph"
    return LintFinding(
        "error",
        "parser-error",
        f"{where}: {str(error.code()).rsplit('.', 1)[-1]}: {desc}",
        "rewrite that node with ops this TensorRT supports (see its operators.md), or report "
        "the graph if var-export wrote it",
        (name,) if name else (),
    )


def _support_findings(flavour: Flavour, graph: Path | onnx.ModelProto) -> list[LintFinding]:
    """supports_model_v2's verdict: the unsupported node ranges (after a failing node the
    parser marks the rest of the graph unsupported, so node lists are summarised)."""
    trt = flavour.trt
    logger = make_logger(flavour)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if isinstance(graph, onnx.ModelProto):
        supported = parser.supports_model_v2(graph.SerializeToString())
    else:
        supported = parser.supports_model_v2(Path(graph).read_bytes(), os.fspath(graph))
    if supported:
        return []
    bad = [i for i in range(parser.num_subgraphs) if not parser.is_subgraph_supported(i)]
    sizes = [len(parser.get_subgraph_nodes(i)) for i in bad]
    return [
        LintFinding(
            "error",
            "unsupported-subgraph",
            f"supports_model_v2: {len(bad)} of {parser.num_subgraphs} subgraph(s) unsupported "
            f"({sum(sizes)} nodes)",
            "see the parser errors for the node that breaks the graph",
        )
    ]


def parser_lint(flavour: Flavour, graph: str | os.PathLike[str] | onnx.ModelProto) -> LintReport:
    """Lint ``graph`` with the real parser of ``flavour`` (module doc)."""
    model, source = load_graph(graph)
    path = model if isinstance(graph, onnx.ModelProto) else Path(source)
    hand = lint_for_tensorrt(model)
    parsed = parse(flavour, path)
    findings = list(parsed.errors)
    if not parsed.ok and not findings:
        findings.append(
            LintFinding("error", "parser-error", f"the parser failed: {'; '.join(parsed.logger.errors) or 'no detail'}",
                        "report the graph if var-export wrote it")
        )
    findings += _support_findings(flavour, path)
    findings += [f for f in hand.findings if f.code in POLICY_CODES | NOTE_CODES]
    facts = GraphFacts(model, source, 0)
    return LintReport(
        source=source,
        opset=facts.opset,
        op_counts=hand.op_counts,
        dynamic_inputs=hand.dynamic_inputs,
        findings=findings,
        authority=f"{flavour.label} ONNX parser",
    )


def mark_attention_decomposable(flavour: Flavour, network: Any) -> int:
    """Let the builder decompose attention layers that have no dedicated kernel.

    TensorRT-RTX refuses an fp32 ``Attention`` (the ONNX op of a fused export) with "Attention
    operation was not supported by a dedicated kernel" unless it is marked decomposable
    (``IAttention.decomposable``); attention that has a kernel keeps it. Returns the number of
    attention layers marked.
    """
    trt = flavour.trt
    if not hasattr(trt, "IAttentionBoundaryLayer"):
        return 0
    kinds = {getattr(trt.LayerType, k) for k in ("ATTENTION_INPUT",) if hasattr(trt.LayerType, k)}
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        layer.__class__ = trt.IAttentionBoundaryLayer  # the bindings' documented downcast
        attention = layer.attention
        if not attention.decomposable:
            attention.decomposable = True
            marked += 1
    return marked



def lint_graph(
    graph: str | os.PathLike[str] | onnx.ModelProto, flavour: str = "auto"
) -> LintReport:
    """The authoritative lint here: the real parser when a TensorRT can parse on this machine,
    else the hand lint (``flavour="none"`` forces the hand lint)."""
    from var_export.core.errors import TensorRTUnavailableError
    from var_export.trt.flavour import resolve_flavour

    if flavour == "none":
        return lint_for_tensorrt(graph)
    try:
        chosen = resolve_flavour(flavour)
    except TensorRTUnavailableError as exc:
        if flavour != "auto":
            raise
        log.info("no TensorRT parser here (%s); using the hand lint", str(exc).split(";")[0])
        return lint_for_tensorrt(graph)
    return parser_lint(chosen, graph)
