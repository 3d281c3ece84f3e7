"""The bundle's processor without torch or transformers: ``tokenizers`` + numpy + jinja2.

``var-export run`` needs the model's processor (prompt template, tokenizer, image preprocessing).
For LLaVA-1.5-style bundles (``LlavaProcessor`` + ``CLIPImageProcessor``) this module rebuilds it
from the bundle's own files, so the core install (no torch) runs a bundle:

* ``tokenizer.json`` through the ``tokenizers`` library (encode with special tokens, decode);
* ``processor_config.json`` / ``preprocessor_config.json``: resize (shortest edge, PIL,
  the configured resample), center crop, rescale, normalise, channel-first (CLIP's recipe),
  and the ``<image>`` expansion into the number of image tokens the vision tower gives;
* the chat template (``chat_template.jinja`` / ``.json`` / in a config) rendered by jinja2 in a
  sandbox, as transformers does.

``tests/test_processor.py`` checks every output equal to transformers' ``AutoProcessor``. Any
other processor (Qwen2-VL's dynamic resolution, LLaVA-NeXT's tiles) is loaded with transformers,
which is the ``var-export[torch]`` extra (:func:`load_processor`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from var_export.core.errors import BundleError, DataError

log = logging.getLogger(__name__)

SUPPORTED_PROCESSORS = {"LlavaProcessor"}
SUPPORTED_IMAGE_PROCESSORS = {"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise BundleError(f"expected JSON in {path}; it could not be read ({exc}). Re-export the bundle.") from exc


class ClipImageProcessor:
    """CLIP's image preprocessing in numpy (transformers' PIL backend, step for step)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        size = self.config.get("size") or {}
        self.shortest_edge = size.get("shortest_edge")
        self.size_hw = (size.get("height"), size.get("width"))
        crop = self.config.get("crop_size") or {}
        self.crop_hw = (crop.get("height"), crop.get("width"))
        self.resample = int(self.config.get("resample", 3))  # PIL.Image.BICUBIC
        self.mean = np.asarray(self.config.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
        self.std = np.asarray(self.config.get("image_std", (0.26862954, 0.26130258, 0.27577711)), np.float32)

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.shortest_edge:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = int(self.shortest_edge), int(int(self.shortest_edge) * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        elif all(self.size_hw):
            new_h, new_w = (int(x) for x in self.size_hw)
        else:
            raise BundleError(f"expected size.shortest_edge or size.height/width in the image processor config; found {self.config.get('size')}.")
        return image.resize((new_w, new_h), resample=self.resample, reducing_gap=None)

    def _center_crop(self, image: np.ndarray) -> np.ndarray:
        """image (C, H, W) -> (C, crop_h, crop_w); zero padding (centred) where the image is smaller."""
        ch, cw = (int(x) for x in self.crop_hw)
        _, h, w = image.shape
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return image[:, top : top + ch, left : left + cw]
        padded = np.zeros((image.shape[0], max(h, ch), max(w, cw)), image.dtype)  # (C, H', W')
        pt, pl = math.ceil((padded.shape[1] - h) / 2), math.ceil((padded.shape[2] - w) / 2)
        padded[:, pt : pt + h, pl : pl + w] = image
        top, left = max(top + pt, 0), max(left + pl, 0)
        return padded[:, top : top + ch, left : left + cw]

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> pixel_values (N, 3, H, W) float32."""
        c = self.config
        out = []
        for image in images:
            if c.get("do_convert_rgb", True):
                image = image.convert("RGB")
            if c.get("do_resize", True):
                image = self._resize(image)
            x = np.asarray(image).transpose(2, 0, 1)  # (H, W, C) uint8 -> (C, H, W)
            if c.get("do_center_crop", True):
                x = self._center_crop(x)
            if c.get("do_rescale", True):
                x = (x.astype(np.float64) * float(c.get("rescale_factor", 1 / 255))).astype(np.float32)
            if c.get("do_normalize", True):
                x = x.astype(np.float32)
                x = ((x.T - self.mean) / self.std).T  # per channel, channel-first
            out.append(x.astype(np.float32))
        return np.stack(out)


class BundleTokenizer:
    """The parts of a transformers tokenizer the runtime uses, over ``tokenizers.Tokenizer``."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.config = _read_json(folder / "tokenizer_config.json")
        self.model_max_length = self.config.get("model_max_length")
        self.eos_token_id = self.convert_tokens_to_ids(self._token("eos_token"))
        self.pad_token_id = self.convert_tokens_to_ids(self._token("pad_token"))

    def _token(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, Mapping) else value

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, str]:
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        return {k: t for k in keys if (t := self._token(k)) is not None}


class LlavaBundleProcessor:
    """``LlavaProcessor`` (one image per prompt) without torch: ``processor(images=, text=)``,
    ``apply_chat_template``, ``tokenizer``, ``image_token`` / ``image_token_id``."""

    def __init__(self, folder: Path, config: Mapping[str, Any], image_config: Mapping[str, Any]) -> None:
        self.tokenizer = BundleTokenizer(folder)
        self.image_processor = ClipImageProcessor(image_config)
        self.image_token = str(config.get("image_token", "<image>"))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.chat_template = _chat_template(folder, config)
        patch = int(config["patch_size"])
        ch, cw = (int(x) for x in self.image_processor.crop_hw)
        n = (ch // patch) * (cw // patch) + int(config.get("num_additional_image_tokens", 0))
        self.num_image_tokens = n - 1 if config.get("vision_feature_select_strategy") == "default" else n

    def apply_chat_template(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        template = env.from_string(self.chat_template or "")
        return template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                               **self.tokenizer.special_tokens())

    def __call__(self, *, images: Sequence[Image.Image], text: Sequence[str], return_tensors: str = "np") -> dict[str, np.ndarray]:
        """One prompt per image: input_ids (B, S) int64, attention_mask (B, S), pixel_values (B, 3, H, W)."""
        if len(images) != len(text) or any(t.count(self.image_token) != 1 for t in text):
            raise ValueError(f"expected one {self.image_token} per prompt and one image per prompt")
        ids = [self.tokenizer.encode(t.replace(self.image_token, self.image_token * self.num_image_tokens)) for t in text]
        if len({len(x) for x in ids}) != 1:
            raise DataError("prompts of different lengths: run them one at a time (the runtime does).")
        input_ids = np.asarray(ids, dtype=np.int64)
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                "pixel_values": self.image_processor(images)}


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for source in (_read_json(folder / "chat_template.json"), config, _read_json(folder / "tokenizer_config.json")):
        if isinstance(source.get("chat_template"), str):
            return source["chat_template"]
    return None


def torch_free_processor(folder: str | Path) -> LlavaBundleProcessor | None:
    """The torch-free processor for the bundle in ``folder``, or None when its processor is not
    one this module rebuilds (then transformers is needed)."""
    folder = Path(folder)
    config = _read_json(folder / "processor_config.json")
    image_config = config.get("image_processor") or _read_json(folder / "preprocessor_config.json")
    kind = config.get("processor_class") or image_config.get("processor_class")
    image_kind = image_config.get("image_processor_type")
    if (
        kind not in SUPPORTED_PROCESSORS
        or image_kind not in SUPPORTED_IMAGE_PROCESSORS
        or "patch_size" not in config
        or not (folder / "tokenizer.json").is_file()
        or not all((image_config.get("crop_size") or {}).get(k) for k in ("height", "width"))
    ):
        return None
    return LlavaBundleProcessor(folder, config, image_config)


def load_processor(folder: str | Path) -> Any:
    """The bundle's processor: torch-free when supported, else transformers' ``AutoProcessor``
    (the ``var-export[torch]`` extra; a ``MissingExtraError`` names it when not installed)."""
    from var_export.core.extras import require_extra

    processor = torch_free_processor(folder)
    if processor is not None:
        return processor
    require_extra("torch", f"the processor of {folder} (not a LLaVA-1.5 CLIP processor)")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))
