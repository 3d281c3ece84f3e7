"""What differs between model families (LLaVA-1.5, Qwen2-VL/2.5-VL, LLaVA-NeXT, InternVL, ...).

Everything family-specific lives in one :class:`ModelFamily` subclass per family
(``families/llava.py``, ``families/qwen.py``, ...); the shared modules (``models``, ``inputs``,
``export``, ``runtime``, ``calibration.reference``) stay family-agnostic and call the hooks below.
A family is looked up from the HF config's ``model_type`` (:func:`family_for_model_type`) or from a
loaded model / config (:func:`family_of`); the bundle manifest records ``family`` so the runtime
finds the same family without torch.

Two worlds:
* numpy hooks (``vision_feeds``, ``prefill_positions``, ``decode_positions``) are torch-free: the
  ONNX Runtime path (``runtime.py``) uses them on processor outputs;
* torch hooks (``model_class``, ``load_processor``, ``image_features``, ``parts``,
  ``vision_export``, ``example_position_ids``) import torch / transformers lazily.

Positions. ``prefill_positions(batch)`` returns ``(position_ids, state)``: position_ids are
[B, S] (1-D RoPE) or [3, B, S] (M-RoPE) int64; ``state`` is whatever later decode steps need
(None for LLaVA; Qwen's ``rope_deltas`` [B, 1]). ``decode_positions(attention_mask, state)``
gives the position ids of the newest token ([B, 1] or [3, B, 1]) from the full mask [B, T].
The state of a batch is per row (batch on its first axis, or None): a continuous-batching engine
(``var_export.engine``) keeps each request's own state from a one-row prefill and hands the
running rows' states to ``decode_positions`` joined with :meth:`ModelFamily.join_states`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from var_export.core.errors import ModelLoadError


@dataclasses.dataclass
class DecoderParts:
    """The pieces of a multimodal model that the decoder / embed graphs and the reference need."""

    language_model: Any  # decoder stack (LlamaModel, Qwen2_5_VLTextModel, ...): inputs_embeds + cache
    lm_head: Any
    embed_tokens: Any
    text_config: Any
    config: Any  # the full multimodal config


@dataclasses.dataclass
class VisionExport:
    """What ``export.export_vision_encoder`` hands to torch.onnx for this family."""

    module: Any  # nn.Module whose forward(*args) returns image_features
    args: tuple[Any, ...]  # example inputs (torch tensors)
    dynamic_shapes: tuple[Any, ...]  # torch.export dynamic shapes, one entry per arg
    input_names: list[str]
    output_names: list[str]


class ModelFamily:
    """Base class: one subclass per family; instances are stateless singletons."""

    name: ClassVar[str] = "base"  # recorded in manifest.json as "family"
    model_types: ClassVar[tuple[str, ...]] = ()  # HF config.model_type values this family loads
    mrope: ClassVar[bool] = False  # position_ids [3, B, S] (True) or [B, S] (False)
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)  # vision_encoder.onnx inputs
    processor_keys: ClassVar[tuple[str, ...]] = ()  # extra processor outputs to keep in a batch
    vision_outputs: ClassVar[tuple[str, ...]] = ("image_features",)  # vision_encoder.onnx outputs

    # -- loading (models.py) -----------------------------------------------------------------
    def model_class(self) -> type:
        """The transformers class to ``from_pretrained`` (e.g. LlavaForConditionalGeneration)."""
        raise NotImplementedError

    def load_processor(self, path: Path, *, trust_remote_code: bool = False) -> Any:
        """The processor (tokenizer + image processor) saved in ``path``."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    # -- inputs (torch-free) -----------------------------------------------------------------
    def image_token_id(self, config_or_processor: Any) -> int | None:
        """The id of the placeholder token the processor expands the image into."""
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(config_or_processor, attr, None)
            if value is not None:
                return int(value)
        return None

    def vision_feeds(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inputs of vision_encoder.onnx from a processor batch (numpy)."""
        return {name: np.asarray(batch[name]) for name in self.vision_inputs}

    def prefill_positions(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, Any]:
        """(position_ids, state) for the prompt; ``batch`` has input_ids and attention_mask [B, S]."""
        mask = np.asarray(batch["attention_mask"], dtype=np.int64)
        pos = np.cumsum(mask, axis=-1) - 1
        return np.where(mask == 0, 1, pos).astype(np.int64), None

    def decode_positions(self, attention_mask: np.ndarray, state: Any) -> np.ndarray:
        """Position ids of the newest token given the whole mask [B, T] (prompt + generated)."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        return (np.cumsum(mask, axis=-1)[:, -1:] - 1).astype(np.int64)  # (B, 1)

    def join_states(self, states: Sequence[Any]) -> Any:
        """The decode state of a batch from its rows' states (each from a one-row prefill), in row
        order: None when every row has none, else the arrays joined on their batch axis (Qwen's
        rope_deltas [1, 1] each -> [B, 1])."""
        if all(s is None for s in states):
            return None
        if any(s is None for s in states):
            raise ValueError(f"{self.name}: cannot join decode states where only some rows have one")
        return np.concatenate([np.asarray(s) for s in states], axis=0)

    def merge_vision_outputs(
        self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, Any], manifest: Mapping[str, Any]
    ) -> np.ndarray:
        """The vision graph's outputs -> feature rows [N_image_tokens, D] in placeholder order
        (what the runtime scatters into inputs_embeds)."""
        feats = np.asarray(outputs["image_features"])
        return feats.reshape(-1, feats.shape[-1])

    def manifest_fields(self, config: Any) -> dict[str, Any]:
        """Facts from the HF config that the torch-free runtime needs (written to manifest.json)."""
        return {}

    # -- TensorRT profiles (torch-free) ------------------------------------------------------
    def vision_profile_axes(
        self,
        manifest: Mapping[str, Any],
        processor: Mapping[str, Any],
        *,
        images: tuple[int, int, int],
        sequence: tuple[int, int, int],
    ) -> dict[str, dict[int, tuple[int, int, int]]]:
        """(min, opt, max) of the dynamic axes of vision_encoder.onnx's inputs: input -> axis -> range.

        ``images``: how many images one vision call encodes; ``sequence``: prompt tokens per
        batch row (the image tokens of a row's images fit in it); ``processor``: the bundle's
        image processor settings ({} when unknown). Axes not named here take the generic roles
        of :mod:`var_export.trt.profiles`. LLaVA-1.5: ``pixel_values`` [images, 3, H, W].
        """
        return {"pixel_values": {0: images}}

    # -- torch -------------------------------------------------------------------------------
    def parts(self, model: Any) -> DecoderParts:
        """Language model, lm_head, token embeddings and configs of a loaded model."""
        raise NotImplementedError

    def image_features(self, model: Any, batch: Mapping[str, Any]) -> Any:
        """Projected image features [N_image_tokens, D] (torch) for the image tokens of ``batch``,
        in the row-major order the placeholders appear (what HF scatters into inputs_embeds)."""
        raise NotImplementedError

    def vision_export(self, model: Any, dtype: Any) -> VisionExport:
        """The vision wrapper module, example inputs and dynamic shapes for torch.onnx."""
        raise NotImplementedError

    def example_position_ids(self, batch: int, seq: int, past: int) -> Any:
        """Example position_ids for tracing the decoder (torch int64, [B, S] or [3, B, S])."""
        import torch

        pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
        return pos[None].expand(3, batch, seq).clone() if self.mrope else pos.clone()


_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make ``family`` findable by name and by each of its ``model_types``."""
    _REGISTRY[family.name] = family
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


def supported_model_types() -> list[str]:
    import var_export.families  # noqa: F401 - registers the built-in families

    return sorted({mt for f in _REGISTRY.values() for mt in f.model_types})


def family_for_model_type(model_type: str | None) -> ModelFamily:
    """The family registered for ``model_type`` (or family name); ModelLoadError when none."""
    import var_export.families  # noqa: F401 - registers the built-in families

    fam = _REGISTRY.get(str(model_type))
    if fam is None:
        raise ModelLoadError(
            f"no var-export model family handles model_type={model_type!r}; supported: "
            f"{supported_model_types()}."
        )
    return fam


def family_of(model_or_config: Any) -> ModelFamily:
    """The family of a loaded model or of its config (by ``config.model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_model_type(getattr(config, "model_type", None))
