"""Shared state of the tiled-image family tests (LLaVA-NeXT, LLaVA-OneVision, InternVL): one
load, one export and one VAR bundle per tiny variant, shared by the whole session."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from var_export.calibration import tiny_anyres as ta
from var_export.calibration import tiny_llava as tl

HEADS = sorted(tl.PLANTED_IMAGE_CENTRIC_HEADS + tl.PLANTED_MIXED_HEADS)
# two images of different sizes / aspect ratios -> different token counts -> left padding
IMAGE_SIZES = ((64, 64), (80, 48))
INTERNVL_IMAGE_SIZES = ((128, 128), (160, 64))  # 4 + thumbnail tiles, 2 + thumbnail tiles
PROMPTS = ["Describe the red object in the image in detail please.", "What is it?"]


class TiledModel:
    """A tiny any-resolution variant: loaded model, plain graphs, and (lazily) a VAR bundle."""

    def __init__(self, variant: str, tmp: Path) -> None:
        from var_export.models import load_llava

        self.variant = variant
        self.tmp = tmp
        self.loaded = load_llava(variant)
        self.model = self.loaded.model
        self.processor = self.loaded.processor

    @functools.cached_property
    def exported(self) -> Any:
        from var_export.export import export_graphs

        return export_graphs(self.model, self.tmp / "graphs")

    @functools.cached_property
    def vision_encoder(self) -> Path:
        """vision_encoder.onnx: from the full export when it exists, else exported alone."""
        from var_export.export import export_vision_encoder

        if "exported" in self.__dict__:
            return self.exported.vision_encoder
        path = self.tmp / "vision" / "vision_encoder.onnx"
        export_vision_encoder(self.model, path)
        return path

    def batch(self, images: Any = None, prompts: list[str] | None = None) -> dict[str, Any]:
        from var_export.inputs import prepare_batch

        sizes = INTERNVL_IMAGE_SIZES if self.variant == "tiny-internvl" else IMAGE_SIZES
        images = images if images is not None else ta.synthetic_images(len(sizes), seed=7, sizes=sizes)
        return prepare_batch(self.processor, images, prompts or PROMPTS)

    def embeds(self, batch: dict[str, Any]) -> Any:
        """inputs_embeds (B, S, D) as the HF model builds them (the family's extra vision inputs)."""
        from var_export.export import embed_and_merge
        from var_export.families import family_of

        extra = {k: batch[k] for k in family_of(self.model).processor_keys if k in batch}
        return embed_and_merge(self.model, batch["input_ids"], batch["pixel_values"], **extra)

    def settings(self, mode: str = "hybrid") -> Any:
        from var_export.core.settings import VarSettings

        return VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads=mode, layers="2:")

    @functools.cached_property
    def bundle(self) -> Path:
        """A hybrid VAR bundle with the manifest the pipeline writes (family facts included)."""
        import onnx_ir as ir

        from var_export.bundle import write_bundle
        from var_export.core.contract import DECODER
        from var_export.models import model_fingerprint
        from var_export.passes.pipeline import apply_var, save_model
        from var_export.pipeline import _family_facts, _token_facts

        settings = self.settings()
        var_model, report = apply_var(
            ir.load(str(self.exported.decoder)), settings, HEADS, num_layers=self.exported.num_layers
        )
        (self.tmp / "var").mkdir(exist_ok=True)
        save_model(var_model, self.tmp / "var" / DECODER)
        fields = {
            "model_id": self.variant,
            "fingerprint": model_fingerprint(self.model.config),
            "var": settings.to_dict(),
            "var_layers": list(report.var_layers),
            "head_mode": "hybrid",
            "heads": [list(h) for h in HEADS],
            "opset": self.exported.opset,
            **_token_facts(self.model.config),
            **_family_facts(self.model.config),
        }
        return write_bundle(
            self.tmp / "bundle", graphs={**self.exported.paths, DECODER: self.tmp / "var" / DECODER},
            manifest_fields=fields, calibration=None, processor=self.processor,
        )
