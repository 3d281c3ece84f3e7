"""Optimization profiles: pure functions from a graph's input shapes and a few limits.

A profile gives every dynamic input its (min, opt, max) shape. The limits come from the
bundle's manifest (``max_position_embeddings``; batch 1..4 by default) and can be overridden
(``--max-batch``, ``--max-seq``, ``--max-past``, ``--max-images``). Each dynamic axis gets a
role from the decoder contract's input names and ranks (DESIGN.md §3: ``position_ids`` is
[B, S] or, M-RoPE, [3, B, S]) or from its symbolic name.

The vision graph's inputs differ per model family (LLaVA-1.5 images [I, 3, H, W], LLaVA-NeXT /
InternVL tiles [N_tiles, 3, H, W], Qwen-VL patches [N_patches, C*T*P*P] + image_grid_thw
[I, 3]): their ranges come from the family named in the manifest
(:meth:`var_export.families.base.ModelFamily.vision_profile_axes`), given the manifest, the
bundle's image processor settings and these limits (:func:`family_axes`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from var_export.core.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    INPUTS_EMBEDS,
    PAST_SINK_MASK,
    PIXEL_VALUES,
    POSITION_IDS,
    VISUAL_MASK,
)
from var_export.core.errors import ConfigError
from var_export.trt.lint import Shape, load_graph, shape_of

# input -> (min, opt, max) shapes
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
Range = tuple[int, int, int]
# input -> axis -> (min, opt, max): ranges a model family gives its vision graph's dynamic axes
AxisRanges = Mapping[str, Mapping[int, Range]]

DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_POSITIONS = 1024  # when the manifest records no max_position_embeddings


@dataclasses.dataclass(frozen=True)
class ProfileLimits:
    """min / opt / max of the dynamic axes of one optimization profile.

    ``past`` may start at 0 (prefill feeds an empty KV cache). The total length
    T = past + sequence gets ``(min_past + min_seq, opt_past + opt_seq, max_past + max_seq)``,
    capped at ``max_total`` when given (the model's position limit).
    """

    batch: tuple[int, int, int] = (1, 1, DEFAULT_MAX_BATCH)  # B
    sequence: tuple[int, int, int] = (1, 1, 1024)  # S: new tokens (prompt at prefill, 1 decoding)
    past: tuple[int, int, int] = (0, 512, 1024)  # P: cached tokens
    image: tuple[int, int, int] = (336, 336, 336)  # H, W of pixel_values when they are dynamic
    max_total: int | None = None  # cap of T (e.g. max_position_embeddings)
    images: tuple[int, int, int] | None = None  # images per vision call (None: as batch)

    def __post_init__(self) -> None:
        for name in ("batch", "sequence", "past", "image", "images"):
            if getattr(self, name) is None:
                continue
            lo, opt, hi = getattr(self, name)
            floor = 0 if name == "past" else 1
            if not floor <= lo <= opt <= hi:
                raise ConfigError(
                    f"profile {name}: expected {floor} <= min <= opt <= max, found "
                    f"({lo}, {opt}, {hi}). Fix --max-{'seq' if name == 'sequence' else name}."
                )
        if self.max_total is not None and self.max_total < self.total[1]:
            raise ConfigError(
                f"profile: the position limit {self.max_total} is below the optimum total length "
                f"{self.total[1]}; lower --max-past or raise the limit."
            )

    @property
    def image_count(self) -> tuple[int, int, int]:
        """Images one vision call encodes: ``images``, else one per batch row."""
        return self.images if self.images is not None else self.batch

    @property
    def total(self) -> tuple[int, int, int]:
        lo, opt, hi = (p + s for p, s in zip(self.past, self.sequence))
        return lo, opt, hi if self.max_total is None else min(hi, self.max_total)

    @classmethod
    def from_max(
        cls,
        *,
        max_batch: int | None = None,
        max_seq: int | None = None,
        max_past: int | None = None,
        opt_batch: int | None = None,
        max_total: int | None = None,
        max_images: int | None = None,
    ) -> ProfileLimits:
        """Defaults with the maxima overridden (opt: batch 1 or given, sequence 1, past max/2;
        images per vision call: 1..max_images, default as batch)."""
        d = cls()
        mb = int(max_batch) if max_batch is not None else d.batch[2]
        ms = int(max_seq) if max_seq is not None else d.sequence[2]
        mp = int(max_past) if max_past is not None else d.past[2]
        ob = int(opt_batch) if opt_batch is not None else min(1, mb)
        for flag, v, lo in (("--max-batch", mb, 1), ("--max-seq", ms, 1), ("--max-past", mp, 0),
                            ("--max-images", 1 if max_images is None else int(max_images), 1)):
            if v < lo:
                raise ConfigError(f"{flag} must be >= {lo}, found {v}.")
        images = None if max_images is None else (1, 1, int(max_images))
        return cls(batch=(1, ob, mb), sequence=(1, 1, ms), past=(0, mp // 2, mp), max_total=max_total,
                   images=images)

    @classmethod
    def for_bundle(
        cls,
        manifest: Mapping[str, Any] | None,
        *,
        max_batch: int | None = None,
        max_seq: int | None = None,
        max_past: int | None = None,
        max_images: int | None = None,
    ) -> ProfileLimits:
        """Limits from a bundle manifest: T up to ``max_position_embeddings`` (a prompt of up to
        that many tokens at prefill, a cache of up to one less while decoding), batch 1..4,
        one image per batch row; each maximum can be overridden."""
        positions = int((manifest or {}).get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)
        seq = positions if max_seq is None else max_seq
        past = positions - 1 if max_past is None else max_past
        return cls.from_max(max_batch=max_batch, max_seq=seq, max_past=past, max_total=positions,
                            max_images=max_images)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": list(self.total)}


# Axis roles of the contract's inputs (DESIGN.md §3): input name -> role per axis
# (None = take the static size from the graph).
_INPUT_ROLES: dict[str, list[str | None]] = {
    INPUTS_EMBEDS: ["batch", "sequence", None],
    INPUT_IDS: ["batch", "sequence"],
    POSITION_IDS: ["batch", "sequence"],
    ATTENTION_MASK: ["batch", "total"],
    VISUAL_MASK: ["batch", "total"],
    PAST_SINK_MASK: ["batch", None, "past"],
    PIXEL_VALUES: ["batch", None, "image", "image"],
}

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


# inputs of the contract that have another rank in some families: (name, rank) -> roles
_RANKED_ROLES: dict[tuple[str, int], list[str | None]] = {
    (POSITION_IDS, 3): [None, "batch", "sequence"],  # M-RoPE (Qwen-VL): [3, B, S]
}


def _axis_roles(name: str, rank: int) -> list[str | None] | None:
    if name.startswith(("past_key_values.", "past_key.")):
        roles: list[str | None] | None = ["batch", None, "past", None]
    else:
        roles = _RANKED_ROLES.get((name, rank), _INPUT_ROLES.get(name))
    return roles if roles is not None and len(roles) == rank else None


def _ranges(lim: ProfileLimits) -> dict[str, tuple[int, int, int]]:
    return {"batch": lim.batch, "sequence": lim.sequence, "past": lim.past,
            "total": lim.total, "image": lim.image}


def _input_range(
    name: str,
    shape: Sequence[int | str | None],
    ranges: Mapping[str, tuple[int, int, int]],
    axes: Mapping[int, Range] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    roles = _axis_roles(name, len(shape))
    lo: list[int] = []
    opt: list[int] = []
    hi: list[int] = []
    for axis, d in enumerate(shape):
        if isinstance(d, int):
            r: tuple[int, int, int] = (d, d, d)
        elif axes is not None and axis in axes:
            r = tuple(int(v) for v in axes[axis])  # type: ignore[assignment]
        else:
            role = roles[axis] if roles is not None else None
            if role is None and isinstance(d, str):
                role = _SYMBOL_ROLES.get(d)
            if role is None:
                raise ConfigError(
                    f"input {name} axis {axis} is dynamic ({d!r}) and has no known role; "
                    "expected one of the contract's inputs (DESIGN.md §3) or a symbolic "
                    f"axis named {sorted(_SYMBOL_ROLES)}. Build from the bundle directory (its "
                    "manifest names the model family, which gives its vision inputs' ranges) or "
                    "re-export with named axes."
                )
            r = ranges[role]
        lo.append(r[0])
        opt.append(r[1])
        hi.append(r[2])
    return tuple(lo), tuple(opt), tuple(hi)


def make_profiles(
    input_shapes: Mapping[str, Sequence[int | str | None]],
    limits: ProfileLimits | Sequence[ProfileLimits] | None = None,
    axes: Callable[[ProfileLimits], AxisRanges] | None = None,
) -> list[Profile]:
    """Optimization profiles for a graph: one dict ``input -> (min, opt, max)`` per limits.

    ``input_shapes``: the graph's inputs with static sizes (int) or symbolic/unknown axes
    (str / None), e.g. from :func:`graph_input_shapes`. Each dynamic axis gets its range from
    ``axes(limits)`` when that names it (the model family's vision inputs, :func:`family_axes`),
    else its role from the contract's input names (DESIGN.md §3: batch, sequence, past, total =
    past + sequence) or, for other inputs, from the symbolic name (``batch``, ``sequence``,
    ``past_sequence`` ...). Static inputs are left out. Raises ConfigError for a dynamic axis
    with no known role.
    """
    if limits is None:
        limits = [ProfileLimits()]
    elif isinstance(limits, ProfileLimits):
        limits = [limits]
    profiles = []
    for lim in limits:
        given = axes(lim) if axes is not None else {}
        profiles.append({
            name: _input_range(name, shape, _ranges(lim), given.get(name))
            for name, shape in input_shapes.items()
            if not all(isinstance(d, int) for d in shape)
        })
    return profiles


def image_processor_config(bundle_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The image processor settings saved in a bundle (``processor_config.json``'s
    ``image_processor``, or ``preprocessor_config.json``); {} when there are none."""
    if bundle_dir is None:
        return {}
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = Path(bundle_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-export the bundle.") from exc
        section = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(section, dict):
            return section
    return {}


def family_axes(
    manifest: Mapping[str, Any] | None, processor: Mapping[str, Any] | None = None
) -> Callable[[ProfileLimits], AxisRanges] | None:
    """``limits -> {input: {axis: (min, opt, max)}}`` of the model family named in a bundle
    manifest (``family``; a manifest without one is LLaVA-1.5's), or None without a manifest.

    The family derives its vision inputs' ranges from the manifest, the image processor
    settings and the limits (images per vision call, prompt length)."""
    if manifest is None:
        return None
    from var_export.families import family_for_model_type

    family = family_for_model_type(str(manifest.get("family") or "llava"))
    proc = dict(processor or {})

    def axes(lim: ProfileLimits) -> AxisRanges:
        return family.vision_profile_axes(manifest, proc, images=lim.image_count, sequence=lim.sequence)

    return axes


def graph_input_shapes(model: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, Shape]:
    """The graph's (non-initializer) inputs and their shapes (int static, str/None dynamic)."""
    proto, _ = load_graph(model)
    init = {t.name for t in proto.graph.initializer}
    out: dict[str, Shape] = {}
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        shape = shape_of(vi)
        if shape is None:
            raise ConfigError(f"input {vi.name} has unknown rank; TensorRT needs ranks.")
        out[vi.name] = shape
    return out


def check_shapes(profile: Profile, shapes: Mapping[str, Sequence[int]], engine: str) -> None:
    """Refuse feeds outside a profile before TensorRT sees them (ConfigError naming the axis)."""
    for name, (lo, _, hi) in profile.items():
        if name not in shapes:
            continue
        got = tuple(int(d) for d in shapes[name])
        if len(got) != len(lo) or any(not a <= g <= b for a, g, b in zip(lo, got, hi)):
            raise ConfigError(
                f"{engine}: input {name} has shape {list(got)}, outside the engine's profile "
                f"(min {list(lo)}, max {list(hi)}). Rebuild the engine with larger --max-batch / "
                "--max-seq / --max-past, or shorten the prompt / answer."
            )


def describe_profiles(profiles: Iterable[Mapping[str, tuple[Sequence[int], ...]]]) -> str:
    """Human-readable profile table (one line per input)."""
    lines = []
    for i, prof in enumerate(profiles):
        for name, (lo, opt, hi) in prof.items():
            lines.append(f"profile {i}: {name}: min {list(lo)} opt {list(opt)} max {list(hi)}")
    return "\n".join(lines)
