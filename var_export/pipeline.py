"""The whole job as library calls: model → (calibration) → graphs → VAR passes → bundle.

``build_bundle`` is what ``var-export --model M --out DIR`` and ``var-export export`` run;
``build_plan`` adds the TensorRT engine for ``--out X.plan``. The CLI only parses
arguments into ``BuildOptions`` and reports the ``BuildResult``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from var_export.core.contract import DECODER, GRAPH_FILES
from var_export.core.errors import CalibrationError, ConfigError, TensorRTUnavailableError
from var_export.core.extras import require_extra
from var_export.core.settings import HeadMode, VarSettings, check_overrides, resolve_settings

log = logging.getLogger(__name__)



@dataclasses.dataclass
class BuildOptions:
    """What to build. Knob values of None mean "from the preset / calibration"."""

    out: Path  # bundle directory (or, for build_plan, the .plan path)
    model: str | None = None  # preset, HF hub id or local HF dir; None = tiny-llava
    heads: HeadMode | None = None  # dynamic | static | hybrid (default hybrid)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # tau, rho, summ, p, layers, sink_dims, ...
    convention: str = "code"  # how overrides["p"] / ["rho"] are read
    calibration: Path | None = None  # an existing calibration.json (else calibrate when needed)
    data: Path | None = None  # calibration images (+ prompts.txt); None = built-in synthetic set
    head_threshold: float = 0.5  # image-centric score needed for a calibrated head
    no_var: bool = False  # the baseline bundle without VAR
    dtype: str = "fp32"  # fp32 | fp16 (VAR arithmetic stays fp32)
    opset: int | None = None  # default 18, or 23 with fused
    fused: bool = False  # SDPA export (ONNX Attention op) + the fused VAR formulation (passes.fused_var)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    triton: bool = False  # also write OUT-triton, the var_llava Triton repository (var_export.triton)
    layout: str = "bundle"  # "transformers.js": also write OUT-transformers.js (var_export.hf_layout)

    def __post_init__(self) -> None:
        check_overrides(self.overrides, self.convention)  # bad knobs fail before any work


@dataclasses.dataclass
class BuildResult:
    bundle_dir: Path
    settings: VarSettings | None
    calibration: dict[str, Any] | None
    var_layers: list[int]
    heads: list[list[int]]
    files: dict[str, int]  # file name -> bytes
    timings: dict[str, float]  # step -> seconds
    triton_dir: Path | None = None
    layout_dir: Path | None = None


def _needs_calibration(opts: BuildOptions, preset: dict[str, Any] | None) -> bool:
    if opts.no_var or opts.calibration is not None:
        return False
    mode = opts.heads or "hybrid"
    sink_dims_known = bool(opts.overrides.get("sink_dims") or (preset or {}).get("sink_dims"))
    return mode != "dynamic" or not sink_dims_known


def build_bundle(opts: BuildOptions, progress: Any = None) -> BuildResult:
    """Calibrate (when needed), export the three graphs, bake VAR, write the bundle atomically."""
    require_extra("torch", "exporting a model (`var-export export`, `var-export --model M --out X`)")
    import onnx_ir as ir

    from var_export.bundle import write_bundle
    from var_export.calibration.calibrate import calibrate, load_calibration
    from var_export.export import export_graphs
    from var_export.hf_layout import hf_config_files
    from var_export.inputs import calibration_samples
    from var_export.models import load_llava, model_fingerprint, resolve_model, text_config_dims
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var, save_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = resolve_model(opts.model)
    loaded = load_llava(
        spec,
        dtype=opts.dtype,
        attn_implementation="eager",
        trust_remote_code=opts.trust_remote_code,
        allow_pickle=opts.allow_pickle,
    )
    num_layers, _, _, _, hidden = text_config_dims(loaded.config)
    fingerprint = model_fingerprint(loaded.config)
    timings["load"] = time.perf_counter() - t0

    cal = None
    if opts.calibration is not None:
        cal = load_calibration(opts.calibration, fingerprint=fingerprint)
    overrides = dict(opts.overrides)
    if opts.heads:
        overrides["heads"] = opts.heads
    settings = None
    if not opts.no_var:
        if _needs_calibration(opts, spec.preset):
            t = time.perf_counter()
            # calibrate() takes the knobs from `base` but not its sink dims (user > data > preset);
            # the placeholder only satisfies VarSettings for a model with no preset and no --sink-dims
            # (a preset may leave sink_dims null: unpublished for the model, calibration finds them)
            preset = dict(spec.preset or {})
            preset["sink_dims"] = preset.get("sink_dims") or [0]
            base = resolve_settings(preset=preset, overrides=overrides, convention=opts.convention)
            cal = calibrate(
                loaded,
                calibration_samples(opts.data),
                base,
                head_threshold=opts.head_threshold,
                preset_sink_dims=(spec.preset or {}).get("sink_dims"),
                user_sink_dims=overrides.get("sink_dims"),
                progress=progress,
            )
            timings["calibrate"] = time.perf_counter() - t
        settings = resolve_settings(
            preset=spec.preset, calibration=cal, overrides=overrides, convention=opts.convention
        )
        settings.check_model(num_layers, hidden)
        if settings.heads != "dynamic":
            if cal is None:
                raise CalibrationError(
                    f"--heads {settings.heads} bakes calibrated heads, but no calibration is available: "
                    "pass --calibration calibration.json or let the command calibrate (omit --calibration)."
                )
            if not cal.get("heads") and settings.heads == "static":
                log.warning("calibration selected no image-centric head: the static graph changes nothing")

    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".var-export-", dir=out.parent) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        exported = export_graphs(
            loaded.model, work / "graphs", dtype=opts.dtype, opset=opts.opset, fused=opts.fused,
            progress=_export_progress(progress),
        )
        timings["export"] = time.perf_counter() - t
        graphs = dict(exported.paths)
        var_layers: list[int] = []
        heads: list[list[int]] = []
        if settings is not None:
            t = time.perf_counter()
            heads = [list(map(int, h)) for h in (cal or {}).get("heads", [])] if settings.heads != "dynamic" else []
            model = ir.load(graphs[DECODER])
            apply = apply_fused_var if opts.fused else apply_var
            model, report = apply(
                model, settings, [tuple(h) for h in heads] if settings.heads != "dynamic" else None,
                num_layers=num_layers,
            )
            var_path = work / "var" / DECODER
            var_path.parent.mkdir()
            save_model(model, var_path)
            graphs[DECODER] = var_path
            var_layers = list(report.var_layers)
            timings["passes"] = time.perf_counter() - t
        manifest_fields = {
            "model_id": spec.name,
            "fingerprint": fingerprint,
            "var": settings.to_dict() if settings else None,
            "var_layers": var_layers,
            "head_mode": settings.heads if settings else None,
            "heads": heads,
            "opset": exported.opset,
            "dtype": opts.dtype,
            "formulation": ("fused-qk" if opts.fused else "naive") if settings else None,
            **_token_facts(loaded.config),
            **_family_facts(loaded.config),
        }
        t = time.perf_counter()
        bundle_dir = write_bundle(
            out, graphs=graphs, manifest_fields=manifest_fields, calibration=cal, processor=loaded.processor,
            extra_files=hf_config_files(loaded.config, work / "hf"),  # AutoConfig works on the bundle
        )
        timings["bundle"] = time.perf_counter() - t
    triton_dir = None
    if opts.triton:
        from var_export.bundle import load_bundle
        from var_export.triton import write_triton_repository

        triton_dir = write_triton_repository(load_bundle(bundle_dir), out.with_name(out.name + "-triton"))
    layout_dir = None
    if opts.layout == "transformers.js":
        from var_export.hf_layout import write_transformers_js_layout

        layout_dir = write_transformers_js_layout(bundle_dir, out.with_name(out.name + "-transformers.js"))
    elif opts.layout != "bundle":
        raise ConfigError(f"layout must be 'bundle' or 'transformers.js'; found {opts.layout!r}.")
    files = {p.name: p.stat().st_size for p in sorted(Path(bundle_dir).iterdir()) if p.is_file()}
    timings["total"] = time.perf_counter() - t0
    return BuildResult(
        bundle_dir=Path(bundle_dir),
        settings=settings,
        calibration=cal,
        var_layers=var_layers,
        heads=heads,
        files=files,
        timings=timings,
        triton_dir=triton_dir,
        layout_dir=layout_dir,
    )


def _token_facts(config: Any) -> dict[str, Any]:
    """What the runtime needs from the config without loading it: limits and special tokens."""
    text = getattr(config, "text_config", config)
    return {
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "image_token_id": getattr(config, "image_token_id", None),
        "eos_token_id": getattr(text, "eos_token_id", None),
    }


def _family_facts(config: Any) -> dict[str, Any]:
    """The model family (the runtime's key to its hooks) and the facts its numpy hooks need."""
    from var_export.families import family_of

    family = family_of(config)
    return {"family": family.name, **family.manifest_fields(config)}


def _export_progress(progress: Any):
    """Adapt a rich Progress (add_task/update) to export_graphs' callback (name, done, total)."""
    if progress is None:
        return None
    task = progress.add_task("export graphs", total=3)

    def report(name: str, done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=f"export {name}")

    return report


def plan_paths(plan: Path) -> tuple[Path, Path]:
    """``X.plan`` → (the decoder engine path, the bundle directory written beside it)."""
    plan = Path(plan)
    if plan.suffix != ".plan":
        raise ConfigError(f"expected a path ending in .plan for a TensorRT engine, found {plan}.")
    return plan, plan.with_name(plan.stem + "_bundle")


def build_plan(
    opts: BuildOptions,
    progress: Any = None,
    *,
    engine: Any = None,
    engine_progress: Any = None,
) -> tuple[BuildResult, Any]:
    """Build the bundle beside ``opts.out`` (a .plan path), then the TensorRT engines of its
    three graphs (:func:`var_export.trt.build_engines`; ``engine``: a ``trt.BuildConfig``).

    Returns (the bundle's BuildResult, the ``trt.EngineSet``). Refuses up front an ``--out``
    that would replace files this tool did not write. Without a usable TensorRT the bundle is
    kept and ``TensorRTUnavailableError`` says how to finish (``var-export build-trt``).
    """
    from var_export.trt import BuildConfig, build_engines, engine_manifest_path, engine_paths
    from var_export.trt.build import check_replaceable

    plan, bundle_dir = plan_paths(opts.out)
    check_replaceable(engine_paths(plan, list(GRAPH_FILES)), engine_manifest_path(plan))
    result = build_bundle(dataclasses.replace(opts, out=bundle_dir), progress=progress)
    try:
        engines = build_engines(result.bundle_dir, plan, engine or BuildConfig(), progress=engine_progress)
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            f"{exc}\nThe ONNX bundle is complete and kept at {result.bundle_dir}. To finish on a "
            f"machine with TensorRT run:\n  var-export build-trt {result.bundle_dir} --out {plan}"
        ) from None
    return result, engines
