"""Embedded InternVL test model ``tiny-internvl``: a small native ``InternVLForConditionalGeneration``.

Built in code, offline and deterministic, like ``tiny-llava`` (calibration/tiny_llava.py), whose
text-side circuits it reuses unchanged (Qwen2 text model, same hidden size, layers, heads, sink
dims ``TINY_SINK_DIMS``, head patterns ``HEAD_PATTERNS``). The vision side is InternVL's:

* InternViT-style tower (CLS token, layer scale, mean-pooling config), 64x64 tiles of 8x8
  patches (64 patches), pixel shuffle with ``downsample_ratio = 0.5`` -> 16 image tokens per
  tile, projector ``LayerNorm -> Linear -> GELU -> Linear``;
* the GotOcr2 processor crops an image into up to 4 tiles of 64x64 plus a thumbnail tile, and
  ``<IMG_CONTEXT>`` expands to ``<img>`` + 16 ``<IMG_CONTEXT>`` per tile + ``</img>``. The visual
  tokens are the ``<IMG_CONTEXT>`` positions (the image features); ``<img>``/``</img>`` are text
  tokens (vocabulary embeddings), like Qwen's vision start/end tokens.

Planted visual sinks: the tower passes each patch's mean colour differences through its residual
stream (attention and MLP never write those dims; position embeddings carry a large +-A anchor
pair that fixes the projector LayerNorm's scale), the projector's GELU pairs take their absolute
values over the 4 patches a token pools, and the marker ``bias - slope * colourfulness`` makes
grey tokens sinks in decoder layers >= 2 (tiny-llava's layer-1 sink writer).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from var_export.calibration import tiny_llava as tl
from var_export.calibration.tiny_anyres import synthetic_images  # noqa: F401 - re-exported
from var_export.families.processing import image_only_class

logger = logging.getLogger(__name__)

TINY_INTERNVL_VERSION = 1
NAME = "tiny-internvl"
TILE_SIZE = 64  # vision tower input
PATCH_SIZE = tl.PATCH_SIZE  # 8 -> 8 x 8 patches per tile
PATCH_GRID = TILE_SIZE // PATCH_SIZE
TOKENS_PER_TILE = (PATCH_GRID // 2) ** 2  # pixel shuffle 0.5 -> 16
MAX_TILES = 4
IMAGE_TOKENS: dict[str, str] = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
PROMPT_FORMAT = "USER: <IMG_CONTEXT>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = tl.CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")
_COMPLETE_MARKER = "tiny_internvl.json"
_DIFF_DIMS = (0, 1, 2)
_ANCHOR = (3, 4)
_ANCHOR_VALUE = 20.0


def _vocab() -> dict[str, int]:
    vocab = tl._vocab()
    for tok in IMAGE_TOKENS.values():
        vocab.setdefault(tok, len(vocab))
    return vocab


def _configs() -> Any:
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vocab = _vocab()
    text = Qwen2Config(use_sliding_window=False, **tl.text_config_kwargs(vocab))
    vision = InternVLVisionConfig(
        hidden_size=tl.VISION_HIDDEN,
        intermediate_size=2 * tl.VISION_HIDDEN,
        num_hidden_layers=tl.VISION_LAYERS,
        num_attention_heads=2,
        image_size=[TILE_SIZE, TILE_SIZE],
        patch_size=[PATCH_SIZE, PATCH_SIZE],
        use_mean_pooling=True,
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=vocab["<IMG_CONTEXT>"],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = vocab["<pad>"]
    return cfg


def build_model() -> Any:
    """tiny-internvl ``InternVLForConditionalGeneration`` with its planted weights (eval, fp32)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(_configs()).eval()
    gen = torch.Generator().manual_seed(2468)
    with torch.no_grad():
        tl.init_parameters(model, gen, tl._init_std)
        _plant_vision(model)
        _plant_projector(model, gen)
        tl._plant_text(model)
    return model


def _plant_vision(model: Any) -> None:
    """Patch-mean colour differences in dims 0-2, a +-A anchor pair in dims 3-4, both untouched
    by every encoder layer (their attention / MLP outputs never write those dims)."""
    vt = model.model.vision_tower
    emb = vt.embeddings
    w = emb.patch_embeddings.projection.weight  # (Dv, 3, P, P)
    w[list(_DIFF_DIMS) + list(_ANCHOR)] = 0.0
    area = float(PATCH_SIZE * PATCH_SIZE)
    for out_dim, (plus, minus) in zip(_DIFF_DIMS, ((0, 1), (1, 2), (2, 0))):
        w[out_dim, plus] = 1.0 / area
        w[out_dim, minus] = -1.0 / area
    table = emb.position_embeddings[0]  # (1 + patches, Dv)
    table[:, list(_DIFF_DIMS)] = 0.0
    table[:, _ANCHOR[0]] = _ANCHOR_VALUE
    table[:, _ANCHOR[1]] = -_ANCHOR_VALUE
    written = list(_DIFF_DIMS) + list(_ANCHOR)
    for layer in vt.encoder.layer:
        layer.attention.projection_layer.weight[written] = 0.0
        layer.mlp.fc2.weight[written] = 0.0


def _plant_projector(model: Any, gen: Any) -> None:
    """LayerNorm (anchored: scale ~ fixed) -> GELU pairs |diff| per pooled patch -> marker."""

    dv = tl.VISION_HIDDEN
    copies = 4  # pixel shuffle 0.5 pools 2 x 2 patches: channel c*Dv + d of a token is patch c's dim d
    proj = model.model.multi_modal_projector
    ln_scale = math.sqrt(2 * _ANCHOR_VALUE**2 / dv)  # std of a token ~ the anchors'
    for c in range(copies):
        proj.layer_norm.weight[[c * dv + d for d in _DIFF_DIMS]] = ln_scale
        proj.layer_norm.weight[[c * dv + a for a in _ANCHOR]] = 0.0
    gain = 4.0
    n_abs = copies * len(_DIFF_DIMS) * 2
    const_unit = n_abs
    l1w, l1b = proj.linear_1.weight, proj.linear_1.bias  # (H, 4 Dv), (H,)
    l1w[: const_unit + 1] = 0.0
    l1b[: const_unit + 1] = 0.0
    unit = 0
    for c in range(copies):
        for d in _DIFF_DIMS:
            l1w[unit, c * dv + d] = gain
            l1w[unit + 1, c * dv + d] = -gain
            unit += 2
    tl.plant_marker_head(proj, gen, const_unit=const_unit, abs_units=list(range(n_abs)),
                         slope_per_unit=tl.MARKER_SLOPE / (gain * copies))  # mean over patches


def _build_tokenizer() -> Any:
    return tl.word_tokenizer(_vocab(), dict(IMAGE_TOKENS))


def _build_processor() -> Any:
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return image_only_class(InternVLProcessor)(
        image_processor=ip, tokenizer=_build_tokenizer(), image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_internvl(out_dir: Path) -> Path:
    """Write the tiny-internvl HF directory (config, safetensors, tokenizer, processor)."""
    info = {
        "variant": NAME,
        "version": TINY_INTERNVL_VERSION,
        "sink_dims": list(tl.TINY_SINK_DIMS),
        "planted_image_centric_heads": [list(h) for h in tl.PLANTED_IMAGE_CENTRIC_HEADS],
        "first_sink_layer": tl.FIRST_SINK_LAYER,
        "prompt_format": PROMPT_FORMAT,
    }
    return tl.write_model_dir(out_dir, build_model(), _build_processor(), _COMPLETE_MARKER, info, NAME)


def _is_complete(path: Path) -> bool:
    return tl.is_complete_dir(path, _COMPLETE_MARKER, version=TINY_INTERNVL_VERSION)


def tiny_internvl_dir() -> Path:
    """The cached tiny-internvl directory, built on first use."""
    return tl.cached_model_dir(f"{NAME}-v{TINY_INTERNVL_VERSION}", _is_complete, build_tiny_internvl)
