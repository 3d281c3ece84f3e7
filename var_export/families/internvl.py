"""InternVL (transformers' native ``InternVLForConditionalGeneration``; no remote code).

The GotOcr2 processor crops an image into 1..max_patches tiles (plus a thumbnail tile when there
is more than one) and expands the ``<IMG_CONTEXT>`` placeholder into ``<img>``, image_seq_length
``<IMG_CONTEXT>`` tokens per tile, ``</img>``. Visual tokens are the ``<IMG_CONTEXT>`` positions:
they carry the image features; ``<img>`` / ``</img>`` are ordinary vocabulary embeddings (as
Qwen-VL's vision start/end tokens). So ``visual_token_mask = input_ids == image_token_id``.

Three-graph split: ``vision_encoder.onnx`` is ``pixel_values`` [N_tiles, 3, H, W] ->
``image_features`` [N_tiles, N, D] (InternViT, feature layer / CLS drop, pixel shuffle, projector:
all static per tile). The tiles of the images of a batch are consecutive in ``pixel_values`` and
their features fill the image tokens in that order: the runtime flattens them (no packing).
The decoder is a Qwen2 / LLaMA-style text model (1-D RoPE), exported like LLaVA's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from var_export.core.errors import ConfigError, ModelLoadError
from var_export.families.base import DecoderParts, ModelFamily, VisionExport, register


class InternVLFamily(ModelFamily):
    name = "internvl"
    model_types = ("internvl",)
    vision_inputs = ("pixel_values",)

    def model_class(self) -> type:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def load_processor(self, path: Path, *, trust_remote_code: bool = False) -> Any:
        from transformers import InternVLProcessor

        from var_export.families.processing import load_processor

        return load_processor(path, InternVLProcessor, trust_remote_code=trust_remote_code)

    def manifest_fields(self, config: Any) -> dict[str, Any]:
        """``image_seq_length``: image tokens per tile (bounds the tiles a prompt can hold)."""
        n = getattr(config, "image_seq_length", None)
        return {} if n is None else {"image_seq_length": int(n)}

    def max_tiles_per_image(self, processor: Mapping[str, Any], manifest: Mapping[str, Any], max_prompt: int) -> int:
        """The most tiles one image becomes: ``max_patches`` crops + the thumbnail (GotOcr2 image
        processor settings), else as many tiles as a prompt of ``max_prompt`` tokens holds."""
        if "max_patches" in processor:
            if not processor.get("crop_to_patches", True):
                return 1
            k = int(processor["max_patches"])
            return k + 1 if k > 1 else 1  # a thumbnail joins when there is more than one crop
        per_tile = manifest.get("image_seq_length") or processor.get("image_seq_length")
        if not per_tile:
            raise ConfigError(
                "InternVL tiles per image: expected the image processor's max_patches in the bundle "
                "(processor_config.json) or image_seq_length in its manifest; found neither. "
                "Re-export the bundle with this var-export (it saves the processor and the manifest facts)."
            )
        return max(1, int(max_prompt) // int(per_tile))

    def vision_profile_axes(
        self,
        manifest: Mapping[str, Any],
        processor: Mapping[str, Any],
        *,
        images: tuple[int, int, int],
        sequence: tuple[int, int, int],
    ) -> dict[str, dict[int, tuple[int, int, int]]]:
        """``pixel_values`` [N_tiles, 3, H, W]: 1 .. max tiles per image, per image."""
        k = self.max_tiles_per_image(processor, manifest, sequence[2])
        return {"pixel_values": {0: (images[0], images[1] * k, images[2] * k)}}

    def parts(self, model: Any) -> DecoderParts:
        inner = getattr(model, "model", None)
        if inner is None or getattr(inner, "language_model", None) is None or getattr(model, "lm_head", None) is None:
            raise ModelLoadError(
                f"expected an InternVLForConditionalGeneration (model.language_model, lm_head); found "
                f"{type(model).__name__}. Load an InternVL checkpoint in the native transformers format "
                "(an '-hf' repository), not the remote-code one."
            )
        config = model.config
        return DecoderParts(
            language_model=inner.language_model,
            lm_head=model.lm_head,
            embed_tokens=model.get_input_embeddings(),
            text_config=config.get_text_config(decoder=True),
            config=config,
        )

    def image_features(self, model: Any, batch: Mapping[str, Any]) -> Any:
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        feats = out.pooler_output  # (tiles, N, D)
        return feats.reshape(-1, feats.shape[-1])  # (N_img_tokens, D)

    def vision_export(self, model: Any, dtype: Any) -> VisionExport:
        import torch
        from torch import nn
        from torch.export import Dim

        inner = model.model
        config = model.config

        class TileEncoder(nn.Module):
            """pixel_values (tiles) -> image_features (tiles, N, D): InternVLModel.get_image_features."""

            def __init__(self) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector
                self.layer = config.vision_feature_layer
                self.strategy = config.vision_feature_select_strategy
                self.ratio = config.downsample_ratio

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
                h = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
                if self.strategy == "default":
                    h = h[:, 1:, :]  # drop CLS -> (T, P, Dv)
                side = int(h.shape[1] ** 0.5)  # static: patches per side
                h = h.reshape(h.shape[0], side, side, -1)  # (T, side, side, Dv)
                h = inner.pixel_shuffle(h, scale_factor=self.ratio)  # (T, side/2, side/2, 4 Dv)
                h = h.reshape(h.shape[0], -1, h.shape[-1])  # (T, N, 4 Dv)
                return self.projector(h)  # (T, N, D)

        vc = config.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        pixel_values = torch.randn(2, int(getattr(vc, "num_channels", 3)), int(size), int(size), dtype=dtype)
        return VisionExport(
            module=TileEncoder().eval(),
            args=(pixel_values,),
            dynamic_shapes=({0: Dim("tiles")},),
            input_names=["pixel_values"],
            output_names=["image_features"],
        )


INTERNVL = register(InternVLFamily())
