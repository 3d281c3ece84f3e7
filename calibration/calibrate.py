"""Calibration (DESIGN.md §2): sink dims, sink statistics and image-centric heads → calibration.json.

Two passes over the samples, prefill only, one sample at a time:

1. *sink dims*: the plain model (VAR off); at the input of every VAR layer, every hidden dim whose
   weightless-RMS-normalised magnitude exceeds ``tau`` on some token is a hit. A dim is a sink dim
   when it is hit in at least ``layer_fraction`` of the VAR layers of a sample, in at least
   ``sample_fraction`` of the samples. The result is compared with the preset's dims (warning on
   disagreement); dims the user gave are always kept as given.
2. *heads*: the reference in dynamic mode with the chosen dims; per layer the sink tokens
   (count, visual share), per (layer, query head) the image-centric score = fraction of eligible
   prompt rows that pass the per-row test. Heads scoring >= ``head_threshold`` are selected.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from var_export.calibration.reference import (
    VarCounts,
    VarObserver,
    VarReference,
    multimodal_embeds,
    prompt_positions,
    split_model,
)
from var_export.core.calibration_schema import (  # noqa: F401 - re-exported: the calibration file API
    SCHEMA_VERSION,
    calibration_heads,
    jsonable,
    load_calibration,
    write_calibration,
)
from var_export.core.errors import CalibrationError, ConfigError, DataError
from var_export.core.settings import RMS_EPS, VarSettings, parse_sink_dims

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class DimSearch:
    """How consistent a hidden dim must be to count as a sink dim."""

    layer_fraction: float = 0.5  # ... hit in at least this fraction of the VAR layers of a sample
    sample_fraction: float = 0.5  # ... in at least this fraction of the samples


class _DimScan(VarObserver):
    """Pass 1: per VAR layer, which hidden dims exceed tau (normalised) on some valid token."""

    def __init__(self, layers: Sequence[int], tau: float) -> None:
        self.layers = set(layers)  # where to look
        self.tau = tau  # threshold on the normalised magnitude
        self.hits: dict[int, torch.Tensor] = {}  # layer -> (D,) bool, current sample
        self.peak: torch.Tensor | None = None  # (D,) max normalised magnitude over everything

    def layer_input(self, layer, hidden, valid, past_len) -> None:  # noqa: D102
        if layer not in self.layers:
            return
        x = hidden.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)).abs()  # (B, S, D)
        normed = normed * valid[..., None].to(normed.dtype)
        per_dim = normed.amax(dim=(0, 1)).cpu()  # (D,)
        self.hits[layer] = per_dim > self.tau
        self.peak = per_dim if self.peak is None else torch.maximum(self.peak, per_dim)


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("var-export")
    except PackageNotFoundError:
        return "unknown"


def _fingerprint(loaded_model: Any) -> dict[str, Any] | None:
    """The model's fingerprint when the loaded model can tell it (``LoadedModel.fingerprint``)."""
    fingerprint = getattr(loaded_model, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _prepare(
    sample: Any, loaded: Any, model: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample → (inputs_embeds (B, S, D), attention_mask (B, S), visual_token_mask (B, S),
    position_ids (B, S) or (3, B, S) for M-RoPE models)."""
    if isinstance(sample, Mapping):
        batch = dict(sample)
    else:
        try:
            image, prompt = sample
        except (TypeError, ValueError):
            raise DataError(
                f"a calibration sample must be an (image, prompt) pair or a prepared batch dict, "
                f"found {type(sample).__name__}."
            ) from None
        prepare = getattr(loaded, "prepare", None)  # LoadedModel.prepare: processor -> tensors
        if not callable(prepare):
            raise DataError(
                "an (image, prompt) calibration sample needs a loaded model with a processor "
                "(var_export.models.load_llava); pass prepared batch dicts otherwise."
            )
        batch = prepare(image, prompt)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if batch.get("inputs_embeds") is not None:
        embeds = batch["inputs_embeds"].to(device, dtype)
    else:
        from var_export.families import family_of

        ids = batch["input_ids"].to(device)
        pixels = batch.get("pixel_values")
        pixels = None if pixels is None else pixels.to(device, dtype)
        extra = {k: batch[k].to(device) for k in family_of(model).processor_keys if batch.get(k) is not None}
        with torch.no_grad():
            embeds = multimodal_embeds(model, ids, pixels, **extra)
    b, s = embeds.shape[:2]
    mask = batch.get("attention_mask")
    mask = torch.ones(b, s, dtype=torch.long) if mask is None else mask
    visual = batch.get("visual_token_mask")
    if visual is None:
        image_token = getattr(model.config, "image_token_id", None)
        if image_token is None or "input_ids" not in batch:
            raise DataError("a prepared calibration sample needs a visual_token_mask (B, S) bool.")
        visual = batch["input_ids"] == image_token
    mask = mask.to(device).long()
    if batch.get("position_ids") is not None:
        positions = batch["position_ids"]
    elif batch.get("input_ids") is not None:
        positions, _ = prompt_positions(model, {**batch, "attention_mask": mask})
    else:
        positions = _positions(mask)
    return embeds, mask, visual.to(device).bool(), positions.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _Bar:
    """A task on a rich-Progress-like object (add_task / advance), or nothing."""

    def __init__(self, progress: Any, description: str, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


def _check_against_model(model: Any, settings: VarSettings, user_dims: Sequence[int] | None) -> tuple[list[int], int]:
    """Check ``settings`` (and the user's sink dims) against the text model's config; returns
    (VAR layers, query heads per layer). Warns when ``tau`` cannot be reached."""
    cfg = split_model(model)[0].config
    num_layers, num_heads, hidden = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    settings.replace(sink_dims=user_dims or (0,)).check_model(num_layers, hidden)
    var_layers = settings.var_layers(num_layers)
    if settings.tau >= math.sqrt(hidden):
        log.warning(
            "tau=%s >= sqrt(hidden size %d): no token can exceed it after RMS normalisation, "
            "so no sink will be found; lower --tau.", settings.tau, hidden,
        )
    return var_layers, num_heads


def calibrate(
    loaded_model: Any,
    samples: Iterable[Any],
    settings: VarSettings,
    *,
    head_threshold: float = 0.5,
    preset_sink_dims: Sequence[int] | None = None,
    user_sink_dims: Sequence[int] | str | None = None,
    progress: Any = None,
    dim_search: DimSearch | None = None,
) -> dict[str, Any]:
    """Run the model over ``samples`` and return the calibration dict (DESIGN.md §2).

    loaded_model: has ``.model`` (LlavaForConditionalGeneration or *ForCausalLM), ``.processor``,
    ``.config``, optionally ``.spec`` (its ``.name`` is the model id) and, as
    :class:`var_export.models.LoadedModel` has, ``.prepare(image, prompt)`` (for (image, prompt)
    samples) and ``.fingerprint()``. samples: (PIL image, prompt) pairs, or prepared batch dicts
    (``input_ids`` + ``pixel_values`` or ``inputs_embeds``, ``attention_mask``,
    ``visual_token_mask``). settings: tau, rho, summ, p, layers, sink_scope; its ``sink_dims`` are
    not used (the dims come from ``user_sink_dims``, else the data, else ``preset_sink_dims``).
    progress: a rich ``Progress`` (add_task / advance) or None.
    """
    if not 0.0 <= head_threshold <= 1.0:
        raise ConfigError(f"--head-threshold must be in [0, 1], found {head_threshold}.")
    samples = list(samples)
    if not samples:
        raise DataError("no calibration samples: expected at least one image (+ prompt).")
    model = loaded_model.model
    user_dims = parse_sink_dims(user_sink_dims) if user_sink_dims is not None else None
    preset_dims = tuple(int(d) for d in preset_sink_dims) if preset_sink_dims else None
    var_layers, num_heads = _check_against_model(model, settings, user_dims)
    was_training = model.training
    model.eval()
    try:
        prepared = [_prepare(s, loaded_model, model) for s in samples]
        found, evidence = _scan_sink_dims(model, prepared, var_layers, settings.tau, dim_search or DimSearch(), progress)
        dims, source = _choose_dims(found, user_dims, preset_dims, settings.tau)
        counts = _count_heads(model, prepared, settings.replace(sink_dims=dims, heads="dynamic"), num_heads, progress)
    finally:
        model.train(was_training)
    layers, heads = _layer_statistics(counts, var_layers, len(prepared), num_heads, head_threshold)
    return {
        **_header(loaded_model, settings, var_layers, len(prepared)),
        "sink_dims": [int(d) for d in dims],
        "sink_dims_source": source,
        "sink_dims_found": [int(d) for d in found],
        "preset_sink_dims": list(preset_dims) if preset_dims else None,
        "sink_dim_evidence": evidence[:16],
        "head_threshold": head_threshold,
        "head_scores_observed_with": "dynamic",
        "layers": layers,
        "heads": heads,
    }


Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# embeds (B, S, D), mask (B, S), visual (B, S), positions (B, S) or (3, B, S) for M-RoPE models


def _scan_sink_dims(
    model: torch.nn.Module, prepared: Sequence[Prepared], var_layers: Sequence[int], tau: float,
    search: DimSearch, progress: Any,
) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """Pass 1 (VAR off): the dims hit consistently across layers and samples, and the evidence."""
    scan = _DimScan(var_layers, tau)
    plain = VarReference(model, None, observer=scan)
    hidden = split_model(model)[0].config.hidden_size
    consistent = torch.zeros(hidden, dtype=torch.long)  # samples in which a dim is consistent
    layer_share = torch.zeros(hidden)  # sum over samples of the fraction of layers hit
    bar = _Bar(progress, "calibrate: sink dims", len(prepared))
    for embeds, mask, visual, positions in prepared:
        scan.hits = {}
        plain.step(embeds, mask, positions, None, visual, None)
        hit_count = torch.stack([scan.hits[layer] for layer in var_layers]).sum(0)  # (D,)
        frac = hit_count.float() / len(var_layers)
        layer_share += frac
        consistent += (frac >= search.layer_fraction).long()
        bar.advance()
    n = len(prepared)
    found = tuple(int(d) for d in torch.nonzero(consistent >= search.sample_fraction * n).flatten())
    evidence = [
        {
            "dim": int(d),
            "sample_fraction": round(float(consistent[d]) / n, 4),
            "layer_fraction": round(float(layer_share[d]) / n, 4),
            "max_normalized": round(float(scan.peak[d]), 3) if scan.peak is not None else None,
        }
        for d in torch.nonzero(layer_share > 0).flatten().tolist()
    ]
    evidence.sort(key=lambda e: -e["layer_fraction"])
    return found, evidence


def _count_heads(
    model: torch.nn.Module, prepared: Sequence[Prepared], run_settings: VarSettings, num_heads: int, progress: Any
) -> VarCounts:
    """Pass 2: sink statistics and per-row test counts (dynamic VAR with the chosen dims)."""
    counts = VarCounts(num_heads)
    ref = VarReference(model, run_settings, observer=counts)
    bar = _Bar(progress, "calibrate: heads", len(prepared))
    for embeds, mask, visual, positions in prepared:
        ref.step(embeds, mask, positions, None, visual, None)
        bar.advance()
    return counts


def _layer_statistics(
    counts: VarCounts, var_layers: Sequence[int], n: int, num_heads: int, head_threshold: float
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Per VAR layer: sink-token statistics and head scores; the heads scoring >= the threshold."""
    layers = []
    heads: list[list[int]] = []
    for layer in var_layers:
        sinks = counts.sink_tokens.get(layer, 0)
        visual_sinks = counts.visual_sink_tokens.get(layer, 0)
        scores = counts.head_scores(layer)
        layers.append(
            {
                "layer": layer,
                "sink_count": sinks,
                "sink_tokens_per_sample": round(sinks / n, 3),
                "visual_sink_count": visual_sinks,
                "visual_share": round(visual_sinks / sinks, 4) if sinks else None,
                "eligible_rows": counts.eligible.get(layer, 0),
                "passed_rows": counts.passed.get(layer, [0] * num_heads),
                "image_centric_score": [round(s, 4) for s in scores],
            }
        )
        heads += [[layer, h] for h, s in enumerate(scores) if s >= head_threshold]
    return layers, heads


def _header(loaded_model: Any, settings: VarSettings, var_layers: list[int], n: int) -> dict[str, Any]:
    """Schema version, model id, fingerprint, tool version, date, settings, sample count."""
    spec = getattr(loaded_model, "spec", None)
    config = getattr(loaded_model, "config", None) or loaded_model.model.config
    return {
        "schema_version": SCHEMA_VERSION,
        "model_id": getattr(spec, "name", None) or getattr(config, "_name_or_path", None) or "unknown",
        "fingerprint": jsonable(_fingerprint(loaded_model)),
        "tool_version": _tool_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "tau": settings.tau,
            "rho": settings.rho,
            "summ": settings.summ,
            "p": settings.p,
            "layers": settings.layers,
            "exclude_last_layer": settings.exclude_last_layer,
            "var_layers": var_layers,
            "convention": "code",
            "sink_scope": settings.sink_scope,
        },
        "num_samples": n,
    }


def _choose_dims(
    found: tuple[int, ...],
    user: tuple[int, ...] | None,
    preset: tuple[int, ...] | None,
    tau: float,
) -> tuple[tuple[int, ...], str]:
    """The sink dims to use and where they came from: "user", "data" or "preset"."""
    if user:
        if set(found) != set(user):
            log.warning(
                "sink dims found in the data %s differ from --sink-dims %s; keeping --sink-dims as given.",
                list(found), list(user),
            )
        return user, "user"
    if found:
        if preset and set(found) != set(preset):
            log.warning(
                "sink dims found in the data %s differ from the preset's %s; using the data's. "
                "Pass --sink-dims to force the preset's.", list(found), list(preset),
            )
        return found, "data"
    if preset:
        log.warning(
            "no sink dim found in the data (tau=%s); keeping the preset's %s. Check --tau or the data.",
            tau, list(preset),
        )
        return preset, "preset"
    raise CalibrationError(
        f"no sink dims found in the data: no hidden dim exceeded tau={tau} (normalised) consistently "
        "across VAR layers and samples, and no preset defines them. Pass --sink-dims, lower --tau, "
        "or use more / other calibration images."
    )
