"""TensorRT: lint, optimization profiles, engine build and the engine runtime.

- :mod:`.lint` — the hand-written lint, a list of small rules (no TensorRT needed);
- :mod:`.parser` — TensorRT's own ONNX parser as the lint when a TensorRT is importable;
- :mod:`.profiles` — optimization profiles from the bundle manifest (pure);
- :mod:`.flavour` — datacenter ``tensorrt`` or ``tensorrt_rtx`` (ahead-of-time, no GPU);
- :mod:`.build` — engines for a bundle's three graphs and the engine manifest;
- :mod:`.runtime` — generation with the three engines (needs a GPU).
"""

from __future__ import annotations

from var_export.trt.build import (
    BuildConfig,
    EngineSet,
    build_engine,
    build_engines,
    engine_manifest_path,
    engine_paths,
    lint_sources,
    read_engine_manifest,
)
from var_export.trt.flavour import (
    DEFAULT_RTX_TARGETS,
    FLAVOURS,
    INSTALL_HINT,
    Flavour,
    available_flavours,
    cuda_device_count,
    resolve_flavour,
)
from var_export.trt.lint import (
    DATA_DEPENDENT_OPS,
    MAX_PARSER_OPSET,
    RULES,
    TRT_SUPPORTED_OPS,
    VAR_FORBIDDEN_OPS,
    LintFinding,
    LintReport,
    TensorRTLintError,
    lint_for_tensorrt,
)
from var_export.trt.parser import lint_graph, parser_lint
from var_export.trt.profiles import (
    ProfileLimits,
    check_shapes,
    describe_profiles,
    family_axes,
    graph_input_shapes,
    image_processor_config,
    make_profiles,
)

__all__ = [
    "BuildConfig", "DATA_DEPENDENT_OPS", "DEFAULT_RTX_TARGETS", "EngineSet", "FLAVOURS",
    "Flavour", "INSTALL_HINT", "LintFinding", "LintReport", "MAX_PARSER_OPSET", "ProfileLimits",
    "RULES", "TRT_SUPPORTED_OPS", "TensorRTLintError", "VAR_FORBIDDEN_OPS", "available_flavours",
    "build_engine", "build_engines", "check_shapes", "cuda_device_count", "describe_profiles",
    "engine_manifest_path", "engine_paths", "family_axes", "graph_input_shapes", "image_processor_config", "lint_for_tensorrt",
    "lint_graph", "lint_sources", "make_profiles", "parser_lint", "read_engine_manifest", "resolve_flavour",
]
