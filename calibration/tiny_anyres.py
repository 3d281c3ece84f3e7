"""Embedded any-resolution test models: ``tiny-llava-next`` and ``tiny-llava-onevision``.

Built in code, offline and deterministic, like ``tiny-llava`` (calibration/tiny_llava.py), whose
planted circuits they reuse unchanged on the text side (same hidden size, layers, heads, sink
dims ``TINY_SINK_DIMS``, head patterns ``HEAD_PATTERNS``):

* ``tiny-llava-next``: ``LlavaNextForConditionalGeneration`` — Mistral text model (like
  llava-v1.6-mistral-7b), CLIP vision tower (CLS dropped, "default" strategy), 32x32 tiles of
  8x8 patches (16 tokens per tile), grid pinpoints up to 2x2 tiles, ``image_newline``.
* ``tiny-llava-onevision``: ``LlavaOnevisionForConditionalGeneration`` — Qwen2 text model
  (q/k/v biases), SigLIP vision tower ("full" strategy, no CLS), the same tiles,
  ``vision_aspect_ratio = "anyres_max_2"`` so a 2x2-tile image is bilinearly downsampled
  (the ``anyres_max`` path of the real model) while a 2x1-tile one is not.

Visual sinks are planted exactly as in tiny-llava: the vision tower passes each patch's mean
colour differences through, the projector turns low colourfulness (grey background) into a
positive marker, and decoder layer 1 writes the massive sink dims from it. ``image_newline``
carries the visual key feature and a negative marker: it is a visual non-sink token.
Text sink: BOS ``<s>`` (prepended by the tokenizer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from var_export.calibration import tiny_llava as tl
from var_export.families.processing import image_only_class

logger = logging.getLogger(__name__)

TINY_ANYRES_VERSION = 1
TILE_SIZE = 32  # vision tower input: TILE_SIZE x TILE_SIZE
PATCH_SIZE = tl.PATCH_SIZE  # 8 -> 4 x 4 = 16 tokens per tile
TILE_GRID = TILE_SIZE // PATCH_SIZE
TOKENS_PER_TILE = TILE_GRID * TILE_GRID
GRID_PINPOINTS: list[list[int]] = [[32, 64], [64, 32], [64, 64]]  # (height, width), multiples of TILE_SIZE
ONEVISION_PINPOINTS: list[list[int]] = [[32, 32], [32, 64], [64, 32], [64, 64]]
ONEVISION_ASPECT_RATIO = "anyres_max_2"  # 2x2 tiles (8x8 grid) exceed 2 tiles' worth: interpolated
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (80, 48))  # (width, height) of the test images
VARIANTS: tuple[str, ...] = ("tiny-llava-next", "tiny-llava-onevision")
EXTRA_TOKENS: tuple[str, ...] = ("<video>",)
_COMPLETE_MARKER = "tiny_anyres.json"


def _vocab() -> dict[str, int]:
    vocab = tl._vocab()  # tiny-llava's ids unchanged; extra tokens appended
    for tok in EXTRA_TOKENS:
        vocab.setdefault(tok, len(vocab))
    return vocab


# ---------------------------------------------------------------------------------------------
# images


def synthetic_images(n: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = IMAGE_SIZES) -> list[Image.Image]:
    """``n`` deterministic RGB images cycling through ``sizes`` (width, height): a flat grey
    background with 2-4 coloured boxes on a 16-pixel grid (boxes stay solid after resizing)."""
    rng = np.random.default_rng(seed)
    cell = 16
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        gw, gh = w // cell, h // cell
        grey = float(rng.choice((0.35, 0.45, 0.55, 0.65, 0.75, 0.85)))
        pix = np.empty((h, w, 3), dtype=np.float64)
        pix[:] = np.clip(grey + rng.uniform(-0.01, 0.01, size=3), 0, 1)
        occupied = np.zeros((gh, gw), dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            bh, bw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
            r, c = int(rng.integers(0, max(gh - bh, 0) + 1)), int(rng.integers(0, max(gw - bw, 0) + 1))
            if occupied[r : r + bh, c : c + bw].any() or occupied.sum() + bh * bw > gh * gw // 2:
                continue
            occupied[r : r + bh, c : c + bw] = True
            colour = np.array(tl._OBJECT_COLOURS[int(rng.integers(len(tl._OBJECT_COLOURS)))])
            pix[r * cell : (r + bh) * cell, c * cell : (c + bw) * cell] = colour
        if not occupied.any():
            pix[:cell, :cell] = tl._OBJECT_COLOURS[0]
        out.append(Image.fromarray(np.round(pix * 255).astype(np.uint8), mode="RGB"))
    return out


# ---------------------------------------------------------------------------------------------
# configs


def _text_config(variant: str) -> Any:
    from transformers import MistralConfig, Qwen2Config

    common = tl.text_config_kwargs(_vocab())
    if variant == "tiny-llava-next":
        return MistralConfig(sliding_window=None, **common)
    return Qwen2Config(use_sliding_window=False, **common)


def _configs(variant: str) -> Any:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        SiglipVisionConfig,
    )

    vocab = _vocab()
    vision_kw = dict(
        hidden_size=tl.VISION_HIDDEN,
        intermediate_size=2 * tl.VISION_HIDDEN,
        num_hidden_layers=tl.VISION_LAYERS,
        num_attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = _text_config(variant)
    if variant == "tiny-llava-next":
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(projection_dim=tl.VISION_HIDDEN, hidden_act="quick_gelu", **vision_kw),
            text_config=text,
            image_token_index=vocab["<image>"],
            image_grid_pinpoints=GRID_PINPOINTS,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
            image_seq_length=TOKENS_PER_TILE,
        )
    elif variant == "tiny-llava-onevision":
        cfg = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **vision_kw),
            text_config=text,
            image_token_index=vocab["<image>"],
            video_token_index=vocab["<video>"],
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio=ONEVISION_ASPECT_RATIO,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"unknown tiny any-resolution variant {variant!r}; expected one of {VARIANTS}")
    cfg.pad_token_id = vocab["<pad>"]
    return cfg


# ---------------------------------------------------------------------------------------------
# weights


def build_model(variant: str) -> Any:
    """The tiny model of ``variant`` with its planted weights (eval, fp32)."""
    import torch
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    cfg = _configs(variant)
    cls = LlavaNextForConditionalGeneration if variant == "tiny-llava-next" else LlavaOnevisionForConditionalGeneration
    torch.manual_seed(0)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        tl.init_parameters(model, gen, _init_std)
        if variant == "tiny-llava-next":
            _plant_clip(model)
        else:
            _plant_siglip(model)
        _plant_projector(model, gen)
        tl._plant_text(model)
        _plant_newline(model)
    return model


def _init_std(name: str) -> float:
    return 0.5 if name.endswith("image_newline") else tl._init_std(name)


_DIFF_DIMS = (0, 1, 2)  # vision hidden dims carrying R-G, G-B, B-R of the patch mean


def _patch_differences(weight: Any) -> None:
    """Patch-embedding rows _DIFF_DIMS compute the patch-mean colour differences."""
    weight[list(_DIFF_DIMS)] = 0.0
    area = float(PATCH_SIZE * PATCH_SIZE)
    for out_dim, (plus, minus) in zip(_DIFF_DIMS, ((0, 1), (1, 2), (2, 0))):
        weight[out_dim, plus] = 1.0 / area
        weight[out_dim, minus] = -1.0 / area


def _plant_clip(model: Any) -> None:
    """tiny-llava's CLIP planting (anchored pre-LayerNorm keeps the differences linear)."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    emb = vt.embeddings
    anchor, anchor_value = (3, 4), 20.0
    _patch_differences(emb.patch_embedding.weight)
    emb.patch_embedding.weight[list(anchor)] = 0.0
    for table in (emb.position_embedding.weight, emb.class_embedding.view(1, -1)):
        table[:, list(_DIFF_DIMS)] = 0.0
        table[:, anchor[0]] = anchor_value
        table[:, anchor[1]] = -anchor_value
    vt.pre_layrnorm.weight[list(_DIFF_DIMS)] = math.sqrt(2 * anchor_value**2 / tl.VISION_HIDDEN)
    vt.pre_layrnorm.weight[list(anchor)] = 0.0
    for layer in vt.encoder.layers:
        layer.self_attn.out_proj.weight[list(_DIFF_DIMS)] = 0.0
        layer.mlp.fc2.weight[list(_DIFF_DIMS)] = 0.0


def _plant_siglip(model: Any) -> None:
    """SigLIP has no pre-LayerNorm: the differences ride the residual stream to hidden_states[-1]."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    _patch_differences(vt.embeddings.patch_embedding.weight)
    vt.embeddings.position_embedding.weight[:, list(_DIFF_DIMS)] = 0.0
    for layer in vt.encoder.layers:
        layer.self_attn.out_proj.weight[list(_DIFF_DIMS)] = 0.0
        layer.mlp.fc2.weight[list(_DIFF_DIMS)] = 0.0


def _plant_projector(model: Any, gen: Any) -> None:
    """Projector: GELU pairs take |differences|; marker = bias - slope * colourfulness (tiny-llava)."""

    proj = model.model.multi_modal_projector
    gain, const_unit = 4.0, 6
    l1w, l1b = proj.linear_1.weight, proj.linear_1.bias  # (H, Dv), (H,)
    l1w[: const_unit + 1] = 0.0
    l1b[: const_unit + 1] = 0.0
    for k, d in enumerate(_DIFF_DIMS):
        l1w[2 * k, d] = gain
        l1w[2 * k + 1, d] = -gain
    tl.plant_marker_head(proj, gen, const_unit=const_unit, abs_units=list(range(6)),
                         slope_per_unit=tl.MARKER_SLOPE / gain)


def _plant_newline(model: Any) -> None:
    """image_newline: a visual key (visual feature), never a sink (negative marker), no sink dims."""
    nl = model.model.image_newline  # (H,)
    nl[[*tl.TINY_SINK_DIMS, tl.TEXT_FEATURE_DIM, tl.BOS_FEATURE_DIM, tl.VISUAL_WORD_DIM]] = 0.0
    nl[tl.VISUAL_FEATURE_DIM] = tl.FEATURE_VALUE
    nl[tl.MARKER_DIM] = -tl.FEATURE_VALUE


# ---------------------------------------------------------------------------------------------
# tokenizer and processor


def _build_tokenizer() -> Any:
    return tl.word_tokenizer(_vocab(), {"image_token": "<image>", "video_token": "<video>"})


def _build_processor(variant: str) -> Any:
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if variant == "tiny-llava-next":
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE_SIZE},
            crop_size={"height": TILE_SIZE, "width": TILE_SIZE},
            image_grid_pinpoints=GRID_PINPOINTS,
            **norm,
        )
        return LlavaNextProcessor(
            image_processor=ip,
            tokenizer=_build_tokenizer(),
            patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tl.CHAT_TEMPLATE,
            image_token="<image>",
        )
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, image_grid_pinpoints=ONEVISION_PINPOINTS, **norm
    )
    return image_only_class(LlavaOnevisionProcessor)(
        image_processor=ip,
        tokenizer=_build_tokenizer(),
        num_image_tokens=TOKENS_PER_TILE,
        vision_feature_select_strategy="full",
        chat_template=tl.CHAT_TEMPLATE,
        vision_aspect_ratio=ONEVISION_ASPECT_RATIO,
    )


def build_tiny(variant: str, out_dir: Path) -> Path:
    """Write the ``variant`` HF directory (config, safetensors, tokenizer, processor) to ``out_dir``."""
    info = {
        "variant": variant,
        "version": TINY_ANYRES_VERSION,
        "sink_dims": list(tl.TINY_SINK_DIMS),
        "planted_image_centric_heads": [list(h) for h in tl.PLANTED_IMAGE_CENTRIC_HEADS],
        "first_sink_layer": tl.FIRST_SINK_LAYER,
    }
    return tl.write_model_dir(out_dir, build_model(variant), _build_processor(variant), _COMPLETE_MARKER, info, variant)


def _is_complete(path: Path, variant: str) -> bool:
    return tl.is_complete_dir(path, _COMPLETE_MARKER, version=TINY_ANYRES_VERSION, variant=variant)


def tiny_dir(variant: str) -> Path:
    """The cached HF directory of ``variant`` (one of VARIANTS), built on first use."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny any-resolution variant {variant!r}; expected one of {VARIANTS}")
    return tl.cached_model_dir(
        f"{variant}-v{TINY_ANYRES_VERSION}",
        lambda p: _is_complete(p, variant),
        lambda p: build_tiny(variant, p),
    )
