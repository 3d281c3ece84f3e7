"""Engines for a bundle's three graphs, and the engine manifest, written atomically.

    engine.plan                    the decoder (decoder_model_merged.onnx)
    engine.vision_encoder.plan     vision_encoder.onnx
    engine.embed_tokens.plan       embed_tokens.onnx
    engine.engines.json            flavour, TensorRT version, targets, profiles, precision,
                                   I/O of each engine, sha256 of each engine and of its ONNX

One build path for both flavours (:mod:`var_export.trt.flavour`): a strongly typed network
parsed by TensorRT's ONNX parser (the graph is confined first: external data must stay in its
folder), attention layers marked decomposable, optimization profiles from the bundle manifest
(:mod:`var_export.trt.profiles`), compute-capability targets for TensorRT-RTX.

Every file is written to a temporary name beside its target and renamed into place after all
engines were built; the manifest goes last. Existing files are replaced only when the engine
manifest there says this tool wrote them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.contract import DECODER, GRAPH_FILES
from var_export.core.errors import BundleError, ConfigError, TensorRTBuildError
from var_export.safety import check_external_data
from var_export.trt.flavour import Flavour, compute_capabilities, resolve_flavour, target_names
from var_export.trt.isolated import build_isolated
from var_export.trt.lint import LintReport, TensorRTLintError, load_graph
from var_export.trt.parser import mark_attention_decomposable, parse
from var_export.trt.profiles import (
    AxisRanges,
    ProfileLimits,
    family_axes,
    graph_input_shapes,
    image_processor_config,
    make_profiles,
)

log = logging.getLogger(__name__)

ENGINE_SCHEMA_VERSION = 1
# progress(phase, done, total)
ProgressFn = Callable[[str, int, int], None]
KERNEL_REFUSAL = (
    "the kernel formulation's var_export::VarAttention is an ONNX Runtime CPU custom op; TensorRT has no "
            "plugin for it (docs/kernel.md). Build the TensorRT bundle with --formulation fused-qk (or naive)."
)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How to build. None means: from the bundle manifest / the flavour's default."""

    flavour: str = "auto"  # auto | tensorrt | tensorrt-rtx
    targets: Sequence[str] | str | None = None  # RTX compute capabilities, e.g. "80,86,89,120"
    limits: ProfileLimits | None = None  # default: ProfileLimits.for_bundle(manifest)
    max_batch: int | None = None  # overrides of the manifest's limits (when limits is None)
    max_seq: int | None = None
    max_past: int | None = None
    max_images: int | None = None  # images per vision call (default: one per batch row)
    workspace_gb: float | None = None  # builder workspace cap (default: TensorRT's)
    opt_level: int | None = None  # IBuilderConfig.builder_optimization_level 0..5 (default: TensorRT's, 3)
    isolate: bool = True  # each engine built in a child process: a builder crash is a TensorRTBuildError

    def __post_init__(self) -> None:
        level = self.opt_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5):
            raise ConfigError(
                f"expected a TensorRT builder optimization level 0..5 (0 builds fastest, 5 searches "
                f"longest for the fastest engine), found {level!r}. Fix --trt-opt-level."
            )


@dataclasses.dataclass
class EngineSet:
    """What :func:`build_engines` wrote."""

    manifest_path: Path
    manifest: dict[str, Any]
    engines: dict[str, Path]  # ONNX file name -> engine path

    @property
    def decoder(self) -> Path:
        return self.engines.get(DECODER) or next(iter(self.engines.values()))


# ---------------------------------------------------------------------------------------------
# Paths


def engine_paths(plan: Path, graphs: Sequence[str]) -> dict[str, Path]:
    """ONNX file name -> engine path: the decoder (or a lone graph) at ``plan``, the others
    beside it as ``<stem>.<graph>.plan``."""
    plan = Path(plan)
    if plan.suffix != ".plan":
        raise ConfigError(f"expected a path ending in .plan for a TensorRT engine, found {plan}.")
    main = DECODER if DECODER in graphs else graphs[0]
    return {
        g: plan if g == main else plan.with_name(f"{plan.stem}.{Path(g).stem}.plan") for g in graphs
    }


def engine_manifest_path(plan: Path) -> Path:
    plan = Path(plan)
    return plan.with_name(f"{plan.stem}.engines.json")


def read_engine_manifest(plan: Path) -> dict[str, Any]:
    path = engine_manifest_path(plan)
    if not path.is_file():
        raise BundleError(
            f"expected the engine manifest {path} beside {plan}; found none. Build the engines "
            "with `var-export build-trt BUNDLE --out X.plan`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); rebuild the engines.") from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != ENGINE_SCHEMA_VERSION:
        raise BundleError(
            f"{path}: expected an engine manifest of schema {ENGINE_SCHEMA_VERSION}; rebuild "
            "the engines with this var-export."
        )
    return manifest


def _listed_files(manifest_path: Path) -> set[str] | None:
    """Engine files an engine manifest lists, or None when it is missing or not ours."""
    try:
        return {e["file"] for e in json.loads(manifest_path.read_text())["engines"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_replaceable(targets: Mapping[str, Path], manifest_path: Path) -> None:
    """Refuse to overwrite a file this tool did not write (not listed in the manifest there)."""
    ours = _listed_files(manifest_path)
    refused = [manifest_path] if manifest_path.exists() and ours is None else []
    refused += [p for p in targets.values() if p.exists() and (p.is_dir() or p.name not in (ours or ()))]
    if refused:
        raise ConfigError(
            f"{refused[0]} exists and was not written by var-export build-trt (no engine "
            "manifest beside it lists it); refusing to replace it. Choose another --out or "
            "remove it yourself."
        )


# ---------------------------------------------------------------------------------------------
# One engine


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


def _tensor_specs(flavour: Flavour, network: Any) -> dict[str, list[dict[str, Any]]]:
    """The network's I/O (name, shape with -1 for dynamic axes, numpy dtype name)."""

    def spec(t: Any) -> dict[str, Any]:
        return {"name": t.name, "shape": [int(d) for d in t.shape],
                "dtype": np.dtype(flavour.trt.nptype(t.dtype)).name}

    return {
        "inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)],
    }


def serialize_engine(
    flavour: Flavour,
    graph: Path,
    limits: ProfileLimits,
    capabilities: Sequence[Any] = (),
    *,
    workspace_gb: float | None = None,
    opt_level: int | None = None,
    progress: ProgressFn | None = None,
    axes: Callable[[ProfileLimits], AxisRanges] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Parse ``graph`` and build one serialized engine; returns (host memory, facts).
    ``opt_level``: the builder optimization level (None: TensorRT's default);
    ``axes``: the model family's ranges of the vision inputs (:func:`profiles.family_axes`)."""
    trt = flavour.trt
    parsed = parse(flavour, graph)
    if not parsed.ok:
        raise TensorRTLintError(
            LintReport(str(graph), None, {}, {}, parsed.errors, f"{flavour.label} ONNX parser")
        )
    decomposable = mark_attention_decomposable(flavour, parsed.network)
    profiles = make_profiles(graph_input_shapes(graph), limits, axes)
    config = parsed.builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if capabilities:
        config.num_compute_capabilities = len(capabilities)
        for i, cap in enumerate(capabilities):
            config.set_compute_capability(cap, i)
    for plan in profiles:
        profile = parsed.builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise TensorRTBuildError(
            f"expected {flavour.label} to build an engine from {graph}; the builder failed: "
            f"{' | '.join(parsed.logger.errors[-3:]) or 'no detail'}. Try smaller --max-* limits."
        )
    facts = {
        "profiles": [{k: [list(v) for v in r] for k, r in p.items()} for p in profiles],
        "io": _tensor_specs(flavour, parsed.network),
        "attention_decomposable": decomposable,
        "builder_optimization_level": int(config.builder_optimization_level),
        "build_seconds": round(seconds, 3),
    }
    return serialized, facts


# ---------------------------------------------------------------------------------------------
# A bundle's engines


def _sources(source: Path) -> tuple[dict[str, Path], dict[str, Any] | None, Path | None]:
    """(ONNX file name -> path, the bundle manifest or None, the bundle dir or None)."""
    from var_export.bundle import load_bundle

    source = Path(source)
    if source.is_dir():
        bundle = load_bundle(source)
        return {g: bundle.graphs[g] for g in GRAPH_FILES}, bundle.manifest, bundle.path
    if source.suffix != ".onnx" or not source.is_file():
        raise BundleError(
            f"expected a bundle directory or an .onnx file; found nothing usable at {source}. "
            "Write a bundle with `var-export export` first."
        )
    return {source.name: source}, None, None


def lint_sources(source: str | os.PathLike[str], flavour: str = "auto") -> dict[str, LintReport]:
    """Lint every graph of a bundle (or one ``.onnx``): confined first (external data must stay
    in the graph's folder), then TensorRT's parser when one is here, else the hand lint."""
    from var_export.trt.parser import lint_graph

    graphs, _, _ = _sources(Path(source))
    for path in graphs.values():
        check_external_data(path)
    return {name: lint_graph(path, flavour) for name, path in graphs.items()}


def _precision(manifest: Mapping[str, Any] | None, graph: Path) -> str:
    if manifest and manifest.get("dtype"):
        return str(manifest["dtype"])
    proto, _ = load_graph(graph)
    floats = {vi.type.tensor_type.elem_type for vi in proto.graph.input} & {1, 10, 16}
    return {10: "fp16", 16: "bf16"}.get(next(iter(floats), 1), "fp32")


def _temp_path(path: Path, token: str) -> Path:
    return path.with_name(f".{path.name}.tmp-{token}")


def write_file(path: Path, data: Any) -> None:
    """``data`` (bytes, TensorRT host memory) to ``path``, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())


def _write_temp(path: Path, data: Any, token: str) -> Path:
    tmp = _temp_path(path, token)
    write_file(tmp, data)
    return tmp


def _sha256(path: Path) -> str:
    from var_export.bundle import sha256_file

    return sha256_file(path)


def build_engines(
    source: str | os.PathLike[str],
    out_plan: str | os.PathLike[str],
    config: BuildConfig = BuildConfig(),  # noqa: B008 - frozen
    *,
    progress: ProgressFn | None = None,
) -> EngineSet:
    """Build engines for a bundle's three graphs (or one ``.onnx``) and the engine manifest.

    With ``config.isolate`` each engine is built in a child process
    (:mod:`var_export.trt.isolated`), so a crash inside TensorRT's builder is a
    TensorRTBuildError here. Raises TensorRTUnavailableError without a usable TensorRT, UnsafeInputError for external
    data outside a graph's folder (before any parser reads it), TensorRTLintError when the
    parser rejects a graph, TensorRTBuildError when the builder fails, ConfigError for bad
    limits/targets or an ``--out`` that would replace files this tool did not write.
    """
    graphs, manifest, bundle_dir = _sources(Path(source))
    if (manifest or {}).get("formulation") == "kernel":
        raise ConfigError(f"{source}: " + KERNEL_REFUSAL)
    for path in graphs.values():
        check_external_data(path)
    flavour = resolve_flavour(config.flavour)
    capabilities = compute_capabilities(flavour, config.targets)
    limits = config.limits or ProfileLimits.for_bundle(
        manifest, max_batch=config.max_batch, max_seq=config.max_seq, max_past=config.max_past,
        max_images=config.max_images,
    )
    axes = family_axes(manifest, image_processor_config(bundle_dir))
    targets = engine_paths(Path(out_plan), list(graphs))
    manifest_path = engine_manifest_path(Path(out_plan))
    check_replaceable(targets, manifest_path)
    token = uuid.uuid4().hex[:8]
    temps: dict[Path, Path] = {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        options = {"workspace_gb": config.workspace_gb, "opt_level": config.opt_level, "progress": progress,
                   "axes": axes}
        for name, graph in graphs.items():
            log.info("building %s engine from %s with %s", name, graph, flavour.label)
            temps[targets[name]] = tmp = _temp_path(targets[name], token)
            facts = _build_one(flavour, graph, tmp, limits, capabilities, isolate=config.isolate, **options)
            entries[name] = {"file": targets[name].name, "sha256": _sha256(tmp),
                             "bytes": tmp.stat().st_size,
                             "source": name if bundle_dir is not None else str(graph),
                             "source_sha256": _sha256(graph), **facts}
        body = _engine_manifest(flavour, capabilities, limits, manifest, bundle_dir,
                                Path(out_plan), entries, graphs)
        body = json.loads(json.dumps(body))  # exactly what is written (lists, not tuples)
        temps[manifest_path] = _write_temp(
            manifest_path, (json.dumps(body, indent=2) + "\n").encode(), token
        )
        for final, tmp in temps.items():  # engines first, the manifest last
            os.replace(tmp, final)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    log.info("wrote %d engine(s) and %s", len(targets), manifest_path)
    return EngineSet(manifest_path, body, targets)


def _build_one(flavour: Flavour, graph: Path, tmp: Path, limits: ProfileLimits, capabilities: Sequence[Any],
               *, isolate: bool, **options: Any) -> dict[str, Any]:
    """Build one engine into ``tmp``; returns its build facts. ``isolate``: in a child process,
    where a crash inside TensorRT's builder becomes a TensorRTBuildError."""
    if isolate:
        return build_isolated(flavour, graph, tmp, limits, capabilities, **options)
    data, facts = serialize_engine(flavour, graph, limits, capabilities, **options)
    write_file(tmp, data)
    return facts


def _engine_manifest(
    flavour: Flavour,
    capabilities: Sequence[Any],
    limits: ProfileLimits,
    bundle_manifest: Mapping[str, Any] | None,
    bundle_dir: Path | None,
    plan: Path,
    entries: Mapping[str, Any],
    graphs: Mapping[str, Path],
) -> dict[str, Any]:
    bundle = None
    if bundle_dir is not None:
        bundle = os.path.relpath(bundle_dir.resolve(), plan.resolve().parent)
    return {
        "schema_version": ENGINE_SCHEMA_VERSION,
        "flavour": flavour.name,
        "tensorrt_version": flavour.version,
        "targets": target_names(capabilities) if capabilities else ["build GPU"],
        "strongly_typed": True,
        "precision": _precision(bundle_manifest, next(iter(graphs.values()))),
        "limits": limits.to_dict(),
        "bundle": bundle,  # relative to the engine's folder
        "var": (bundle_manifest or {}).get("var"),
        "var_layers": (bundle_manifest or {}).get("var_layers", []),
        "engines": dict(entries),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def build_engine(
    source: str | os.PathLike[str],
    out_plan: str | os.PathLike[str],
    config: BuildConfig = BuildConfig(),  # noqa: B008 - frozen
    *,
    progress: ProgressFn | None = None,
) -> Path:
    """:func:`build_engines`, returning the decoder engine's path (``out_plan``)."""
    return build_engines(source, out_plan, config, progress=progress).decoder

