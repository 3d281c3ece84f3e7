"""The embedded default model ``tiny-llava``: a small LLaVA built in code, offline and deterministic.

It is an ordinary ``LlavaForConditionalGeneration`` (LLaMA text model with GQA, CLIP vision
tower, the standard two-layer GELU projector) saved with ``save_pretrained`` (safetensors)
together with a word-level tokenizer and a ``LlavaProcessor``. Random-small weights everywhere,
except a few planted circuits that make it exhibit the visual attention sink phenomenon of
DESIGN.md §1 with the default ``tau = 20``:

Sinks (planted).
  * Every token carries a scalar *marker* in hidden dim ``MARKER_DIM``: +4 for BOS (from its
    embedding), -4 for every other text token, and for image tokens a value computed from the
    patch content: ``MARKER_BIAS - MARKER_SLOPE * colourfulness`` where colourfulness is
    ``|R-G| + |G-B| + |B-R|`` of the patch mean colour in processor units ([-1, 1]). The vision
    tower passes the three colour differences through (an anchored pre-LayerNorm keeps them
    linear) and the projector's GELU pair units take their absolute values.
    Grey (low-saturation) patches get a positive marker, coloured patches a negative one; the
    boundary is colourfulness ``SINK_COLOURFULNESS_THRESHOLD`` (0.8, i.e. max-min of the
    channels ~0.2 in [0, 1] units for a single saturated hue).
  * The MLP of decoder layer ``SINK_WRITER_LAYER`` (1) has one unit ``silu(K m) * (K m)`` of the
    normalised marker ``m`` that writes a massive value into ``TINY_SINK_DIMS`` (+ into the
    first, - into the second). So BOS and the grey background patches are sinks at the input of
    layers >= 2 (max |rmsnorm(x)[d]| ~ 22.6 > 20 over the sink dims) and nothing is a sink at
    layers 0 and 1. Object (coloured) patches and text tokens are never sinks.

Heads (planted), layers >= 2, for text query tokens. Every KV head has three content keys in
its lowest-frequency rotary pairs (so the logits do not depend on position): dim 63 "visual
non-sink", dim 62 "sink", dim 61 "text". Each query head picks one pattern:
  * ``image``: logits +6 visual non-sink, +2.5 sinks, +2 text -> image-centric on every row
    (visual-sink portion 0.05-0.35, so VAR has something to move) (``PLANTED_IMAGE_CENTRIC_HEADS``);
  * ``sink``: logit +7 on sinks (BOS and visual sinks) -> visual-sink portion ~1, not image-centric;
  * ``text``: logit +6 on text keys -> visual mass ~0, not image-centric;
  * ``mixed``: image-centric exactly on rows whose token is in ``VISUAL_WORDS`` (a word feature
    in ``VISUAL_WORD_DIM``), a text head elsewhere (``PLANTED_MIXED_HEADS``): dynamic and static
    head selection differ on it.

Prompt format (also the processor's chat template): ``USER: <image>\\n{prompt} ASSISTANT:``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Bump when the weights, tokenizer or processor change: the cache directory is versioned.
TINY_LLAVA_VERSION = 2

# --- text model sizes ----------------------------------------------------------------------
HIDDEN_SIZE = 1024  # max |rmsnorm(x)[d]| <= sqrt(hidden); two equal sink dims give sqrt(512)=22.6
NUM_LAYERS = 4  # decoder layers; sinks and planted heads live in layers 2 and 3
NUM_HEADS = 8  # query heads
NUM_KV_HEADS = 2  # GQA: 4 query heads per KV head
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 128
INTERMEDIATE_SIZE = 256  # small MLPs
MAX_POSITIONS = 512  # max_position_embeddings
ROPE_THETA = 10000.0

# --- vision tower sizes ---------------------------------------------------------------------
IMAGE_SIZE = 64  # processor output is IMAGE_SIZE x IMAGE_SIZE
PATCH_SIZE = 8  # -> 8 x 8 = 64 image tokens per image
GRID = IMAGE_SIZE // PATCH_SIZE  # patches per side
NUM_IMAGE_TOKENS = GRID * GRID  # visual tokens per image ("default" strategy drops CLS)
VISION_HIDDEN = 64
VISION_LAYERS = 2  # features come from hidden_states[-2] (LLaVA default)

# --- the planted phenomenon -----------------------------------------------------------------
TINY_SINK_DIMS: tuple[int, ...] = (5, 17)  # hidden dims that carry the massive activations
SINK_WRITER_LAYER = 1  # the MLP of this layer writes the sink dims -> sinks from layer 2 on
FIRST_SINK_LAYER = SINK_WRITER_LAYER + 1
MARKER_DIM = 103  # hidden dim carrying the sink marker (positive -> becomes a sink)
TEXT_FEATURE_DIM = 100  # constant feature of text tokens (query/key content for text)
VISUAL_FEATURE_DIM = 101  # constant feature of image tokens (key content for visual tokens)
BOS_FEATURE_DIM = 102  # feature of BOS
VISUAL_WORD_DIM = 104  # +4 for words in VISUAL_WORDS, -4 for other text tokens (mixed heads)
FEATURE_VALUE = 4.0  # value of the constant features above
MARKER_BIAS = 2.0  # marker of a perfectly grey patch
MARKER_SLOPE = 2.5  # marker decrease per unit of colourfulness
SINK_COLOURFULNESS_THRESHOLD = MARKER_BIAS / MARKER_SLOPE  # 0.8: patches below it are sinks
SINK_TEXT_TOKENS: tuple[str, ...] = ("<s>",)  # text tokens planted as sinks (BOS)

# Per layer >= 2, the attention pattern of each query head for text queries.
HEAD_PATTERNS: dict[int, tuple[str, ...]] = {
    2: ("sink", "image", "text", "sink", "text", "sink", "image", "text"),
    3: ("mixed", "sink", "image", "text", "sink", "image", "sink", "text"),
}
# Words whose rows a "mixed" head treats image-centrically (other rows look at text).
VISUAL_WORDS: frozenset[str] = frozenset(
    "image picture photo object objects shape shapes square squares color colour colors red green "
    "blue yellow orange purple pink cyan magenta".split()
)
PLANTED_IMAGE_CENTRIC_HEADS: list[tuple[int, int]] = sorted(
    (layer, head)
    for layer, pats in HEAD_PATTERNS.items()
    for head, pat in enumerate(pats)
    if pat == "image"
)  # [(2, 1), (2, 6), (3, 2), (3, 5)]
# Heads that are image-centric exactly on the rows of VISUAL_WORDS tokens (score in between).
PLANTED_MIXED_HEADS: list[tuple[int, int]] = sorted(
    (layer, head)
    for layer, pats in HEAD_PATTERNS.items()
    for head, pat in enumerate(pats)
    if pat == "mixed"
)  # [(3, 0)]
# (visual non-sink, sink, text) logits of a text query for each pattern
_PATTERN_LOGITS: dict[str, tuple[float, float, float]] = {
    "image": (6.0, 2.5, 2.0),
    "mixed": (6.0, 0.0, 3.0),  # visual logit times the sign of the VISUAL_WORD_DIM feature
    "sink": (0.0, 7.0, 0.0),
    "text": (0.0, 0.0, 6.0),
}
_KEY_DIM_VISUAL, _KEY_DIM_SINK, _KEY_DIM_TEXT = HEAD_DIM // 2 - 1, HEAD_DIM // 2 - 2, HEAD_DIM // 2 - 3

PROMPT_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
DEFAULT_PROMPTS: list[str] = [
    "What is in the image?",
    "Describe the picture in detail.",
    "How many objects are there?",
    "What color is the square on the left?",
    "Is there a red object in this image?",
    "Where is the blue shape?",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_WORDS = """
user assistant what is in the image picture photo describe detail details how many objects
object there are color colour colors square squares rectangle shape shapes circle left right
top bottom middle center corner a an the of on at to and or with without this that these those
red green blue yellow orange purple pink cyan magenta white black gray grey brown dark light
big small large tiny one two three four five six seven eight nine ten zero some any all none
where which who why when does do can could would should will it its they them he she we you
i me my your our their here near far above below under over between next behind front back
background foreground side edge plain flat bright bright dull empty full scene view see look
show shows showing contains contain has have had be been being was were yes no not only also
very more most less few many much same different other another each every both either neither
count number answer question please tell me about first second third last name kind type
thing things item items box boxes block blocks patch patches area region part parts whole
up down inside outside around across along image's is_there colored coloured painted drawn
simple synthetic test sample example small-ish table wall floor sky ground grass water tree
house car dog cat person people man woman child bird fish book cup chair door window road
""".split()
_PUNCT = ["?", ".", ",", "!", ":", ";", "'", "-", "(", ")", '"']


def _vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *_PUNCT, *_WORDS]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab


# ---------------------------------------------------------------------------------------------
# images


_BACKGROUND_GREYS = (0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.92)
_OBJECT_COLOURS = (
    (0.90, 0.10, 0.10),  # red
    (0.10, 0.75, 0.15),  # green
    (0.15, 0.25, 0.90),  # blue
    (0.95, 0.85, 0.10),  # yellow
    (0.85, 0.15, 0.85),  # magenta
    (0.10, 0.80, 0.85),  # cyan
    (0.95, 0.55, 0.05),  # orange
    (0.50, 0.10, 0.80),  # purple
)


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic IMAGE_SIZE x IMAGE_SIZE RGB images: flat grey background, 2-4 coloured boxes.

    Objects are aligned to the PATCH_SIZE grid, so every patch is either pure background
    (planted visual sink) or pure object (never a sink). At least 4 and at most half of the
    patches are object patches.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        grey = float(rng.choice(_BACKGROUND_GREYS))
        tint = rng.uniform(-0.01, 0.01, size=3)
        pix = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
        pix[:] = np.clip(grey + tint, 0, 1)
        occupied = np.zeros((GRID, GRID), dtype=bool)
        n_obj = int(rng.integers(2, 5))
        for _obj in range(n_obj):
            for _try in range(20):
                h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
                r, c = int(rng.integers(0, GRID - h + 1)), int(rng.integers(0, GRID - w + 1))
                if occupied[r : r + h, c : c + w].any() or occupied.sum() + h * w > NUM_IMAGE_TOKENS // 2:
                    continue
                occupied[r : r + h, c : c + w] = True
                colour = np.array(_OBJECT_COLOURS[int(rng.integers(len(_OBJECT_COLOURS)))])
                pix[r * PATCH_SIZE : (r + h) * PATCH_SIZE, c * PATCH_SIZE : (c + w) * PATCH_SIZE] = colour
                break
        if occupied.sum() < 4:  # guarantee some object patches: a 2x2 box in a free corner
            for r, c in ((0, 0), (0, GRID - 2), (GRID - 2, 0), (GRID - 2, GRID - 2)):
                if not occupied[r : r + 2, c : c + 2].any():
                    occupied[r : r + 2, c : c + 2] = True
                    pix[r * PATCH_SIZE : (r + 2) * PATCH_SIZE, c * PATCH_SIZE : (c + 2) * PATCH_SIZE] = (
                        _OBJECT_COLOURS[0]
                    )
                    break
        img = Image.fromarray(np.round(pix * 255).astype(np.uint8), mode="RGB")
        images.append(img)
    return images


def patch_colourfulness(pixel_values: Any) -> Any:
    """Colourfulness ``|R-G|+|G-B|+|B-R|`` of each patch's mean colour, processor units.

    ``pixel_values``: (B, 3, IMAGE_SIZE, IMAGE_SIZE) tensor from the tiny processor. Returns
    (B, NUM_IMAGE_TOKENS) in row-major patch order. Patches below SINK_COLOURFULNESS_THRESHOLD
    are planted visual sinks (the model computes this statistic approximately).
    """
    import torch

    pv = torch.as_tensor(pixel_values, dtype=torch.float32)
    b = pv.shape[0]
    mean = pv.reshape(b, 3, GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(dim=(3, 5))  # (B, 3, G, G)
    r, g, bl = mean[:, 0], mean[:, 1], mean[:, 2]
    col = (r - g).abs() + (g - bl).abs() + (bl - r).abs()  # (B, G, G)
    return col.reshape(b, GRID * GRID)


# ---------------------------------------------------------------------------------------------
# building


def text_config_kwargs(vocab: dict[str, int]) -> dict[str, Any]:
    """The tiny text model's config (sizes, rotary, special tokens), shared by the tiny models
    whose decoder is tiny-llava's (tiny_anyres, tiny_internvl) whatever its HF class."""
    return dict(
        vocab_size=len(vocab),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )


def _configs() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = _vocab()
    text = LlamaConfig(**text_config_kwargs(vocab))
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN,
        hidden_act="quick_gelu",
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = vocab["<pad>"]
    return cfg


def build_model() -> Any:
    """The tiny-llava ``LlavaForConditionalGeneration`` with its planted weights (eval, fp32)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = _configs()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        init_parameters(model, gen, _init_std)
        _plant_vision(model, gen)
        _plant_text(model)
    return model


def init_parameters(model: Any, gen: Any, init_std: Callable[[str], float], norms: tuple[str, ...] = ("norm",)) -> None:
    """Overwrite every parameter deterministically, in name order (HF init may change between
    versions): norm weights 1 and biases 0 (names containing one of ``norms``), other biases 0,
    the rest ``N(0, init_std(name)^2)`` drawn from ``gen``. Call under ``torch.no_grad()``."""
    import torch

    for name, p in sorted(model.named_parameters()):
        if any(n in name for n in norms):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * init_std(name))


def _init_std(name: str) -> float:
    if "embed_tokens" in name:
        return 1.0
    if "lm_head" in name:
        return 0.05
    if "multi_modal_projector.linear_1" in name:
        return 0.5
    if "multi_modal_projector.linear_2" in name:
        return 1.2 / math.sqrt(HIDDEN_SIZE)
    if "vision_tower" in name and ("class_embedding" in name or "position_embedding" in name):
        return 0.05
    return 0.02  # attention, MLPs, patch embedding


def _plant_vision(model: Any, gen: Any) -> None:
    """Vision tower passes the patch-mean colour differences through; projector makes the marker."""

    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)  # transformers 4.x nests it; 5.x does not
    emb = vt.embeddings
    diff_dims, anchor = (0, 1, 2), (3, 4)
    anchor_value = 20.0
    w = emb.patch_embedding.weight  # (VISION_HIDDEN, 3, P, P)
    w[list(diff_dims) + list(anchor)] = 0.0
    area = float(PATCH_SIZE * PATCH_SIZE)
    for out_dim, (plus, minus) in zip(diff_dims, ((0, 1), (1, 2), (2, 0))):
        w[out_dim, plus] = 1.0 / area  # mean(channel plus) - mean(channel minus)
        w[out_dim, minus] = -1.0 / area
    for table in (emb.position_embedding.weight, emb.class_embedding.view(1, -1)):
        table[:, list(diff_dims)] = 0.0
        table[:, anchor[0]] = anchor_value  # a large +-A pair fixes the LayerNorm scale, so the
        table[:, anchor[1]] = -anchor_value  # colour differences pass it (nearly) linearly
    ln_scale = math.sqrt(2 * anchor_value**2 / VISION_HIDDEN)  # std of an embedding ~ the anchor
    vt.pre_layrnorm.weight[list(diff_dims)] = ln_scale
    vt.pre_layrnorm.weight[list(anchor)] = 0.0
    for layer in vt.encoder.layers:  # encoder layers never write the colour-difference dims
        layer.self_attn.out_proj.weight[list(diff_dims)] = 0.0
        layer.mlp.fc2.weight[list(diff_dims)] = 0.0

    proj = model.model.multi_modal_projector
    gain = 4.0  # GELU(g x) + GELU(-g x) ~ g |x| for |g x| >~ 2
    l1w, l1b = proj.linear_1.weight, proj.linear_1.bias  # (H, VISION_HIDDEN), (H,)
    abs_units, const_unit = list(range(6)), 6
    l1w[: const_unit + 1] = 0.0
    l1b[: const_unit + 1] = 0.0
    for k, d in enumerate(diff_dims):
        l1w[2 * k, d] = gain
        l1w[2 * k + 1, d] = -gain
    plant_marker_head(proj, gen, const_unit=const_unit, abs_units=abs_units, slope_per_unit=MARKER_SLOPE / gain)


def plant_marker_head(proj: Any, gen: Any, *, const_unit: int, abs_units: list[int], slope_per_unit: float) -> None:
    """The projector's output layer of every tiny model: a constant GELU unit (``const_unit``) and
    ``|difference|`` units (``abs_units``) make the marker ``MARKER_BIAS - slope * colourfulness`` and the
    visual feature; the other first-layer biases are small random values (drawn from ``gen`` here)."""
    import torch

    l1b = proj.linear_1.bias
    l1b[const_unit] = 1.0
    gelu_one = float(torch.nn.functional.gelu(torch.tensor(1.0)))
    l1b[const_unit + 1 :] = torch.randn(HIDDEN_SIZE - const_unit - 1, generator=gen) * 0.1
    l2w = proj.linear_2.weight  # (H, H)
    l2w[:, : const_unit + 1] = 0.0
    l2w[[MARKER_DIM, TEXT_FEATURE_DIM, VISUAL_FEATURE_DIM, BOS_FEATURE_DIM]] = 0.0
    l2w[MARKER_DIM, const_unit] = MARKER_BIAS / gelu_one
    l2w[MARKER_DIM, abs_units] = -slope_per_unit
    l2w[VISUAL_FEATURE_DIM, const_unit] = FEATURE_VALUE / gelu_one


def _plant_text(model: Any) -> None:
    """Feature dims in the embeddings, the layer-1 sink writer, the layer >= 2 head patterns."""
    vocab = _vocab()
    lm = model.model.language_model
    features = [MARKER_DIM, TEXT_FEATURE_DIM, VISUAL_FEATURE_DIM, BOS_FEATURE_DIM, VISUAL_WORD_DIM]
    emb = lm.embed_tokens.weight  # (V, H)
    emb[:, features] = 0.0
    emb[:, TEXT_FEATURE_DIM] = FEATURE_VALUE
    emb[:, MARKER_DIM] = -FEATURE_VALUE
    emb[:, VISUAL_WORD_DIM] = -FEATURE_VALUE
    emb[[vocab[w] for w in sorted(VISUAL_WORDS)], VISUAL_WORD_DIM] = FEATURE_VALUE
    bos = vocab["<s>"]
    emb[bos, TEXT_FEATURE_DIM] = 0.0
    emb[bos, BOS_FEATURE_DIM] = FEATURE_VALUE
    emb[bos, VISUAL_WORD_DIM] = 0.0
    emb[bos, MARKER_DIM] = FEATURE_VALUE
    plant_text_circuits(lm, features)


def plant_text_circuits(lm: Any, features: list[int]) -> None:
    """The decoder circuits (shared with tiny_qwen): no layer writes the designed dims except the
    layer-1 sink writer; the layer >= 2 head patterns. ``lm``: the decoder stack (``.layers``)."""
    designed = [*TINY_SINK_DIMS, *features]
    for layer in lm.layers:  # no layer writes the designed dims, except the sink writer below
        layer.self_attn.o_proj.weight[designed] = 0.0
        layer.mlp.down_proj.weight[designed] = 0.0

    writer = lm.layers[SINK_WRITER_LAYER].mlp
    gain, out = 6.0, 4.0
    writer.gate_proj.weight[0] = 0.0
    writer.up_proj.weight[0] = 0.0
    writer.down_proj.weight[:, 0] = 0.0
    writer.gate_proj.weight[0, MARKER_DIM] = gain
    writer.up_proj.weight[0, MARKER_DIM] = gain
    writer.down_proj.weight[TINY_SINK_DIMS[0], 0] = out
    writer.down_proj.weight[TINY_SINK_DIMS[1], 0] = -out

    sink_norm = math.sqrt(HIDDEN_SIZE / 2)  # |rmsnorm(x)[d]| of a sink in each sink dim
    feat_norm = FEATURE_VALUE  # ~ rmsnorm of a feature of value 4 in a token of rms ~1
    scale = math.sqrt(HEAD_DIM)
    for layer_idx, patterns in HEAD_PATTERNS.items():
        attn = lm.layers[layer_idx].self_attn
        qw = attn.q_proj.weight.view(NUM_HEADS, HEAD_DIM, HIDDEN_SIZE)
        kw = attn.k_proj.weight.view(NUM_KV_HEADS, HEAD_DIM, HIDDEN_SIZE)
        vw = attn.v_proj.weight
        vw[:, list(TINY_SINK_DIMS)] = 0.0  # sinks carry (almost) nothing in their values
        kw[:, :, list(TINY_SINK_DIMS)] = 0.0
        content = [_KEY_DIM_VISUAL, _KEY_DIM_SINK, _KEY_DIM_TEXT]
        kw[:, content] = 0.0
        # lowest-frequency rotary dims (and their rotate_half partners) carry the content keys
        kw[:, [c + HEAD_DIM // 2 for c in content]] = 0.0
        kw[:, _KEY_DIM_VISUAL, VISUAL_FEATURE_DIM] = 1.0 / feat_norm
        kw[:, _KEY_DIM_SINK, TINY_SINK_DIMS[0]] = 0.5 / sink_norm
        kw[:, _KEY_DIM_SINK, TINY_SINK_DIMS[1]] = -0.5 / sink_norm
        kw[:, _KEY_DIM_TEXT, TEXT_FEATURE_DIM] = 1.0 / feat_norm
        qw[:, content] = 0.0
        qw[:, [c + HEAD_DIM // 2 for c in content]] = 0.0
        for head, pattern in enumerate(patterns):
            for key_dim, logit in zip(content, _PATTERN_LOGITS[pattern]):
                qw[head, key_dim, TEXT_FEATURE_DIM] = logit * scale / feat_norm
            if pattern == "mixed":  # the visual logit follows the token's visual-word feature
                visual_logit = _PATTERN_LOGITS[pattern][0]
                qw[head, _KEY_DIM_VISUAL, TEXT_FEATURE_DIM] = 0.0
                qw[head, _KEY_DIM_VISUAL, VISUAL_WORD_DIM] = visual_logit * scale / feat_norm


def word_tokenizer(vocab: dict[str, int], extra_special_tokens: dict[str, str]) -> Any:
    """The tiny models' word-level tokenizer: lower-cased, whitespace-split, ``<s>`` prepended,
    left padding; ``extra_special_tokens`` names the image (and video) tokens."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra_special_tokens,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )


def _build_tokenizer() -> Any:
    return word_tokenizer(_vocab(), {"image_token": "<image>"})


def _build_processor() -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


_COMPLETE_MARKER = "tiny_llava.json"


def build_tiny_llava(out_dir: Path) -> Path:
    """Write the tiny-llava HF directory (config, safetensors, tokenizer, processor) to ``out_dir``."""
    info = {
        "version": TINY_LLAVA_VERSION,
        "sink_dims": list(TINY_SINK_DIMS),
        "planted_image_centric_heads": [list(h) for h in PLANTED_IMAGE_CENTRIC_HEADS],
        "first_sink_layer": FIRST_SINK_LAYER,
        "prompt_format": PROMPT_FORMAT,
    }
    return write_model_dir(out_dir, build_model(), _build_processor(), _COMPLETE_MARKER, info, "tiny-llava")


def _is_complete(path: Path) -> bool:
    return is_complete_dir(path, _COMPLETE_MARKER, version=TINY_LLAVA_VERSION)


def tiny_llava_dir() -> Path:
    """The cached tiny-llava directory, built on first use (atomically: temp dir, then rename).

    Location: ``$VAR_EXPORT_CACHE/tiny-llava-v<N>`` or ``~/.cache/var-export/tiny-llava-v<N>``.
    An incomplete directory (interrupted build, other version) is rebuilt.
    """
    return cached_model_dir(f"tiny-llava-v{TINY_LLAVA_VERSION}", _is_complete, build_tiny_llava)


# ---------------------------------------------------------------------------------------------
# the cached HF directories of every tiny model (tiny_anyres, tiny_internvl and tiny_qwen too)


def write_model_dir(out_dir: Path, model: Any, processor: Any, marker: str, info: dict[str, Any], label: str) -> Path:
    """Save ``model`` (safetensors) and ``processor`` to ``out_dir``, then the completion
    ``marker`` file (``info`` as JSON), last, so that a partial directory never reads as complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / marker).write_text(json.dumps(info, indent=1))
    logger.info("built %s v%d in %s", label, info["version"], out_dir)
    return out_dir


def is_complete_dir(path: Path, marker: str, **expected: object) -> bool:
    """``path`` holds config.json, safetensors weights and a ``marker`` whose JSON has ``expected``."""
    marker_path = path / marker
    if not marker_path.is_file() or not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False
    try:
        info = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return False
    return all(info.get(key) == value for key, value in expected.items())


def _cache_root() -> Path:
    env = os.environ.get("VAR_EXPORT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "var-export"


def cached_model_dir(name: str, complete: Callable[[Path], bool], build: Callable[[Path], Path]) -> Path:
    """``$VAR_EXPORT_CACHE/<name>`` (or ~/.cache/var-export/<name>), built atomically on first use:
    ``build`` writes a temporary directory that is then renamed; an incomplete one is rebuilt."""
    root = _cache_root()
    final = root / name
    if complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=root))
    try:
        build(tmp)
        if final.exists() and not complete(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not complete(final):  # lost a race to a broken dir: should not happen
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
