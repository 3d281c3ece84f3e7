"""The embedded ``tiny-qwen2.5-vl`` / ``tiny-qwen2-vl``: small Qwen-VL models built in code, offline.

Ordinary ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` (Qwen2 text
model with q/k/v biases, GQA and M-RoPE; the dynamic-resolution vision transformer with 2x2 patch
merging; Qwen2.5-VL adds window attention) saved with ``save_pretrained`` together with a
word-level tokenizer, the PIL Qwen2-VL image processor and the family's processor (no video
processor: it needs torchvision). Random-small weights except the circuits planted as in
:mod:`var_export.calibration.tiny_llava` (read its docstring):

* a *marker* per token in hidden dim ``MARKER_DIM``: +4 for ``<|im_start|>`` (Qwen has no BOS:
  its first-token text sink is ``<|im_start|>``), -4 for other text, and for image tokens
  ``MARKER_BIAS - MARKER_SLOPE * colourfulness`` of the 2x2-patch merge unit's mean colour. The
  patch embedding writes the three colour differences into vision dims 0..2; vision blocks never
  write them; an anchor pair (+-A, from block 0's attention output bias) fixes the scale of the
  merger's norm so they pass it linearly; the merger's GELU pairs take absolute values;
* the MLP of decoder layer 1 writes the massive value into ``TINY_SINK_DIMS`` from the marker:
  ``<|im_start|>`` tokens and grey (background) merge units are sinks at layers >= 2;
* layers 2 and 3 carry the image / sink / text / mixed head patterns of tiny-llava in the
  lowest-frequency rotary pairs (the M-RoPE width section, rope_theta 1e6: position-free).

Images of any size that the processor maps to multiples of 16 pixels work (one merge unit is
16x16 pixels); :func:`synthetic_images` draws grey images with coloured boxes on that grid.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from var_export.calibration import tiny_llava as tl

logger = logging.getLogger(__name__)

TINY_QWEN_VERSION = 3
Variant = Literal["qwen2_5_vl", "qwen2_vl"]
VARIANTS: tuple[str, ...] = ("qwen2_5_vl", "qwen2_vl")

# --- text model: the tiny-llava sizes (sink dims need hidden >= 800 for tau = 20) ------------
HIDDEN_SIZE = tl.HIDDEN_SIZE
NUM_LAYERS = tl.NUM_LAYERS
NUM_HEADS = tl.NUM_HEADS
NUM_KV_HEADS = tl.NUM_KV_HEADS
HEAD_DIM = tl.HEAD_DIM
INTERMEDIATE_SIZE = tl.INTERMEDIATE_SIZE
MAX_POSITIONS = 1024
ROPE_THETA = 1_000_000.0
MROPE_SECTION = (16, 24, 24)  # temporal, height, width rotary pairs (sum = HEAD_DIM // 2)

# --- vision -----------------------------------------------------------------------------------
PATCH_SIZE = 8
MERGE_SIZE = 2  # 2x2 patches -> one image token
UNIT = PATCH_SIZE * MERGE_SIZE  # 16 pixels per image token side
TEMPORAL_PATCH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_DEPTH = 2  # Qwen2.5-VL: block 0 windowed, block 1 full attention
WINDOW_SIZE = 2 * UNIT  # 2x2 image tokens per attention window (Qwen2.5-VL)
MIN_PIXELS = UNIT * UNIT * 4
MAX_PIXELS = 128 * 128
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (48, 80))  # (H, W) of the synthetic images

# --- planted phenomenon (shared with tiny-llava) -----------------------------------------------
TINY_SINK_DIMS = tl.TINY_SINK_DIMS
SINK_WRITER_LAYER = tl.SINK_WRITER_LAYER
FIRST_SINK_LAYER = tl.FIRST_SINK_LAYER
HEAD_PATTERNS = tl.HEAD_PATTERNS
PLANTED_IMAGE_CENTRIC_HEADS = tl.PLANTED_IMAGE_CENTRIC_HEADS
PLANTED_MIXED_HEADS = tl.PLANTED_MIXED_HEADS
SINK_TEXT_TOKEN = "<|im_start|>"

IMAGE_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    IMAGE_TOKEN, "<|video_pad|>", "<unk>",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_FORMAT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_PROMPTS = tl.DEFAULT_PROMPTS


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, "system", *tl._PUNCT, *tl._WORDS]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab


# ---------------------------------------------------------------------------------------------
# images


def synthetic_images(n: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES) -> list[Image.Image]:
    """``n`` deterministic RGB images cycling through ``sizes`` (H, W multiples of 16): a flat grey
    background (planted visual sinks) and 2-4 coloured boxes aligned to the 16-pixel token grid."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h_px, w_px = sizes[i % len(sizes)]
        gh, gw = h_px // UNIT, w_px // UNIT
        grey = float(rng.choice(tl._BACKGROUND_GREYS))
        pix = np.empty((h_px, w_px, 3), dtype=np.float64)
        pix[:] = np.clip(grey + rng.uniform(-0.01, 0.01, size=3), 0, 1)
        occupied = np.zeros((gh, gw), dtype=bool)
        for _obj in range(int(rng.integers(2, 5))):
            for _try in range(20):
                bh, bw = min(int(rng.integers(1, 3)), gh), min(int(rng.integers(1, 3)), gw)
                r, c = int(rng.integers(0, gh - bh + 1)), int(rng.integers(0, gw - bw + 1))
                if occupied[r : r + bh, c : c + bw].any() or occupied.sum() + bh * bw > gh * gw // 2:
                    continue
                occupied[r : r + bh, c : c + bw] = True
                colour = np.array(tl._OBJECT_COLOURS[int(rng.integers(len(tl._OBJECT_COLOURS)))])
                pix[r * UNIT : (r + bh) * UNIT, c * UNIT : (c + bw) * UNIT] = colour
                break
        if not occupied.any():
            pix[:UNIT, :UNIT] = tl._OBJECT_COLOURS[0]
        images.append(Image.fromarray(np.round(pix * 255).astype(np.uint8), mode="RGB"))
    return images


def unit_colourfulness(pixel_values: Any, grid_thw: Any) -> Any:
    """Colourfulness of each image token's (2x2 patches) mean colour, processor units, in the
    processor's token order. pixel_values [N_patches, 3*2*P*P]; returns [N_patches / 4]."""
    import torch

    pv = torch.as_tensor(pixel_values, dtype=torch.float32)
    patches = pv.reshape(-1, MERGE_SIZE * MERGE_SIZE, 3, TEMPORAL_PATCH * PATCH_SIZE * PATCH_SIZE)
    mean = patches.mean(dim=(1, 3))  # (N_units, 3)
    r, g, b = mean[:, 0], mean[:, 1], mean[:, 2]
    return (r - g).abs() + (g - b).abs() + (b - r).abs()


# ---------------------------------------------------------------------------------------------
# building


def _text_kwargs(vocab: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": len(vocab),
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": list(MROPE_SECTION)},
        "bos_token_id": None,
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _config(variant: Variant) -> Any:
    vocab = _vocab()
    ids = {
        "image_token_id": vocab[IMAGE_TOKEN],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }
    common = {
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "in_channels": 3,
        "num_heads": VISION_HEADS,
        "depth": VISION_DEPTH,
    }
    if variant == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            common, hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, hidden_act="silu",
            out_hidden_size=HIDDEN_SIZE, window_size=WINDOW_SIZE, fullatt_block_indexes=[VISION_DEPTH - 1],
        )
        return Qwen2_5_VLConfig(text_config=_text_kwargs(vocab), vision_config=vision, tie_word_embeddings=False, **ids)
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(common, embed_dim=VISION_HIDDEN, hidden_size=HIDDEN_SIZE, mlp_ratio=2, hidden_act="quick_gelu")
        return Qwen2VLConfig(text_config=_text_kwargs(vocab), vision_config=vision, tie_word_embeddings=False, **ids)
    raise ValueError(f"variant must be one of {VARIANTS}, found {variant!r}")


def model_class(variant: Variant) -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if variant == "qwen2_5_vl" else Qwen2VLForConditionalGeneration


def build_model(variant: Variant = "qwen2_5_vl") -> Any:
    """The tiny Qwen-VL model with its planted weights (eval, fp32), deterministic."""
    import torch

    cfg = _config(variant)
    torch.manual_seed(0)
    model = model_class(variant)(cfg).eval()
    gen = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        tl.init_parameters(model, gen, _init_std, norms=("norm", "ln_q"))
        _plant_vision(model, gen)
        _plant_text(model)
    return model


def _init_std(name: str) -> float:
    if "embed_tokens" in name:
        return 1.0
    if "lm_head" in name:
        return 0.05
    if "merger.mlp.0" in name:
        return 0.5
    if "merger.mlp.2" in name:
        return 0.8 / math.sqrt(4 * VISION_HIDDEN)  # image-token rms ~0.4: image-centric heads, sinks keep mass
    return 0.02


def _plant_vision(model: Any, gen: Any) -> None:
    """Patch embedding -> colour differences; an anchor pair; the merger makes the marker."""
    import torch

    visual = model.model.visual
    diff_dims, anchor = [0, 1, 2], [3, 4]
    anchor_value = 20.0
    w = visual.patch_embed.proj.weight  # (C_v, 3, T, P, P)
    w[diff_dims + anchor] = 0.0
    area = float(TEMPORAL_PATCH * PATCH_SIZE * PATCH_SIZE)
    for out_dim, (plus, minus) in zip(diff_dims, ((0, 1), (1, 2), (2, 0))):
        w[out_dim, plus] = 1.0 / area
        w[out_dim, minus] = -1.0 / area
    for i, blk in enumerate(visual.blocks):  # blocks never write the designed dims ...
        blk.attn.proj.weight[diff_dims + anchor] = 0.0
        blk.attn.proj.bias[diff_dims + anchor] = 0.0
        down = blk.mlp.down_proj if hasattr(blk.mlp, "down_proj") else blk.mlp.fc2
        down.weight[diff_dims + anchor] = 0.0
        down.bias[diff_dims + anchor] = 0.0
        if i == 0:  # ... except block 0's constant anchor (+A, -A): fixes the merger norm scale
            blk.attn.proj.bias[anchor[0]] = anchor_value
            blk.attn.proj.bias[anchor[1]] = -anchor_value
    ln_scale = math.sqrt(2 * anchor_value**2 / VISION_HIDDEN)
    units = MERGE_SIZE * MERGE_SIZE
    merger = visual.merger
    merger.ln_q.weight[diff_dims] = ln_scale
    merger.ln_q.weight[anchor] = 0.0

    gain = 4.0
    l1, l2 = merger.mlp[0], merger.mlp[2]  # (4C, 4C), (D, 4C)
    abs_units, const_unit = list(range(6)), 6
    l1.weight[: const_unit + 1] = 0.0
    l1.bias[: const_unit + 1] = 0.0
    for k, d in enumerate(diff_dims):  # mean over the unit's 4 patches of colour difference k
        for u in range(units):
            l1.weight[2 * k, u * VISION_HIDDEN + d] = gain / units
            l1.weight[2 * k + 1, u * VISION_HIDDEN + d] = -gain / units
    l1.bias[const_unit] = 1.0
    l1.bias[const_unit + 1 :] = torch.randn(l1.bias.shape[0] - const_unit - 1, generator=gen) * 0.1
    gelu_one = float(torch.nn.functional.gelu(torch.tensor(1.0)))
    designed = [tl.MARKER_DIM, tl.TEXT_FEATURE_DIM, tl.VISUAL_FEATURE_DIM, tl.BOS_FEATURE_DIM, tl.VISUAL_WORD_DIM]
    l2.weight[:, : const_unit + 1] = 0.0
    l2.weight[designed + list(TINY_SINK_DIMS)] = 0.0
    l2.bias.zero_()
    l2.weight[tl.MARKER_DIM, const_unit] = tl.MARKER_BIAS / gelu_one
    l2.weight[tl.MARKER_DIM, abs_units] = -tl.MARKER_SLOPE / gain
    l2.weight[tl.VISUAL_FEATURE_DIM, const_unit] = tl.FEATURE_VALUE / gelu_one


def _plant_text(model: Any) -> None:
    """tiny-llava's text circuits (``<|im_start|>`` plays BOS); q/k biases stay zero."""
    vocab = _vocab()
    lm = model.model.language_model
    emb = lm.embed_tokens.weight
    features = [tl.MARKER_DIM, tl.TEXT_FEATURE_DIM, tl.VISUAL_FEATURE_DIM, tl.BOS_FEATURE_DIM, tl.VISUAL_WORD_DIM]
    emb[:, features] = 0.0
    emb[:, tl.TEXT_FEATURE_DIM] = tl.FEATURE_VALUE
    emb[:, tl.MARKER_DIM] = -tl.FEATURE_VALUE
    emb[:, tl.VISUAL_WORD_DIM] = -tl.FEATURE_VALUE
    emb[[vocab[w] for w in sorted(tl.VISUAL_WORDS)], tl.VISUAL_WORD_DIM] = tl.FEATURE_VALUE
    sink = vocab[SINK_TEXT_TOKEN]
    emb[sink, tl.TEXT_FEATURE_DIM] = 0.0
    emb[sink, tl.BOS_FEATURE_DIM] = tl.FEATURE_VALUE
    emb[sink, tl.VISUAL_WORD_DIM] = 0.0
    emb[sink, tl.MARKER_DIM] = tl.FEATURE_VALUE
    tl.plant_text_circuits(lm, [tl.MARKER_DIM, tl.TEXT_FEATURE_DIM, tl.VISUAL_FEATURE_DIM,
                                tl.BOS_FEATURE_DIM, tl.VISUAL_WORD_DIM])


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_processor(variant: Variant = "qwen2_5_vl") -> Any:
    """The family's processor (tokenizer + PIL image processor, no video processor)."""
    from var_export.families import family_for_model_type

    return family_for_model_type(variant).make_processor(_image_processor(), _build_tokenizer(), CHAT_TEMPLATE)


_COMPLETE_MARKER = "tiny_qwen.json"


def build_tiny_qwen(out_dir: Path, variant: Variant = "qwen2_5_vl") -> Path:
    """Write the tiny Qwen-VL HF directory (config, safetensors, tokenizer, processor)."""
    info = {
        "version": TINY_QWEN_VERSION,
        "variant": variant,
        "sink_dims": list(TINY_SINK_DIMS),
        "planted_image_centric_heads": [list(h) for h in PLANTED_IMAGE_CENTRIC_HEADS],
        "first_sink_layer": FIRST_SINK_LAYER,
        "prompt_format": PROMPT_FORMAT,
    }
    model, processor = build_model(variant), build_processor(variant)
    return tl.write_model_dir(out_dir, model, processor, _COMPLETE_MARKER, info, f"tiny {variant}")


def _is_complete(path: Path, variant: str) -> bool:
    return tl.is_complete_dir(path, _COMPLETE_MARKER, version=TINY_QWEN_VERSION, variant=variant)


def tiny_qwen_dir(variant: Variant = "qwen2_5_vl") -> Path:
    """The cached tiny Qwen-VL directory, built on first use (atomically, like tiny-llava)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, found {variant!r}")
    return tl.cached_model_dir(
        f"tiny-{variant}-v{TINY_QWEN_VERSION}",
        lambda p: _is_complete(p, variant),
        lambda p: build_tiny_qwen(p, variant),
    )
