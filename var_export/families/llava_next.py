"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``) and LLaVA-OneVision
(``LlavaOnevisionForConditionalGeneration``): any-resolution tiling with image newlines.

The processor cuts an image into a base tile (the whole image, resized) and a grid of tiles chosen
from ``image_grid_pinpoints``; ``<image>`` expands to the base tile's features, then the unpadded
tile grid row by row, each row ended by the learned ``image_newline`` (OneVision first
downsamples a grid larger than ``anyres_max_K`` tiles bilinearly). Every one of those tokens is an
``<image>`` token: the visual token mask is ``input_ids == image_token_id`` (tiles and newlines).

Three-graph split. ``vision_encoder.onnx`` is LLaVA-1.5's graph applied to tiles:
``pixel_values`` [N_tiles, 3, H, W] -> ``image_features`` [N_tiles, N, D] (vision tower, feature
layer/strategy, projector), plus ``image_newline`` [D]. The packing (tile grid, unpadding,
downsampling, newlines) depends on the *values* of ``image_sizes``: in a graph it would need
data-dependent shapes (unbacked symbols in torch.export, no static TensorRT profile), so the
runtime does it in numpy (:mod:`var_export.families.anyres`, op for op what HF does; tested
against HF ``get_image_features`` for several sizes and aspect ratios). The decoder and the
embedding graphs are LLaVA's (Mistral / Vicuna / Qwen2 text models, 1-D RoPE).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import DataError
from var_export.families import anyres
from var_export.families.base import VisionExport, register
from var_export.families.llava import LlavaFamily

ANYRES_KEY = "anyres"  # manifest.json: {"grid_pinpoints", "tile_size", "vision_aspect_ratio"}


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    vision_inputs = ("pixel_values",)
    vision_outputs = ("image_features", "image_newline")
    processor_keys = ("image_sizes",)

    def model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    # -- numpy (runtime) ---------------------------------------------------------------------
    def manifest_fields(self, config: Any) -> dict[str, Any]:
        return {
            ANYRES_KEY: {
                "grid_pinpoints": [list(map(int, p)) for p in config.image_grid_pinpoints],
                "tile_size": int(config.vision_config.image_size),
                "vision_aspect_ratio": getattr(config, "vision_aspect_ratio", None),
            }
        }

    def vision_feeds(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every tile of the batch, padding tiles included: (B * max_tiles, C, H, W)."""
        pv = np.asarray(batch["pixel_values"])
        return {"pixel_values": pv.reshape(-1, *pv.shape[-3:])}

    def _anyres(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        facts = manifest.get(ANYRES_KEY)
        if not isinstance(facts, Mapping):
            raise DataError(
                f"the bundle's manifest has no '{ANYRES_KEY}' entry (grid pinpoints, tile size), which "
                f"{self.name} needs to pack image tiles. Re-export the bundle with this var-export."
            )
        return facts

    def max_tiles_per_image(self, manifest: Mapping[str, Any]) -> int:
        """The most tiles the processor cuts one image into: the largest grid pinpoint + the base tile."""
        facts = self._anyres(manifest)
        size = int(facts["tile_size"])
        return max((int(h) // size) * (int(w) // size) for h, w in facts["grid_pinpoints"]) + 1

    def vision_profile_axes(
        self,
        manifest: Mapping[str, Any],
        processor: Mapping[str, Any],
        *,
        images: tuple[int, int, int],
        sequence: tuple[int, int, int],
    ) -> dict[str, dict[int, tuple[int, int, int]]]:
        """``pixel_values`` [N_tiles, 3, H, W]: up to (largest grid + base) tiles per image (the
        runtime feeds every tile of the processor's padded batch)."""
        k = self.max_tiles_per_image(manifest)
        return {"pixel_values": {0: (images[0], images[1] * k, images[2] * k)}}

    def merge_vision_outputs(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> np.ndarray:
        facts = self._anyres(manifest)
        pv = np.asarray(batch["pixel_values"])
        feats = np.asarray(outputs["image_features"])  # (B * max_tiles, N, D)
        per_image = feats.reshape(pv.shape[0], -1, *feats.shape[1:]) if pv.ndim == 5 else feats[None]
        sizes = np.asarray(batch["image_sizes"]).reshape(-1, 2)
        rows = []
        for tiles, size in zip(per_image, sizes.tolist()):
            k = anyres.num_tiles(size, facts["grid_pinpoints"], int(facts["tile_size"]))
            rows.append(
                anyres.pack_image(
                    tiles[:k], size, np.asarray(outputs["image_newline"]),
                    pinpoints=facts["grid_pinpoints"], tile_size=int(facts["tile_size"]),
                    max_tiles=anyres.max_tiles_of(facts.get("vision_aspect_ratio")),
                )
            )
        return np.concatenate(rows, axis=0)  # (N_image_tokens, D)

    # -- torch -------------------------------------------------------------------------------
    def image_features(self, model: Any, batch: Mapping[str, Any]) -> Any:
        import torch

        out = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        )
        return torch.cat(list(out.pooler_output), dim=0)  # (N_img_tokens, D)

    def vision_export(self, model: Any, dtype: Any) -> VisionExport:
        import torch
        from torch import nn
        from torch.export import Dim

        tiles = super().vision_export(model, dtype)  # LLaVA's tile encoder: (T, 3, H, W) -> (T, N, D)
        newline = model.model.image_newline

        class TileEncoder(nn.Module):
            """pixel_values (tiles) -> (per-tile image_features, image_newline)."""

            def __init__(self) -> None:
                super().__init__()
                self.tiles = tiles.module
                self.image_newline = newline

            def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                feats = self.tiles(pixel_values)  # (T, N, D)
                return feats, self.image_newline.to(feats.dtype) * 1.0  # (D,)

        return VisionExport(
            module=TileEncoder().eval(),
            args=tiles.args,
            dynamic_shapes=({0: Dim("tiles")},),
            input_names=["pixel_values"],
            output_names=list(self.vision_outputs),
        )


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)

    def model_class(self) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def load_processor(self, path: Path, *, trust_remote_code: bool = False) -> Any:
        from transformers import LlavaOnevisionProcessor

        from var_export.families.processing import load_processor

        return load_processor(path, LlavaOnevisionProcessor, trust_remote_code=trust_remote_code)


LLAVA_NEXT = register(LlavaNextFamily())
LLAVA_ONEVISION = register(LlavaOnevisionFamily())
