"""The whole job as library calls: model → (calibration) → graphs → VAR passes → bundle.

``build_bundle`` is what ``var-export --model M --out DIR`` and ``var-export export`` run;
``build_plan`` adds the TensorRT engine for ``--out X.plan``. The CLI only parses
arguments into ``BuildOptions`` and reports the ``BuildResult``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from var_export.core.contract import DECODER, GRAPH_FILES
from var_export.core.errors import CalibrationError, ConfigError, TensorRTUnavailableError
from var_export.core.extras import require_extra
from var_export.core.settings import HeadMode, VarSettings, check_overrides, resolve_settings

log = logging.getLogger(__name__)



# naive: eager export, VAR on the Softmax; fused-*: SDPA export (ONNX Attention), VAR as class
# masses + a score shift; kernel: SDPA export, each VAR layer's Attention -> var_export::VarAttention
FORMULATIONS: tuple[str, ...] = ("naive", "fused-qk", "fused-mask", "kernel")


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
    formulation: str | None = None  # naive | fused-qk | fused-mask | kernel; None: fused-qk with fused, else naive
    trust_remote_code: bool = False
    allow_pickle: bool = False
    triton: bool = False  # also write a Triton model repository beside the bundle
    allow_noop: bool = False  # accept a hybrid/static bundle whose calibration selected no head
    verify: bool = True  # strict shape inference + ORT load of every graph before it is written
    layout: str = "bundle"  # "transformers.js": also write OUT-transformers.js (var_export.hf_layout)

    def __post_init__(self) -> None:
        check_overrides(self.overrides, self.convention)  # bad knobs fail before any work
        if self.formulation is None:
            self.formulation = "fused-qk" if self.fused else "naive"
        if self.formulation not in FORMULATIONS:
            raise ConfigError(f"--formulation must be one of {', '.join(FORMULATIONS)}; found {self.formulation!r}.")
        if self.fused and self.formulation == "naive":
            raise ConfigError("--fused exports ONNX Attention ops, which the naive formulation does not read; "
                              "drop --fused, or pick --formulation fused-qk, fused-mask or kernel.")
        if self.formulation == "kernel" and self.dtype != "fp32":
            raise ConfigError("--formulation kernel runs fp32 graphs (ONNX Runtime's CPU execution provider); "
                              f"found --dtype {self.dtype}. Use --formulation fused-qk for fp16.")
        if self.formulation == "kernel" and self.layout == "transformers.js":
            raise ConfigError("--layout transformers.js: onnxruntime-web cannot load the kernel formulation's "
                              "custom op (var_export::VarAttention); use --formulation naive or fused-qk for it.")
        self.fused = self.formulation != "naive"  # every other formulation reads the SDPA export


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


def triton_dir_for(out: Path) -> Path:
    """Where ``--format triton`` writes the Triton repository: beside the bundle."""
    return Path(out).with_name(Path(out).name + "-triton")


def check_outputs(opts: BuildOptions) -> list[Path]:
    """Refuse, before any work, outputs that may not be written (var_export.outputs rules) and
    option values out of range."""
    from var_export.outputs import check_target

    if opts.out is None or not str(opts.out).strip():
        raise ConfigError("no output: pass --out DIR (the bundle folder to write).")
    if not (isinstance(opts.head_threshold, (int, float)) and 0.0 <= opts.head_threshold <= 1.0):
        raise ConfigError(f"--head-threshold must be a number in [0, 1], found {opts.head_threshold!r}.")
    if opts.opset is not None and not (isinstance(opts.opset, int) and 14 <= opts.opset <= 25):
        raise ConfigError(f"--opset must be an ONNX opset in 14..25 (default 18; 23 with --fused), found {opts.opset!r}.")
    if opts.layout not in ("bundle", "transformers.js"):
        raise ConfigError(f"layout must be 'bundle' or 'transformers.js'; found {opts.layout!r}.")
    targets = [check_target(opts.out, "dir", what="bundle folder")]
    if opts.layout == "transformers.js":
        targets.append(check_target(Path(opts.out).with_name(Path(opts.out).name + "-transformers.js"), "dir",
                                    what="transformers.js layout"))
    if opts.triton:
        targets.append(check_target(triton_dir_for(opts.out), "dir", what="Triton repository"))
    return targets


def refuse_noop(cal: dict[str, Any] | None, mode: str, head_threshold: float) -> None:
    """A hybrid/static bundle from a calibration with no selected head changes nothing: refuse,
    with the best head scores found and what to do (DESIGN.md §5)."""
    scored = []
    for layer in (cal or {}).get("layers", []) or []:
        if isinstance(layer, dict):
            for head, score in enumerate(layer.get("image_centric_score") or []):
                if isinstance(score, (int, float)):
                    scored.append((float(score), int(layer.get("layer", -1)), head))
    best = ", ".join(f"L{la}H{h}={sc:.3f}" for sc, la, h in sorted(scored, reverse=True)[:5]) or "none scored"
    raise CalibrationError(
        f"calibration selected no image-centric head (threshold {head_threshold}; best scores: {best}), "
        f"so a --heads {mode} graph would change nothing. Use --heads dynamic (per-row test on every "
        "head), a lower --head-threshold, or more/other calibration data (--data DIR); pass "
        "--allow-noop to write the unchanged graph anyway."
    )


def build_bundle(opts: BuildOptions, progress: Any = None) -> BuildResult:
    """Calibrate (when needed), export the three graphs, bake VAR, write the bundle atomically.

    Outputs (the bundle, and the Triton repository with ``triton``) are checked before any work
    and replaced together or not at all (:mod:`var_export.outputs`).
    """
    from var_export.models import resolve_model
    from var_export.outputs import Outputs

    check_outputs(opts)
    require_extra("torch", "exporting a model (`var-export export`, `var-export --model M --out X`)")
    spec = resolve_model(opts.model)
    with Outputs() as tx:
        return _build(opts, spec, tx, progress)


def _build(opts: BuildOptions, spec: Any, tx: Any, progress: Any) -> BuildResult:
    from var_export.models import model_fingerprint, text_config_dims

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = _load(opts, spec)
    num_layers, _, _, _, hidden = text_config_dims(loaded.config)
    fingerprint = model_fingerprint(loaded.config)
    timings["load"] = time.perf_counter() - t0
    settings, cal = _settings(opts, spec, loaded, fingerprint, num_layers, hidden, timings, progress)

    out = Path(opts.out)
    work = tx.scratch(out.parent)
    graphs, opset, var_layers, heads = _graphs(opts, loaded, settings, cal, num_layers, work, timings, progress)
    manifest_fields = {
        "model_id": spec.name,
        "fingerprint": fingerprint,
        "var": settings.to_dict() if settings else None,
        "var_layers": var_layers,
        "head_mode": settings.heads if settings else None,
        "heads": heads,
        "opset": opset,
        "dtype": opts.dtype,
        "formulation": opts.formulation if settings else None,
        **_token_facts(loaded.config),
        **_family_facts(loaded.config),
    }
    if opts.verify:  # never write a graph that does not load
        _verify(graphs, timings)
    stage, triton_dir = _stage_outputs(opts, tx, out, graphs, manifest_fields, cal, loaded, work, timings)
    files = {p.name: p.stat().st_size for p in sorted(stage.iterdir()) if p.is_file()}
    tx.commit()  # the bundle and the Triton repository together, or neither
    layout_dir = None
    if opts.layout == "transformers.js":
        from var_export.hf_layout import write_transformers_js_layout

        layout_dir = write_transformers_js_layout(out, out.with_name(out.name + "-transformers.js"))
    timings["total"] = time.perf_counter() - t0
    return BuildResult(
        bundle_dir=out, settings=settings, calibration=cal, var_layers=var_layers, heads=heads,
        files=files, timings=timings, triton_dir=triton_dir, layout_dir=layout_dir,
    )


def _load(opts: BuildOptions, spec: Any) -> Any:  # noqa: ANN401 - models.LoadedModel
    """The model, eager attention (the VAR passes read its explicit softmax), in ``opts.dtype``."""
    from var_export.models import load_llava

    return load_llava(
        spec,
        dtype=opts.dtype,
        attn_implementation="eager",
        trust_remote_code=opts.trust_remote_code,
        allow_pickle=opts.allow_pickle,
    )


def _verify(graphs: dict[str, Path], timings: dict[str, float]) -> None:
    """Load every graph in ONNX Runtime before anything is written."""
    from var_export.verify import verify_graph

    t = time.perf_counter()
    for path in graphs.values():
        verify_graph(path)
    timings["verify"] = time.perf_counter() - t


def _stage_outputs(
    opts: BuildOptions, tx: Any, out: Path, graphs: dict[str, Path], manifest_fields: dict[str, Any],
    cal: dict[str, Any] | None, loaded: Any, work: Path, timings: dict[str, float],
) -> tuple[Path, Path | None]:
    """Stage the bundle folder (and with ``opts.triton`` the Triton repository) in ``tx``;
    returns (staged bundle folder, final Triton repository folder or None)."""
    from var_export.bundle import fill_bundle
    from var_export.hf_layout import hf_config_files

    t = time.perf_counter()
    stage = tx.stage_dir(out, what="bundle folder")
    fill_bundle(stage, graphs=graphs, manifest_fields=manifest_fields, calibration=cal,
                processor=loaded.processor,
                extra_files=hf_config_files(loaded.config, work / "hf"))  # AutoConfig works on the bundle
    timings["bundle"] = time.perf_counter() - t
    triton_dir = None
    if opts.triton:  # a self-contained repository (the bundle copied in), staged with the bundle
        from var_export.bundle import load_bundle
        from var_export.triton import write_triton_repository

        triton_dir = triton_dir_for(out)
        write_triton_repository(load_bundle(stage), tx.stage_dir(triton_dir, what="Triton repository"),
                                copy_bundle=True, overwrite=True)
    return stage, triton_dir


def _settings(
    opts: BuildOptions, spec: Any, loaded: Any, fingerprint: Any, num_layers: int, hidden: int,
    timings: dict[str, float], progress: Any,
) -> tuple[VarSettings | None, dict[str, Any] | None]:
    """The VAR settings and the calibration (loaded, or computed when needed)."""
    from var_export.calibration.calibrate import calibrate, load_calibration
    from var_export.inputs import calibration_samples

    cal = None
    if opts.calibration is not None:
        cal = load_calibration(opts.calibration, fingerprint=fingerprint)
    overrides = dict(opts.overrides)
    if opts.heads:
        overrides["heads"] = opts.heads
    if opts.no_var:
        return None, cal
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
    settings = resolve_settings(preset=spec.preset, calibration=cal, overrides=overrides, convention=opts.convention)
    settings.check_model(num_layers, hidden)
    if settings.heads != "dynamic":
        if cal is None:
            raise CalibrationError(
                f"--heads {settings.heads} bakes calibrated heads, but no calibration is available: "
                "pass --calibration calibration.json or let the command calibrate (omit --calibration)."
            )
        if not cal.get("heads"):  # never a silent no-op
            if not opts.allow_noop:
                refuse_noop(cal, settings.heads, opts.head_threshold)
            log.warning("calibration selected no image-centric head: the %s graph changes nothing "
                        "(--allow-noop)", settings.heads)
    return settings, cal


def _graphs(
    opts: BuildOptions, loaded: Any, settings: VarSettings | None, cal: dict[str, Any] | None,
    num_layers: int, work: Path, timings: dict[str, float], progress: Any,
) -> tuple[dict[str, Path], int, list[int], list[list[int]]]:
    """Export the three graphs into ``work`` and bake VAR into the decoder.

    Returns (bundle file name -> graph path, opset, VAR layers, baked heads)."""
    import onnx_ir as ir

    from var_export.export import export_graphs
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var, save_model

    t = time.perf_counter()
    exported = export_graphs(
        loaded.model, work / "graphs", dtype=opts.dtype, opset=opts.opset, fused=opts.fused,
        progress=_export_progress(progress),
    )
    timings["export"] = time.perf_counter() - t
    graphs = dict(exported.paths)
    if settings is None:
        return graphs, exported.opset, [], []
    t = time.perf_counter()
    heads = [list(map(int, h)) for h in (cal or {}).get("heads", [])] if settings.heads != "dynamic" else []
    model = ir.load(graphs[DECODER])
    baked = [tuple(h) for h in heads] if settings.heads != "dynamic" else None
    if opts.formulation == "naive":
        model, report = apply_var(model, settings, baked, num_layers=num_layers)
    else:
        shift = "kernel" if opts.formulation == "kernel" else str(opts.formulation).split("-", 1)[1]
        model, report = apply_fused_var(model, settings, baked, num_layers=num_layers, shift=shift)  # type: ignore[arg-type]
    var_path = work / "var" / DECODER
    var_path.parent.mkdir()
    save_model(model, var_path)
    graphs[DECODER] = var_path
    timings["passes"] = time.perf_counter() - t
    return graphs, exported.opset, list(report.var_layers), heads


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
    if opts.formulation == "kernel":
        from var_export.trt.build import KERNEL_REFUSAL

        raise ConfigError(f"--out {plan}: " + KERNEL_REFUSAL)
    # before the minutes of bundle work: engines this tool did not write, and the bundle folder
    check_replaceable(engine_paths(plan, list(GRAPH_FILES)), engine_manifest_path(plan))
    check_outputs(dataclasses.replace(opts, out=bundle_dir))
    result = build_bundle(dataclasses.replace(opts, out=bundle_dir), progress=progress)
    try:
        engines = build_engines(result.bundle_dir, plan, engine or BuildConfig(), progress=engine_progress)
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            f"{exc}\nThe ONNX bundle is complete and kept at {result.bundle_dir}. To finish on a "
            f"machine with TensorRT run:\n  var-export build-trt {result.bundle_dir} --out {plan}"
        ) from None
    return result, engines
