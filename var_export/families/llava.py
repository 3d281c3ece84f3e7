"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower + projector, 1-D RoPE LLaMA decoder.

vision_encoder.onnx: pixel_values [B, 3, H, W] -> image_features [B, N, D] (H, W static).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from var_export.core.errors import ModelLoadError
from var_export.families.base import DecoderParts, ModelFamily, VisionExport, register


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    mrope = False
    vision_inputs = ("pixel_values",)

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def parts(self, model: Any) -> DecoderParts:
        inner = getattr(model, "model", None)
        missing = [
            name
            for name, obj in (
                ("model.vision_tower", getattr(inner, "vision_tower", None)),
                ("model.multi_modal_projector", getattr(inner, "multi_modal_projector", None)),
                ("model.language_model", getattr(inner, "language_model", None)),
                ("lm_head", getattr(model, "lm_head", None)),
            )
            if obj is None
        ]
        if missing:
            raise ModelLoadError(
                f"expected a LLaVA-family model (transformers LlavaForConditionalGeneration layout) with "
                f"{', '.join(missing)}; found {type(model).__name__} without them. "
                "Load the model with var_export.models.load_llava or pass a LLaVA checkpoint."
            )
        config = model.config
        if getattr(config, "image_token_id", None) is None:
            raise ModelLoadError(
                f"{type(model).__name__}.config has no image_token_id; expected a LLaVA config. "
                "Check the checkpoint's config.json."
            )
        return DecoderParts(
            language_model=inner.language_model,
            lm_head=model.lm_head,
            embed_tokens=model.get_input_embeddings(),
            text_config=config.get_text_config(decoder=True),
            config=config,
        )

    def image_features(self, model: Any, batch: Mapping[str, Any]) -> Any:
        import torch

        out = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)  # (N_img_tokens, D)

    def vision_export(self, model: Any, dtype: Any) -> VisionExport:
        import torch
        from torch import nn
        from torch.export import Dim

        inner = model.model

        class VisionEncoder(nn.Module):
            """pixel_values -> image_features: what ``LlavaModel.get_image_features`` computes."""

            def __init__(self) -> None:
                super().__init__()
                self.vision_tower = inner.vision_tower
                self.projector = inner.multi_modal_projector
                self.feature_layer = model.config.vision_feature_layer
                self.strategy = model.config.vision_feature_select_strategy

            def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
                out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
                layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
                selected = [out.hidden_states[i] for i in layers]  # each (B, 1 + N, Dv) for CLIP
                if self.strategy == "default":
                    selected = [h[:, 1:] for h in selected]  # drop CLS -> (B, N, Dv)
                feats = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
                return self.projector(feats)  # (B, N, D)

        vc = model.config.vision_config
        size, channels = int(vc.image_size), int(getattr(vc, "num_channels", 3))
        pixel_values = torch.randn(2, channels, size, size, dtype=dtype)
        return VisionExport(
            module=VisionEncoder().eval(),
            args=(pixel_values,),
            dynamic_shapes=({0: Dim("batch")},),
            input_names=["pixel_values"],
            output_names=["image_features"],
        )


LLAVA = register(LlavaFamily())
