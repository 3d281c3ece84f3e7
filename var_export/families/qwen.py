"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

What differs from LLaVA-1.5 (DESIGN.md §3, "Other families"):

* **M-RoPE.** ``position_ids`` is [3, B, S] int64 (temporal, height, width), exactly HF's
  ``get_rope_index`` (:func:`rope_index`, a numpy port: each row's positions start at its first
  real token, pads get 0, image tokens take their (t, h, w) grid coordinates). Decode steps
  continue at ``cumsum(mask) - 1 + rope_deltas`` with the per-sample ``rope_deltas`` [B, 1]
  (negative) returned by the prefill: the caller carries it (no graph does).
* **Dynamic-resolution vision.** ``vision_encoder.onnx`` takes the processor's flattened patches
  ``pixel_values`` [N_patches, C*T*P*P] and ``image_grid_thw`` [n_images, 3] int64 and returns
  ``image_features`` [N_image_tokens, D]. HF splits attention into per-image (and, for
  Qwen2.5-VL, per-window) chunks with Python lists computed from the grid values, so a traced
  graph would be right for one grid only. :class:`_VisionGraph` instead derives every patch's
  image, frame, (h, w) coordinates and window from ``image_grid_thw`` with tensor ops and runs
  each block's attention with a block-diagonal mask: the same attention, correct for any grid.
  (Qwen2.5-VL's window permutation only reorders merge units and is undone after the merger; with
  a mask no permutation is needed.)
* **Processor.** The Qwen processors also load a video processor, which needs torchvision; this
  family builds the processor from the image processor (PIL backend) and the tokenizer only.
* No BOS: the first-token text sink is ``<|im_start|>``. Attention has q/k/v biases (plain Add
  nodes before the rotary embedding; nothing for the passes to do).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import DataError, ModelLoadError
from var_export.families.base import DecoderParts, ModelFamily, VisionExport, register

log = logging.getLogger(__name__)

_MASK_MIN = -1e9  # additive mask of the vision graph's block-diagonal attention (fp16-safe after cast)


# ---------------------------------------------------------------------------------------------
# positions (numpy, torch-free): HF get_rope_index for images


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions [3, B, S] int64 and rope deltas [B, 1] of a left/right padded batch.

    Port of ``Qwen2_5_VLModel.get_rope_index`` for images (video tokens are refused): text runs
    advance all three rows by one per token; an image of grid (t, h, w) patches at position ``p``
    takes (p + t_i, p + h_i, p + w_i) over its (t, h/m, w/m) token grid and advances ``p`` by
    max(h, w) / m. Pads keep 0. ``rope_deltas = max position + 1 - real length``.
    ``spatial_merge_size`` None: m is read off each image-token run (t*h*w / m^2 tokens).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64).astype(bool)
    types = np.asarray(mm_token_type_ids, dtype=np.int64)
    b, s = ids.shape
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    positions = np.zeros((3, b, s), dtype=np.int64)
    deltas = np.zeros((b, 1), dtype=np.int64)
    for row in range(b):
        kinds = types[row][mask[row]]  # (L,) 0 text, 1 image, 2 video
        if (kinds == 2).any():
            raise DataError("video tokens are not supported by var-export's Qwen-VL path; pass images.")
        pieces: list[np.ndarray] = []
        pos, i = 0, 0
        while i < len(kinds):
            j = i
            while j < len(kinds) and kinds[j] == kinds[i]:
                j += 1
            if kinds[i] == 0:
                pieces.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
                pos += j - i
            else:
                try:
                    t, h, w = (int(x) for x in next(grids))
                except StopIteration:
                    raise DataError("more image-token runs than rows in image_grid_thw; use the model's processor.") from None
                m = int(spatial_merge_size or round(float(np.sqrt(t * h * w / (j - i)))))
                gt, gh, gw = t, h // m, w // m
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
                pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + pos)  # (3, t*gh*gw)
                if gt * gh * gw != j - i:
                    raise DataError(
                        f"an image-token run has {j - i} tokens but its grid {t}x{h}x{w} gives "
                        f"{gt * gh * gw}; use the model's processor."
                    )
                pos += max(h, w) // m
            i = j
        llm = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, mask[row]] = llm
        deltas[row, 0] = (int(llm.max()) + 1 - llm.shape[1]) if llm.size else 0
    return positions, deltas


def qwen_image_token_bounds(processor: Mapping[str, Any], merge: int) -> tuple[int, int | None]:
    """(fewest, most or None) image tokens of one image under the image processor's pixel bounds
    (``min_pixels`` / ``max_pixels``, or ``size.shortest_edge`` / ``size.longest_edge`` as
    transformers 5 saves them) and ``patch_size``; (1, None) when they are unknown."""
    size = processor.get("size") if isinstance(processor.get("size"), Mapping) else {}
    lo_px = processor.get("min_pixels") or size.get("shortest_edge")
    hi_px = processor.get("max_pixels") or size.get("longest_edge")
    patch = processor.get("patch_size")
    if not patch:
        return 1, None
    area = (int(patch) * int(merge)) ** 2  # pixels per image token
    lo = max(1, int(lo_px) // area) if lo_px else 1
    hi = max(lo, int(hi_px) // area) if hi_px else None
    return lo, hi


def mrope_decode_positions(attention_mask: np.ndarray, rope_deltas: np.ndarray) -> np.ndarray:
    """[3, B, 1] positions of the newest token: ``cumsum(mask) - 1 + rope_deltas`` (HF generate)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1)[:, -1:] - 1 + np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.int64).copy()


# ---------------------------------------------------------------------------------------------
# the family


class QwenVLFamily(ModelFamily):
    """Qwen2.5-VL (window attention in the vision tower)."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    mrope = True
    vision_inputs = ("pixel_values", "image_grid_thw")
    processor_keys = ("image_grid_thw", "mm_token_type_ids")

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def processor_class(self) -> type:
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor

    # -- processor ---------------------------------------------------------------------------

    def load_processor(self, path: Path, *, trust_remote_code: bool = False) -> Any:
        """Image processor (PIL backend) + tokenizer + chat template; no video processor."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        try:
            import torchvision  # noqa: F401
        except ImportError:
            log.info(
                "torchvision is not installed: loading the Qwen-VL image processor and tokenizer "
                "without the video processor (images only)"
            )
        path = Path(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return self.make_processor(image_processor, tokenizer, _chat_template(path, tokenizer))

    def make_processor(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
        return _image_only_processor(self.processor_class())(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
        )

    def manifest_fields(self, config: Any) -> dict[str, Any]:
        """M-RoPE: tells a runtime how decoder positions are made (no graph carries rope_deltas)."""
        return {
            "mrope": True,
            "position_ids": "[3, B, S] int64: HF get_rope_index at prefill (rope_deltas [B, 1] = max "
            "position + 1 - prompt length); decode: cumsum(attention_mask) - 1 + rope_deltas",
            "spatial_merge_size": int(config.vision_config.spatial_merge_size),
        }

    def vision_profile_axes(
        self,
        manifest: Mapping[str, Any],
        processor: Mapping[str, Any],
        *,
        images: tuple[int, int, int],
        sequence: tuple[int, int, int],
    ) -> dict[str, dict[int, tuple[int, int, int]]]:
        """``pixel_values`` [N_patches, C*T*P*P] and ``image_grid_thw`` [images, 3].

        An image is t*h*w patches, m^2 patches per image token (m: spatial merge size). Its
        tokens lie between the image processor's ``min_pixels`` / ``max_pixels`` over (P*m)^2
        (P: patch size) and never exceed a prompt (``sequence``); without processor settings,
        1 .. a prompt's worth. Opt: the geometric mean of those bounds per image. Every bound is
        a whole number of tokens (m^2 patches), as the graph requires.
        """
        m = int(manifest.get("spatial_merge_size") or processor.get("merge_size") or 0)
        if m <= 0:
            raise DataError(
                "a Qwen-VL bundle's manifest records spatial_merge_size (patches per image token "
                "side); found none. Re-export the bundle with this var-export."
            )
        lo_tok, hi_tok = qwen_image_token_bounds(processor, m)
        hi_tok = min(hi_tok, int(sequence[2])) if hi_tok else int(sequence[2])
        lo_tok = min(lo_tok, hi_tok)
        opt_tok = max(lo_tok, min(hi_tok, int(round(float(np.sqrt(lo_tok * hi_tok))))))
        unit = m * m
        patches = (unit * lo_tok * images[0], unit * opt_tok * images[1], unit * hi_tok * images[2])
        return {"pixel_values": {0: patches}, "image_grid_thw": {0: images}}

    def prefill_positions(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        missing = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k not in batch]
        if missing:
            raise DataError(
                f"M-RoPE positions need {missing} from the Qwen-VL processor; found only {sorted(batch)}."
            )
        return rope_index(
            _np(batch["input_ids"]), _np(batch["attention_mask"]), _np(batch["mm_token_type_ids"]),
            None if batch.get("image_grid_thw") is None else _np(batch["image_grid_thw"]),
        )

    def decode_positions(self, attention_mask: np.ndarray, state: Any) -> np.ndarray:
        return mrope_decode_positions(attention_mask, state)

    # -- torch -------------------------------------------------------------------------------

    def parts(self, model: Any) -> DecoderParts:
        inner = getattr(model, "model", None)
        lm, visual = getattr(inner, "language_model", None), getattr(inner, "visual", None)
        if lm is None or visual is None or getattr(model, "lm_head", None) is None:
            raise ModelLoadError(
                f"expected a Qwen-VL model (model.visual, model.language_model, lm_head); found "
                f"{type(model).__name__} without them. Load it with var_export.models.load_llava."
            )
        return DecoderParts(
            language_model=lm, lm_head=model.lm_head, embed_tokens=model.get_input_embeddings(),
            text_config=model.config.get_text_config(decoder=True), config=model.config,
        )

    def image_features(self, model: Any, batch: Mapping[str, Any]) -> Any:
        import torch

        grid = batch.get("image_grid_thw")
        if grid is None:
            raise DataError("Qwen-VL image features need image_grid_thw from the processor; found none.")
        pixel_values = torch.as_tensor(batch["pixel_values"])
        out = model.model.get_image_features(
            pixel_values=pixel_values, image_grid_thw=torch.as_tensor(grid), return_dict=True
        )
        return torch.cat(list(out.pooler_output), dim=0)  # (N_image_tokens, D)

    def vision_export(self, model: Any, dtype: Any) -> VisionExport:
        import torch
        from torch.export import Dim

        module = _VisionGraph(model.model.visual).eval()
        vc = model.config.vision_config
        m, p, t = int(vc.spatial_merge_size), int(vc.patch_size), int(vc.temporal_patch_size)
        # two images of different grids so that nothing is specialised
        grid = torch.tensor([[1, 2 * m, 3 * m], [1, 3 * m, 2 * m]], dtype=torch.int64)
        n = int(grid.prod(-1).sum())
        pixel_values = torch.randn(n, int(vc.in_channels) * t * p * p, dtype=dtype)
        units, images = Dim("image_tokens"), Dim("images")
        return VisionExport(
            module=module,
            args=(pixel_values, grid),
            dynamic_shapes=({0: (m * m) * units}, {0: images}),
            input_names=list(self.vision_inputs),
            output_names=["image_features"],
        )


class Qwen2VLFamily(QwenVLFamily):
    """Qwen2-VL (full attention in every vision block)."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def processor_class(self) -> type:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor


def unpatchify(pixel_values: Any, grid_thw: Any, image_processor: Any) -> Any:
    """The first image of a Qwen-VL batch back as (3, H, W) (processor units, first frame).

    pixel_values [N_patches, C*T*P*P] in the processor's (t, h/m, w/m, m, m) patch order.
    """
    import torch

    t, h, w = (int(x) for x in grid_thw[0])
    p, m = int(image_processor.patch_size), int(image_processor.merge_size)
    tp = int(image_processor.temporal_patch_size)
    pv = torch.as_tensor(pixel_values)[: t * h * w].float()
    pv = pv.reshape(t, h // m, w // m, m, m, 3, tp, p, p)[0, ..., 0, :, :]  # (h/m, w/m, m, m, 3, P, P)
    pv = pv.permute(4, 0, 2, 5, 1, 3, 6)  # (3, h/m, m, P, w/m, m, P)
    return pv.reshape(3, h * p, w * p)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        f = path / name
        if f.is_file():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


_PROCESSORS: dict[type, type] = {}


def _image_only_processor(base: type) -> type:
    """``base`` (Qwen2VLProcessor / Qwen2_5_VLProcessor) without the video processor attribute."""
    if base in _PROCESSORS:
        return _PROCESSORS[base]
    from transformers.processing_utils import ProcessorMixin

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})
    _PROCESSORS[base] = cls
    return cls


# ---------------------------------------------------------------------------------------------
# the vision graph (torch)


def _patch_layout(grid_thw: Any, n_patches: Any, merge: int, window: int) -> tuple[Any, Any, Any]:
    """Per patch (processor order): (h, w) coordinates [N, 2], frame key [N] and window key [N].

    The processor orders each image's patches as (t, h/m, w/m, m, m). Frame key: which
    (image, frame) a patch belongs to (full attention stays inside it); window key: which
    (image, frame, window row, window column) (Qwen2.5-VL window attention, ``window`` image
    tokens per side; 0 = no windows). Pure tensor ops: valid for any grid.
    """
    import torch

    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]  # (I,)
    sizes = t * h * w  # (I,) patches per image
    ends = torch.cumsum(sizes, 0)  # (I,)
    idx = torch.arange(n_patches, device=grid_thw.device)  # (N,)
    image = (idx[:, None] >= ends[None, :]).sum(-1)  # (N,) image of each patch
    local = idx - (ends - sizes)[image]  # (N,) index inside its image
    hi, wi = h[image], w[image]
    frame = local // (hi * wi)
    r = local % (hi * wi)
    mw = r % merge
    mh = (r // merge) % merge
    unit = r // (merge * merge)
    gw = wi // merge
    bw, bh = unit % gw, unit // gw  # merge-unit coordinates
    coords = torch.stack([bh * merge + mh, bw * merge + mw], dim=-1)  # (N, 2)
    frame_key = image * (t.max() + 1) + frame  # (N,)
    if window <= 0:
        return coords, frame_key, frame_key
    wr, wc = bh // window, bw // window
    n_wc = (gw.max() + window - 1) // window + 1
    n_wr = (h.max() // merge + window - 1) // window + 1
    window_key = (frame_key * n_wr + wr) * n_wc + wc  # (N,)
    return coords, frame_key, window_key


def _block_mask(key: Any, dtype: Any) -> Any:
    """Additive attention mask [1, 1, N, N]: 0 where query and key share ``key``, else -1e9."""
    import torch

    same = key[:, None] == key[None, :]  # (N, N)
    zero = torch.zeros((), dtype=dtype, device=key.device)
    return torch.where(same, zero, torch.full((), _MASK_MIN, dtype=dtype, device=key.device))[None, None]


def _make_vision_graph() -> type:
    import torch
    from torch import nn

    class VisionGraph(nn.Module):
        """pixel_values [N, C*T*P*P], image_grid_thw [I, 3] -> image_features [N / m^2, D]."""

        def __init__(self, visual: nn.Module) -> None:
            super().__init__()
            self.visual = visual
            cfg = visual.config
            self.merge = int(cfg.spatial_merge_size)
            window_size = int(getattr(cfg, "window_size", 0) or 0)
            self.window = window_size // self.merge // int(cfg.patch_size) if window_size else 0
            self.full_blocks = set(getattr(cfg, "fullatt_block_indexes", None) or range(len(visual.blocks)))
            if not self.window:
                self.full_blocks = set(range(len(visual.blocks)))

        def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
            visual = self.visual
            hidden = visual.patch_embed(pixel_values)  # (N, C_v)
            n = hidden.shape[0]
            coords, frame_key, window_key = _patch_layout(image_grid_thw, n, self.merge, self.window)
            cos, sin = visual.rotary_pos_emb(hidden, coords)  # (N, hd) each
            full = _block_mask(frame_key, torch.float32)
            windowed = full if not self.window else _block_mask(window_key, torch.float32)
            for i, blk in enumerate(visual.blocks):
                mask = full if i in self.full_blocks else windowed
                hidden = hidden + _attention(blk.attn, blk.norm1(hidden), cos, sin, mask)
                hidden = hidden + blk.mlp(blk.norm2(hidden))
            return visual.merger(hidden)  # (N / m^2, D)

    return VisionGraph


def _attention(attn: Any, x: Any, cos: Any, sin: Any, mask: Any) -> Any:
    """HF vision attention (qkv, rotary, eager softmax, proj) with a block-diagonal mask."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, hd)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (z.transpose(0, 1)[None] for z in (q, k, v))  # (1, H, N, hd)
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask.to(q.dtype)  # (1, H, N, N)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(n, -1)  # (N, H*hd)
    return attn.proj(out)


def _VisionGraph(visual: Any) -> Any:  # noqa: N802 - a class factory (torch imported lazily)
    return _make_vision_graph()(visual)


def image_grid_rows(grid_thw: Sequence[Sequence[int]], merge: int) -> list[int]:
    """Image tokens per image: t * h * w / merge^2."""
    return [int(t) * int(h) * int(w) // (merge * merge) for t, h, w in grid_thw]


QWEN2_5_VL = register(QwenVLFamily())
QWEN2_VL = register(Qwen2VLFamily())
