"""``var-export inspect``: pictures of what VAR sees and does, for one image and one prompt.

Runs the *PyTorch* model through the VAR reference (``calibration.reference``), not ONNX Runtime:
the ORT graphs do not output attention probabilities or sink flags. Writes to ``out_dir``:

* ``sinks.png``        the image (as the model sees it) with its visual-sink patches outlined,
                       one panel per VAR layer (one union panel when there are many layers);
* ``sink_counts.png``  per decoder layer, the sink tokens that are visual vs text, as bars;
* ``head_scores.png``  the per-head image-centric score (layers x heads), selected heads boxed;
* ``attention_<L>_<H>.png``  the last prompt token's attention over the image grid, before and
                       after VAR on one head, shared colour scale, and the mass moved;
* ``summary.json``     the numbers behind the pictures.

Visual token ``k`` (in prompt order) is patch ``(k // grid, k % grid)`` of the
``image_size / patch_size`` grid of the vision tower (a leading CLS feature, when the model keeps
it, is dropped from the grid).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import BundleError, CalibrationError, ConfigError, DataError
from var_export.core.settings import VarSettings
from var_export.inputs import load_image

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
SINKS_PNG = "sinks.png"
SINK_COUNTS_PNG = "sink_counts.png"
HEAD_SCORES_PNG = "head_scores.png"
MAX_LAYER_PANELS = 12  # more VAR layers than this: one union panel instead of one per layer
DEFAULT_HEAD_THRESHOLD = 0.5  # on-the-fly calibration (--model): score needed to select a head


@dataclasses.dataclass
class InspectResult:
    """What ``inspect_model`` wrote and the numbers behind it (also in summary.json)."""

    out_dir: Path
    files: list[Path]  # the PNGs and summary.json, in out_dir
    layer: int  # the layer of the attention picture
    head: int  # its query head
    summary: dict[str, Any]  # the content of summary.json


# ---------------------------------------------------------------------------------------------
# capture: one prefill step through the reference, observing sinks, scores and one head
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Capture:
    """What one reference step showed us (sample 0 of a batch of 1)."""

    sinks: dict[int, np.ndarray]  # layer -> (T,) bool sink flags at that layer's input
    visual: np.ndarray  # (T,) bool visual token positions
    valid: np.ndarray  # (T,) bool not padding
    eligible: np.ndarray  # (T,) bool rows VAR may change
    attn_before: np.ndarray | None  # (H, T) the probed layer's last-row attention before VAR
    attn_after: np.ndarray | None  # (H, T) ... after VAR
    whole_tile: str | None = None  # tiled images: which tile is the whole image, "first" | "last"


def _run_reference(
    model: Any,
    batch: dict[str, Any],
    settings: VarSettings,
    heads: Sequence[tuple[int, int]] | None,
    probe_layer: int,
) -> _Capture:
    """One prefill step with VAR; sinks of every layer and one layer's attention (last row)."""
    import torch

    from var_export.calibration.reference import eligible_rows, multimodal_embeds, prompt_positions
    from var_export.families import family_of

    observer = _sink_recorder(settings)
    ref = _probe_reference(probe_layer)(model, settings, heads=heads, observer=observer)
    input_ids = batch["input_ids"]
    mask = batch["attention_mask"].long()
    visual = batch["visual_token_mask"].to(torch.bool)
    position_ids, _ = prompt_positions(model, batch)  # (B, S), or (3, B, S) for M-RoPE
    with torch.no_grad():
        extra = {k: batch[k] for k in family_of(model).processor_keys if k in batch}  # image_sizes, ...
        embeds = multimodal_embeds(model, input_ids, batch["pixel_values"], **extra)  # (B, S, D)
        ref.step(embeds, mask, position_ids, None, visual, None)

    valid = mask != 0
    eligible = eligible_rows(visual & valid, valid, 0)  # (B, S)
    return _Capture(
        sinks={layer: s[0].cpu().numpy().astype(bool) for layer, s in observer.sinks.items()},
        visual=(visual & valid)[0].cpu().numpy(),
        valid=valid[0].cpu().numpy(),
        eligible=eligible[0].cpu().numpy(),
        attn_before=None if ref.before is None else ref.before.cpu().numpy(),
        attn_after=None if ref.after is None else ref.after.cpu().numpy(),
        whole_tile=_whole_tile(batch["pixel_values"]),
    )


def _sink_recorder(settings: VarSettings) -> Any:  # noqa: ANN401 - a calibration.reference.VarObserver
    """An observer that records every layer's sink flags (B, T) in ``.sinks``: the reference's own
    at VAR layers, the would-be flags at the other layers."""
    import torch

    from var_export.calibration.reference import VarObserver, sink_flags

    class Observer(VarObserver):
        def __init__(self) -> None:
            self.sinks: dict[int, torch.Tensor] = {}  # layer -> (B, T)

        def layer_input(self, layer, hidden, valid, past_len) -> None:  # noqa: D102
            # every layer, so non-VAR layers show their would-be sinks too
            self.sinks.setdefault(layer, sink_flags(hidden, settings.sink_dims, settings.tau) & valid)

        def layer_sinks(self, layer, sink, visual, valid, past_len) -> None:  # noqa: D102
            self.sinks[layer] = sink & valid  # the reference's own flags at VAR layers

    return Observer()


def _probe_reference(probe_layer: int) -> type:
    """The VarReference class that records ``probe_layer``'s last query row (H, T) of the first
    sample before (``.before``) and after (``.after``) VAR."""
    import torch

    from var_export.calibration.reference import VarReference

    class Probe(VarReference):
        """The reference, recording the probed layer's last query row before and after VAR."""

        before: torch.Tensor | None = None
        after: torch.Tensor | None = None

        def _apply_var(self, state, layer, attn):  # (B, H, S, T)
            out = super()._apply_var(state, layer, attn)
            if layer == probe_layer and state.ref is self:
                self.before = attn[0, :, -1].float().clone()  # (H, T)
                self.after = out[0, :, -1].float().clone()
            return out

    return Probe


def _whole_tile(pixel_values: Any) -> str | None:
    """Which tile shows the whole image: LLaVA-NeXT / OneVision (B, tiles, 3, H, W) put the base
    tile first; InternVL (tiles, 3, H, W) with several tiles puts the thumbnail last."""
    if pixel_values.dim() == 5:
        return "first"
    return "last" if pixel_values.shape[0] > 1 else None


# ---------------------------------------------------------------------------------------------
# geometry and calibration numbers
# ---------------------------------------------------------------------------------------------


def patch_grid(config: Any, batch: Any = None) -> tuple[int, int]:
    """(rows, cols) of the image-token grid: image_size / patch_size per side, or for dynamic
    resolution (Qwen-VL, ``image_grid_thw`` in ``batch``) the image's (h, w) / spatial_merge_size."""
    vision = getattr(config, "vision_config", None)
    if batch is not None and batch.get("image_grid_thw") is not None:
        _, h, w = (int(x) for x in batch["image_grid_thw"][0])
        merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        return h // merge, w // merge
    size = getattr(vision, "image_size", None)
    patch = getattr(vision, "patch_size", None)
    if not size or not patch:
        raise ConfigError(
            f"expected a vision_config with image_size and patch_size in the model config, found "
            f"{type(vision).__name__ if vision is not None else 'none'}; inspect supports LLaVA-style models."
        )
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    side = int(size) // int(patch)
    ratio = getattr(config, "downsample_ratio", None)  # InternVL: pixel shuffle pools ratio^-2 patches
    if ratio:
        side = int(side * float(ratio))
    return side, side


def visual_token_cells(n_visual: int, grid: tuple[int, int], *, whole_tile: str | None = None) -> tuple[int, int]:
    """(offset, count): which visual tokens map onto the grid (offset 1 = a leading CLS feature).

    ``whole_tile`` (tiled images): the grid shows the tile that holds the whole image, the
    ``"first"`` one (LLaVA-NeXT / OneVision: base tile, then the high-resolution tiles and
    newlines) or the ``"last"`` one (InternVL: crops, then the thumbnail).
    """
    cells = grid[0] * grid[1]
    if whole_tile is not None and n_visual > cells:
        return (0 if whole_tile == "first" else n_visual - cells), cells
    if n_visual == cells:
        return 0, cells
    if n_visual == cells + 1:
        return 1, cells
    raise DataError(
        f"the prompt has {n_visual} image tokens, expected {cells} (a {grid[0]}x{grid[1]} patch grid) "
        f"or {cells + 1} (with CLS); inspect supports one single-resolution image per prompt."
    )


def head_score_matrix(
    calibration: dict[str, Any] | None, num_layers: int, num_heads: int
) -> np.ndarray:
    """(L, H) image-centric scores from var_export.calibration.json ``layers[i].image_centric_score``; NaN
    where the file has none (layers outside VAR, or no calibration)."""
    scores = np.full((num_layers, num_heads), np.nan)
    for entry in (calibration or {}).get("layers", []):
        layer, row = int(entry["layer"]), entry.get("image_centric_score") or []
        if len(row) != num_heads or not 0 <= layer < num_layers:
            raise CalibrationError(
                f"calibration.json layer {layer} has {len(row)} head scores; expected {num_heads} heads "
                f"on a layer in 0..{num_layers - 1}. Was it made for another model?"
            )
        scores[layer] = [np.nan if v is None else float(v) for v in row]
    return scores


def calibration_heads(calibration: dict[str, Any] | None) -> list[tuple[int, int]]:
    return [(int(h[0]), int(h[1])) for h in (calibration or {}).get("heads", [])]


def choose_head(
    scores: np.ndarray,
    selected: Sequence[tuple[int, int]],
    var_layers: Sequence[int],
    layer: int | None,
    head: int | None,
) -> tuple[int, int]:
    """The (layer, head) to draw: the given ones, else the best-scoring selected head (of a VAR layer)."""
    num_layers, num_heads = scores.shape
    if layer is not None and not 0 <= layer < num_layers:
        raise ConfigError(f"--layer {layer} is out of range: the model has {num_layers} decoder layers (0..{num_layers - 1}).")
    if head is not None and not 0 <= head < num_heads:
        raise ConfigError(f"--head {head} is out of range: the model has {num_heads} query heads (0..{num_heads - 1}).")
    if layer is not None and layer not in var_layers:
        raise ConfigError(
            f"--layer {layer} is not a VAR layer, so VAR never changes its attention; "
            f"VAR layers: {list(var_layers)}."
        )
    filled = np.where(np.isnan(scores), -1.0, scores)

    def best(cands: list[tuple[int, int]]) -> tuple[int, int]:
        return max(cands, key=lambda lh: (filled[lh], -lh[0], -lh[1]))

    cands = [(lay, h) for lay, h in selected if lay in var_layers]
    if layer is not None:
        cands = [c for c in cands if c[0] == layer] or [(layer, h) for h in range(num_heads)]
    if head is not None:
        cands = [c for c in cands if c[1] == head] or [(lay, head) for lay in ([layer] if layer is not None else var_layers)]
    if not cands:
        cands = [(lay, h) for lay in var_layers for h in range(num_heads)]
    return best(cands)


# ---------------------------------------------------------------------------------------------
# the library entry points
# ---------------------------------------------------------------------------------------------


def inspect_model(
    loaded_model: Any,
    image: Any,
    prompt: str,
    settings: VarSettings,
    calibration: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    layer: int | None = None,
    head: int | None = None,
) -> InspectResult:
    """Run the PyTorch model with the VAR reference on (image, prompt) and draw what happened.

    ``loaded_model``: a ``var_export.models.LoadedModel`` (model, processor, config, spec).
    ``calibration``: the calibration.json dict (head scores and heads), or None = no scores
    (static/hybrid modes then need one). ``layer``/``head``: the attention picture, default the
    selected head with the highest score. Writes the files atomically (temp dir, then rename).
    """
    model, processor, config = loaded_model.model, loaded_model.processor, loaded_model.config
    pil = load_image(image)
    text_cfg = getattr(config, "text_config", config)
    num_layers, num_heads = int(text_cfg.num_hidden_layers), int(text_cfg.num_attention_heads)
    settings.check_model(num_layers, int(text_cfg.hidden_size))
    var_layers = settings.var_layers(num_layers)
    scores = head_score_matrix(calibration, num_layers, num_heads)
    selected = calibration_heads(calibration)
    if settings.heads != "dynamic" and calibration is None:
        raise ConfigError(
            f"--heads {settings.heads} needs calibrated heads; give a bundle (it has calibration.json) "
            "or use --heads dynamic."
        )
    layer, head = choose_head(scores, selected, var_layers, layer, head)

    batch = _prepare(processor, pil, prompt)
    grid = patch_grid(config, batch)
    cap = _run_reference(
        model, batch, settings, selected if settings.heads != "dynamic" else None, layer
    )
    summary = _summarize(
        cap, batch, processor, settings, num_layers, num_heads, var_layers, grid, scores, selected,
        calibration, layer, head,
    )
    spec = getattr(loaded_model, "spec", None)
    summary["model_id"] = str(getattr(spec, "model_id", None) or getattr(spec, "name", None) or "")
    summary["prompt"] = prompt
    pixel_values = batch["pixel_values"]
    if batch.get("image_grid_thw") is not None:  # Qwen-VL flattened patches -> (1, 3, H, W)
        from var_export.families.qwen import unpatchify

        pixel_values = unpatchify(pixel_values, batch["image_grid_thw"][:1], processor.image_processor)[None]
    image_array = _model_view(pixel_values, processor)
    return _write(Path(out_dir), summary, image_array)



def calibrate_on_sample(
    loaded_model: Any, image: Any, prompt: str, settings: VarSettings, *, head_threshold: float = DEFAULT_HEAD_THRESHOLD
) -> dict[str, Any]:
    """Head scores (and heads) from this one (image, prompt): ``calibrate`` on a single sample."""
    from var_export.calibration.calibrate import calibrate

    cal = calibrate(
        loaded_model, [(load_image(image), prompt)], settings, head_threshold=head_threshold,
        user_sink_dims=settings.sink_dims,
    )
    cal["inspect_source"] = "computed from this image"
    return cal


def inspect_bundle(
    bundle_dir: str | Path,
    image: Any,
    prompt: str,
    out_dir: str | Path,
    *,
    layer: int | None = None,
    head: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> InspectResult:
    """``inspect BUNDLE``: the bundle's model (its ``model_id``), VAR settings and calibration.json."""
    from var_export.bundle import load_bundle
    from var_export.models import load_llava, model_fingerprint
    from var_export.outputs import check_target

    pil = load_image(image)  # a bad image fails before a model is loaded
    check_target(out_dir, "dir", what="inspect folder")
    bundle = load_bundle(Path(bundle_dir), verify=False)  # the graphs are not used: sizes only
    if not bundle.var:
        raise BundleError(
            f"bundle {bundle_dir} was exported without VAR (--no-var): there is nothing to inspect. "
            "Use a VAR bundle or `var-export inspect --model M`."
        )
    model_id = bundle.manifest["model_id"]
    # a hub id read from a file is never downloaded: only a local copy (HF cache) is used
    loaded = load_llava(model_id, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, offline=True)
    fingerprint = model_fingerprint(loaded.config)
    if bundle.manifest.get("fingerprint") not in (None, fingerprint):
        raise BundleError(
            f"bundle {bundle_dir} was built from a different model than {model_id!r} is now "
            "(fingerprint mismatch); re-export the bundle or inspect with --model."
        )
    settings = VarSettings.from_dict(bundle.var)
    calibration = None
    if bundle.calibration_path is not None:
        from var_export.calibration.calibrate import load_calibration

        calibration = load_calibration(bundle.calibration_path, fingerprint=fingerprint)
        calibration["inspect_source"] = f"{Path(bundle_dir).name}/calibration.json"
    else:  # a dynamic bundle with preset sink dims has no calibration: score this image
        calibration = calibrate_on_sample(loaded, pil, prompt, settings)
    return inspect_model(loaded, pil, prompt, settings, calibration, out_dir, layer=layer, head=head)


def inspect_pretrained(
    model: str | None,
    image: Any,
    prompt: str,
    out_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    convention: str = "code",
    head_threshold: float = DEFAULT_HEAD_THRESHOLD,
    layer: int | None = None,
    head: int | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> InspectResult:
    """``inspect --model M``: settings from the preset and ``overrides`` (the VAR knobs); head
    scores computed on the fly from this (image, prompt) with ``calibrate``."""
    from var_export.core.settings import resolve_settings
    from var_export.models import load_llava, resolve_model
    from var_export.outputs import check_target

    pil = load_image(image)
    check_target(out_dir, "dir", what="inspect folder")  # before the model loads
    spec = resolve_model(model)
    loaded = load_llava(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    overrides = dict(overrides or {})
    # sink dims: --sink-dims, else the preset, else found in this image by calibrate
    preset = spec.preset if spec.preset and spec.preset.get("sink_dims") else {**(spec.preset or {}), "sink_dims": [0]}
    base = resolve_settings(preset=preset, overrides=overrides, convention=convention)
    from var_export.calibration.calibrate import calibrate

    calibration = calibrate(
        loaded, [(pil, prompt)], base, head_threshold=head_threshold,
        preset_sink_dims=(spec.preset or {}).get("sink_dims"), user_sink_dims=overrides.get("sink_dims"),
    )
    calibration["inspect_source"] = "computed from this image"
    settings = resolve_settings(preset=spec.preset, calibration=calibration, overrides=overrides, convention=convention)
    return inspect_model(loaded, pil, prompt, settings, calibration, out_dir, layer=layer, head=head)


def _prepare(processor: Any, image: Any, prompt: str) -> dict[str, Any]:
    """input_ids, attention_mask, pixel_values, visual_token_mask for one (image, prompt)."""
    from var_export.inputs import prepare_batch

    return prepare_batch(processor, [image], [prompt])


def _model_view(pixel_values: Any, processor: Any) -> np.ndarray:
    """The image as the vision tower sees it: (H, W, 3) in [0, 1], un-normalised pixel_values."""
    whole = _whole_tile(pixel_values)
    pv = pixel_values[-1] if whole == "last" else pixel_values[0]  # InternVL: the thumbnail tile
    pv = np.asarray(pv.detach().float().cpu().numpy(), dtype=np.float64)  # (3, H, W) or (tiles, 3, H, W)
    if pv.ndim == 4:  # LLaVA-NeXT / OneVision: the base tile is the whole image
        pv = pv[0]
    ip = getattr(processor, "image_processor", None)
    mean = np.asarray(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0], dtype=np.float64)
    std = np.asarray(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0], dtype=np.float64)
    img = pv * std[:, None, None] + mean[:, None, None]
    return np.clip(img.transpose(1, 2, 0), 0.0, 1.0)


def _grid_of(values: np.ndarray, cap: _Capture, grid: tuple[int, int]) -> np.ndarray:
    """(T,) per-position values -> (rows, cols) over the image patch grid."""
    vis_pos = np.flatnonzero(cap.visual)
    offset, count = visual_token_cells(len(vis_pos), grid, whole_tile=cap.whole_tile)
    return values[vis_pos[offset : offset + count]].reshape(grid)


def _masses(row: np.ndarray, cap: _Capture, sink: np.ndarray) -> dict[str, float]:
    """Attention mass of one row (T,) per key class of DESIGN.md §1."""
    vis, valid = cap.visual, cap.valid
    return {
        "visual_sinks": float(row[sink & vis].sum()),
        "text_sinks": float(row[sink & ~vis & valid].sum()),
        "visual_nonsinks": float(row[vis & ~sink].sum()),
        "other_text": float(row[~sink & ~vis & valid].sum()),
    }


def _json_scores(scores: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in scores]


def _layer_sinks(cap: _Capture, num_layers: int, var_layers: list[int], grid: tuple[int, int]) -> list[dict[str, Any]]:
    """Per decoder layer: its visual and text sink counts and the sink patches on the grid."""
    layers = []
    for lay in range(num_layers):
        sink = cap.sinks.get(lay, np.zeros_like(cap.visual))
        patch_mask = _grid_of(sink.astype(np.float64), cap, grid) > 0
        layers.append({
            "layer": lay,
            "var_layer": lay in var_layers,
            "visual_sinks": int((sink & cap.visual).sum()),
            "text_sinks": int((sink & ~cap.visual & cap.valid).sum()),
            "sink_patches": [[int(r), int(c)] for r, c in zip(*np.nonzero(patch_mask))],
        })
    return layers


def _probed_attention(
    cap: _Capture, batch: dict[str, Any], processor: Any, grid: tuple[int, int], layer: int, head: int
) -> dict[str, Any]:
    """The probed (layer, head)'s last query row: its class masses and grid before and after VAR."""
    query = int(np.flatnonzero(cap.valid)[-1])
    token = processor.tokenizer.convert_ids_to_tokens([int(batch["input_ids"][0, query])])[0]
    attention: dict[str, Any] = {"layer": layer, "head": head, "query_position": query, "query_token": token}
    if cap.attn_before is not None and cap.attn_after is not None:
        sink = cap.sinks[layer]
        before, after = cap.attn_before[head], cap.attn_after[head]
        mb, ma = _masses(before, cap, sink), _masses(after, cap, sink)
        attention.update({
            "row_eligible": bool(cap.eligible[query]),
            "row_changed": bool(np.abs(after - before).max() > 0),
            "before": mb,
            "after": ma,
            "moved_from_sinks": mb["visual_sinks"] + mb["text_sinks"] - ma["visual_sinks"] - ma["text_sinks"],
            "gained_by_visual_nonsinks": ma["visual_nonsinks"] - mb["visual_nonsinks"],
            "grid_before": _grid_of(before, cap, grid).round(6).tolist(),
            "grid_after": _grid_of(after, cap, grid).round(6).tolist(),
        })
    return attention


def _summarize(
    cap: _Capture,
    batch: dict[str, Any],
    processor: Any,
    settings: VarSettings,
    num_layers: int,
    num_heads: int,
    var_layers: list[int],
    grid: tuple[int, int],
    scores: np.ndarray,
    selected: list[tuple[int, int]],
    calibration: dict[str, Any] | None,
    layer: int,
    head: int,
) -> dict[str, Any]:
    n_visual = int(cap.visual.sum())
    n_text = int((cap.valid & ~cap.visual).sum())
    layers = _layer_sinks(cap, num_layers, var_layers, grid)
    attention = _probed_attention(cap, batch, processor, grid, layer, head)
    source = None
    if calibration:
        source = calibration.get("inspect_source") or "calibration.json"
    return {
        "schema": 1,
        "settings": settings.to_dict(),
        "var_layers": list(var_layers),
        "grid": list(grid),
        "tokens": {"total": int(cap.valid.sum()), "visual": n_visual, "text": n_text},
        "layers": layers,
        "head_scores": {
            "source": source,
            "num_samples": (calibration or {}).get("num_samples"),
            "scores": _json_scores(scores),
            "selected": [list(h) for h in selected],
        },
        "attention": attention,
    }


# ---------------------------------------------------------------------------------------------
# pictures (matplotlib, object API: no pyplot state)
# ---------------------------------------------------------------------------------------------

SINK_COLOUR = "#e4003a"  # outlines and bars of visual sinks
TEXT_SINK_COLOUR = "#ff9f1c"
NONSINK_COLOUR = "#2a9d8f"
OTHER_COLOUR = "#b8b8b8"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _outline(ax: Any, mask: np.ndarray, colour: str, width: float = 2.0, inset: float = 0.1) -> None:
    """Outline every True cell of a (rows, cols) mask with its own square, inset from the grid
    lines (grid units, cell = 1x1). Each marked patch is boxed by itself, so a mask that covers
    most of the image never reads as its complement (as the boundary of the region would)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    boxes = [Rectangle((c + inset, r + inset), 1 - 2 * inset, 1 - 2 * inset) for r, c in zip(*np.nonzero(mask))]
    if boxes:
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=colour, linewidth=width))


def _grid_axes(ax: Any, grid: tuple[int, int]) -> None:
    rows, cols = grid
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _faint_grid(ax: Any, grid: tuple[int, int]) -> None:
    rows, cols = grid
    for r in range(1, rows):
        ax.axhline(r, color="white", lw=0.4, alpha=0.5)
    for c in range(1, cols):
        ax.axvline(c, color="white", lw=0.4, alpha=0.5)


def _tint(mask: np.ndarray, colour: str, alpha: float) -> np.ndarray:
    from matplotlib.colors import to_rgb

    rgba = np.zeros(mask.shape + (4,))
    rgba[..., :3] = to_rgb(colour)
    rgba[..., 3] = mask * alpha
    return rgba


def _dims(settings: dict[str, Any]) -> str:
    return ", ".join(str(d) for d in settings["sink_dims"])


def plot_sinks(path: Path, summary: dict[str, Any], image: np.ndarray) -> None:
    grid = tuple(summary["grid"])
    extent = (0, grid[1], grid[0], 0)
    layers = [e for e in summary["layers"] if e["var_layer"]]
    masks = {}
    for e in layers:
        m = np.zeros(grid, dtype=bool)
        for r, c in e["sink_patches"]:
            m[r, c] = True
        masks[e["layer"]] = m
    n_cells = grid[0] * grid[1]
    s = summary["settings"]
    if len(layers) <= MAX_LAYER_PANELS:
        n_panels = len(layers) + 1  # the plain image first
        ncols = min(4, n_panels)
        nrows = math.ceil(n_panels / ncols)
        fig = _figure(3.2 * ncols, 3.3 * nrows + 0.9)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        axes[0].imshow(image, extent=extent, interpolation="nearest")
        _faint_grid(axes[0], grid)
        _grid_axes(axes[0], grid)
        axes[0].set_title(f"the image ({grid[0]}x{grid[1]} patches)", fontsize=10)
        for ax, e in zip(axes[1:], layers):
            m = masks[e["layer"]]
            ax.imshow(image, extent=extent, interpolation="nearest")
            ax.imshow(_tint(m, SINK_COLOUR, 0.22), extent=extent, interpolation="nearest")
            _faint_grid(ax, grid)
            _outline(ax, m, SINK_COLOUR, min(2.2, 36 / max(grid)))
            _grid_axes(ax, grid)
            ax.set_title(f"layer {e['layer']}: {int(m.sum())}/{n_cells} patches are sinks", fontsize=10)
        for ax in axes[n_panels:]:
            ax.axis("off")
    else:
        fig = _figure(6.5, 6.4)
        ax = fig.subplots()
        count = sum(m.astype(int) for m in masks.values())
        ax.imshow(image, extent=extent, interpolation="nearest")
        shown = ax.imshow(
            np.where(count > 0, count, np.nan), extent=extent, cmap="Reds", vmin=0, vmax=len(layers),
            alpha=0.55, interpolation="nearest",
        )
        _faint_grid(ax, grid)
        _outline(ax, count > 0, SINK_COLOUR, min(2.0, 36 / max(grid)))
        _grid_axes(ax, grid)
        fig.colorbar(shown, ax=ax, shrink=0.8, label=f"VAR layers (of {len(layers)}) where the patch is a sink")
        ax.set_title(f"{int((count > 0).sum())}/{n_cells} patches are sinks in at least one of "
                     f"{len(layers)} VAR layers (per-layer counts: sink_counts.png)", fontsize=8)
    fig.suptitle(
        f"Visual sink patches (tinted and outlined in red), per VAR layer\na patch is a sink when "
        f"max |rmsnorm(x)[d]| over sink dims {{{_dims(s)}}}\nis > tau = {s['tau']:g} at the layer input",
        fontsize=10,
    )
    fig.savefig(path)


def plot_sink_counts(path: Path, summary: dict[str, Any]) -> None:
    layers = summary["layers"]
    x = np.arange(len(layers))
    vis = np.array([e["visual_sinks"] for e in layers])
    txt = np.array([e["text_sinks"] for e in layers])
    is_var = np.array([e["var_layer"] for e in layers])
    fig = _figure(max(5.5, 0.45 * len(layers) + 2.5), 4.2)
    ax = fig.subplots()
    alpha = np.where(is_var, 1.0, 0.35)
    for i in range(len(layers)):
        ax.bar(x[i], vis[i], color=SINK_COLOUR, alpha=alpha[i], label="visual sinks" if i == 0 else None)
        ax.bar(x[i], txt[i], bottom=vis[i], color=TEXT_SINK_COLOUR, alpha=alpha[i], label="text sinks" if i == 0 else None)
        if len(layers) <= 40:
            ax.text(x[i], vis[i] + txt[i], f"{vis[i]}+{txt[i]}", ha="center", va="bottom", fontsize=8)
    n_vis = summary["tokens"]["visual"]
    ax.axhline(n_vis, color="#555555", ls="--", lw=1)
    ax.text(len(layers) - 0.5, n_vis, f"all {n_vis} image tokens", ha="right", va="bottom", fontsize=8, color="#555555")
    ax.set_xticks(x, [str(e["layer"]) if e["var_layer"] else f"{e['layer']}\n(no VAR)" for e in layers], fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sink tokens in the prompt")
    ax.set_ylim(0, max(n_vis, int((vis + txt).max(initial=0))) * 1.15 + 1)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=SINK_COLOUR, label="visual sinks (image tokens)"),
                 Patch(color=TEXT_SINK_COLOUR, label="text sinks (e.g. BOS)")],
        loc="upper left", fontsize=8, frameon=False,
    )
    ax.spines[["top", "right"]].set_visible(False)
    t = summary["tokens"]
    ax.set_title(
        f"Sink tokens per decoder layer, labelled visual+text\nprompt: {t['visual']} image + "
        f"{t['text']} text tokens; faded bars: not a VAR layer",
        fontsize=10,
    )
    fig.savefig(path)


def plot_head_scores(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib as mpl
    from matplotlib.patches import Rectangle

    hs = summary["head_scores"]
    scores = np.array([[np.nan if v is None else v for v in row] for row in hs["scores"]], dtype=float)
    num_layers, num_heads = scores.shape
    fig = _figure(min(12.0, max(7.0, 0.5 * num_heads + 2.5)), min(10.0, max(3.8, 0.38 * num_layers + 2.0)))
    ax = fig.subplots()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    shown = ax.imshow(np.ma.masked_invalid(scores), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if num_layers * num_heads <= 400:
        for (lay, h), v in np.ndenumerate(scores):
            if not math.isnan(v):
                ax.text(h, lay, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    for lay, h in hs["selected"]:
        ax.add_patch(Rectangle((h - 0.5, lay - 0.5), 1, 1, fill=False, edgecolor=SINK_COLOUR, lw=2.5))
    att = summary["attention"]
    ax.plot(att["head"] + 0.3, att["layer"] - 0.28, marker="*", color="white", markeredgecolor="black",
            markersize=10, ls="")
    ax.set_xticks(range(num_heads), [str(h) for h in range(num_heads)], fontsize=8)
    ax.set_yticks(range(num_layers), [str(lay) for lay in range(num_layers)], fontsize=8)
    ax.set_xlabel("query head")
    ax.set_ylabel("decoder layer")
    fig.colorbar(shown, ax=ax, label="image-centric score")
    s = summary["settings"]
    src = hs["source"] or "none"
    if hs.get("num_samples"):
        n = hs["num_samples"]
        src += f", {n} sample{'s' if n != 1 else ''}"
    ax.set_title(
        f"Image-centric score per head (source: {src})\nshare of eligible rows with "
        f"visual-sink portion <= {s['rho']:g} and visual mass >= {s['summ']:g}\n"
        f"red box: selected head ({len(hs['selected'])}); star: attention_{att['layer']}_{att['head']}.png; "
        "grey: no score",
        fontsize=9,
    )
    fig.savefig(path)


def plot_attention(path: Path, summary: dict[str, Any], image: np.ndarray) -> None:
    att = summary["attention"]
    grid = tuple(summary["grid"])
    extent = (0, grid[1], grid[0], 0)
    before, after = np.array(att["grid_before"]), np.array(att["grid_after"])
    sink = np.zeros(grid, dtype=bool)
    for r, c in summary["layers"][att["layer"]]["sink_patches"]:
        sink[r, c] = True
    vmax = float(max(before.max(), after.max(), 1e-9))
    change = after - before
    cmax = float(max(np.abs(change).max(), 1e-9))
    fig = _figure(17.0, 4.9)
    ax_b, ax_a, ax_c, ax = fig.subplots(1, 4, width_ratios=[1.0, 1.0, 1.0, 1.3])
    for axis, vals, name in ((ax_b, before, "before VAR"), (ax_a, after, "after VAR")):
        shown = axis.imshow(vals, extent=extent, cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
        _outline(axis, sink, "#00e5ff", 1.6)
        _grid_axes(axis, grid)
        axis.set_title(f"{name}: {vals.sum():.3f} on the image", fontsize=10)
    fig.colorbar(shown, ax=[ax_b, ax_a], shrink=0.85, label="attention probability (shared scale)")
    shown = ax_c.imshow(change, extent=extent, cmap="RdBu_r", vmin=-cmax, vmax=cmax, interpolation="nearest")
    _outline(ax_c, sink, "#00b3c7", 1.6)
    _grid_axes(ax_c, grid)
    lost = float(-change[sink].sum())
    ax_c.set_title(
        f"change: sink patches {-lost:+.3f} (over {int(sink.sum())}),\nnon-sink patches "
        f"{float(change[~sink].sum()):+.3f} (over {int((~sink).sum())})",
        fontsize=9,
    )
    fig.colorbar(shown, ax=ax_c, shrink=0.85, label="red: gained, blue: lost")
    classes = [("visual_sinks", "visual sinks", SINK_COLOUR), ("text_sinks", "text sinks", TEXT_SINK_COLOUR),
               ("visual_nonsinks", "visual non-sinks", NONSINK_COLOUR), ("other_text", "other text", OTHER_COLOUR)]
    for y, key in ((1, "before"), (0, "after")):
        left = 0.0
        for cls, label, colour in classes:
            v = att[key][cls]
            ax.barh(y, v, left=left, color=colour, label=label if y == 1 else None, height=0.6)
            if v > 0.06:
                ax.text(left + v / 2, y, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white")
            left += v
    ax.set_yticks([1, 0], ["before", "after"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("attention mass of the row")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    moved = att["moved_from_sinks"]
    ax.set_title(f"moved sinks -> visual non-sinks: {moved:.3f}", fontsize=10)
    state = "VAR changed this row" if att["row_changed"] else "VAR left this row unchanged"
    score = summary["head_scores"]["scores"][att["layer"]][att["head"]]
    score_txt = "no score" if score is None else f"image-centric score {score:.2f}"
    sel = "selected" if [att["layer"], att["head"]] in summary["head_scores"]["selected"] else "not selected"
    fig.suptitle(
        f"Layer {att['layer']}, head {att['head']} ({score_txt}, {sel}): attention of the last prompt token "
        f"{att['query_token']!r} over the image patches\ncyan outline: visual sink patches. {state}.",
        fontsize=10,
    )
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _write(out_dir: Path, summary: dict[str, Any], image: np.ndarray) -> InspectResult:
    """Draw everything into a temp dir beside ``out_dir``, then move it into place."""
    att = summary["attention"]
    layer, head = att["layer"], att["head"]
    attention_png = f"attention_{layer}_{head}.png"
    names = [SINKS_PNG, SINK_COUNTS_PNG, HEAD_SCORES_PNG, attention_png, SUMMARY]
    summary["files"] = names
    from var_export.outputs import Outputs

    out_dir = Path(os.path.abspath(out_dir))
    with Outputs() as tx:  # an existing folder is replaced only when var-export wrote it
        tmp = tx.stage_dir(out_dir, what="inspect folder")
        plot_sinks(tmp / SINKS_PNG, summary, image)
        plot_sink_counts(tmp / SINK_COUNTS_PNG, summary)
        plot_head_scores(tmp / HEAD_SCORES_PNG, summary)
        plot_attention(tmp / attention_png, summary, image)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
        tx.commit()
    log.info("wrote %s to %s", ", ".join(names), out_dir)
    return InspectResult(out_dir=out_dir, files=[out_dir / n for n in names], layer=layer, head=head, summary=summary)
