"""Images and prompts -> model inputs (``input_ids``, ``attention_mask``, ``pixel_values``,
``visual_token_mask``), with the checks a user needs: empty folders, unreadable images,
prompts without an image placeholder, prompts too long for the model.

torch is imported lazily; PIL is needed.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from var_export.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: larger images are refused before decoding
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_TOKEN = "<image>"
# LLaVA-1.5 (llava-hf) conversation format, used when neither processor nor preset has one
DEFAULT_PROMPT_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """One RGB PIL image from a PIL image or a path; DataError when it is missing or unreadable."""
    if isinstance(image, Image.Image):
        w, h = image.size
        if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
            raise DataError(f"the image is {w}x{h} pixels; expected 1..{MAX_IMAGE_PIXELS} pixels. Resize it.")
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise DataError(f"expected an image path or a PIL image, found {type(image).__name__}.")
    path = Path(image)
    if not path.is_file():
        raise DataError(f"expected an image file at {path}; it does not exist or is not a file. Pass a PNG/JPEG path.")
    try:
        with warnings.catch_warnings():  # a DecompressionBombWarning is an error here, not a print
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"image {path} is {w}x{h} pixels; expected 1..{MAX_IMAGE_PIXELS} pixels "
                        "(a decompression bomb or an absurd size). Resize it before use."
                    )
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(
            f"image {path} is too large to decode safely ({exc}). Resize it before use."
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"cannot read image {path}: it is corrupt or not an image ({type(exc).__name__}: {exc}). "
            "Replace the file with a readable JPEG/PNG/..."
        ) from exc


def load_images(folder: Path) -> list[tuple[Path, Image.Image]]:
    """All images in ``folder`` (not recursive), sorted by name, as RGB PIL images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"no images in {folder}: expected files ending in {', '.join(IMAGE_SUFFIXES)}."
        )
    out = [(path, load_image(path)) for path in files]
    logger.info("loaded %d images from %s", len(out), folder)
    return out


def load_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines skipped) or a JSON list of strings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts file {path}: {exc}.") from exc
    if path.suffix.lower() == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as exc:
            raise DataError(f"prompts file {path} is not valid JSON: {exc}.") from exc
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"prompts file {path}: expected a JSON list of strings.")
        prompts = [p.strip() for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts: expected one prompt per line or a JSON list.")
    return prompts


def _image_token(source: Any) -> str:
    if isinstance(source, Mapping):
        return str(source.get("image_token") or IMAGE_TOKEN)
    return str(getattr(source, "image_token", None) or IMAGE_TOKEN)


def format_prompt(preset_or_processor: Any, text: str) -> str:
    """The full model prompt for ``text`` with exactly one image placeholder.

    Text that already holds one placeholder is returned unchanged (already formatted). Otherwise
    the processor's chat template is used, else the preset's ``prompt_format``, else LLaVA-1.5's.
    """
    token = _image_token(preset_or_processor)
    count = text.count(token)
    if count == 1:
        return text
    if count > 1:
        raise DataError(
            f"prompt has {count} {token} placeholders; expected at most one (one image per prompt): {text!r}."
        )
    source = preset_or_processor
    if isinstance(source, Mapping):
        fmt = source.get("prompt_format") or DEFAULT_PROMPT_FORMAT
        out = fmt.replace("{prompt}", text)
    elif getattr(source, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        out = source.apply_chat_template(conv, add_generation_prompt=True)
    else:
        out = DEFAULT_PROMPT_FORMAT.replace("{prompt}", text)
    if out.count(token) != 1:
        raise DataError(
            f"the prompt format gives {out.count(token)} {token} placeholders, but an image needs "
            f"exactly one: {out!r}. Write the prompt with one {token} yourself."
        )
    return out


def _check_batch(images: list[Image.Image], prompts: list[str], padding_side: str) -> None:
    """One image per prompt, at least one of each, a known padding side."""
    if not prompts:
        raise DataError("no prompts: expected one prompt per image.")
    if not images:
        raise DataError("no image given: every prompt needs one image (LLaVA prompts hold one <image>).")
    if len(images) != len(prompts):
        raise DataError(f"expected one image per prompt, found {len(images)} images and {len(prompts)} prompts.")
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', found {padding_side!r}.")


def _encode(processor: Any, images: list[Image.Image], texts: list[str], padding_side: str) -> Any:  # noqa: ANN401
    """The processor's padded batch (torch tensors), padded on ``padding_side``; a rejected
    input is a ``DataError``. The tokenizer's own padding side is restored afterwards."""
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        return processor(images=[im.convert("RGB") for im in images], text=texts, return_tensors="pt", padding=True)
    except DataError:
        raise
    except (ValueError, TypeError) as exc:
        raise DataError(f"the processor rejected the inputs: {exc}.") from exc
    finally:
        tokenizer.padding_side = old_side


def _check_lengths(attention_mask: Any, tokenizer: Any, max_prompt_tokens: int | None) -> None:  # noqa: ANN401
    """Every prompt (image tokens included) within ``max_prompt_tokens``, by default the
    tokenizer's ``model_max_length`` when it is finite."""
    limit = max_prompt_tokens
    if limit is None:
        mml = getattr(tokenizer, "model_max_length", None)
        limit = int(mml) if isinstance(mml, int) and mml < 1_000_000 else None
    lengths = attention_mask.sum(1)  # (B,)
    if limit is not None and int(lengths.max()) > limit:
        worst = int(lengths.argmax())
        raise DataError(
            f"prompt {worst} is {int(lengths[worst])} tokens long (image tokens included); the model "
            f"takes at most {limit}. Shorten the prompt."
        )


def prepare_batch(
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    padding_side: str = "left",
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Tokenize and preprocess one image per prompt, padded to a batch.

    Returns torch tensors: ``input_ids`` (B, S) int64, ``attention_mask`` (B, S) int64,
    ``pixel_values`` (B, 3, H, W) float, ``visual_token_mask`` (B, S) bool (image-token positions),
    plus any other processor output (Qwen-VL: ``pixel_values`` is [N_patches, C*T*P*P] and
    ``image_grid_thw`` [n_images, 3], ``mm_token_type_ids`` [B, S] come along).
    ``max_prompt_tokens`` (default: the tokenizer's ``model_max_length`` when it is finite) bounds
    every prompt's length after the image placeholder is expanded.
    """
    import torch

    images, prompts = list(images), list(prompts)
    _check_batch(images, prompts, padding_side)
    texts = [format_prompt(processor, p) for p in prompts]
    enc = _encode(processor, images, texts, padding_side)
    tokenizer = processor.tokenizer
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(_image_token(processor))
    input_ids = enc["input_ids"].long()  # (B, S)
    attention_mask = enc["attention_mask"].long()  # (B, S)
    visual = input_ids == int(image_token_id)  # (B, S)
    per_row = visual.sum(1)
    if (per_row == 0).any():
        raise DataError("a prompt has no image tokens after processing; every prompt needs one image.")
    _check_lengths(attention_mask, tokenizer, max_prompt_tokens)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": enc["pixel_values"],
        "visual_token_mask": visual.to(torch.bool),
    }
    for key, value in enc.items():  # the family's extra outputs (image_sizes, image_grid_thw, ...)
        out.setdefault(key, value)
    return out


def calibration_samples(data: str | os.PathLike | None, num_synthetic: int = 8) -> list[tuple[Any, str]]:
    """(image, prompt) pairs: the images of folder ``data`` (+ its optional prompts.txt, one prompt
    per line, cycled), or without ``data`` ``num_synthetic`` built-in synthetic images. Prompts
    default to the built-in ones."""
    from var_export.calibration.tiny_llava import DEFAULT_PROMPTS

    prompts: list[str] = []
    if data is not None:
        folder = Path(data)
        if not folder.is_dir():
            raise DataError(f"--data {folder}: expected a folder of images (+ optional prompts.txt), found none.")
        images = [img for _, img in load_images(folder)]
        if not images:
            raise DataError(f"--data {folder} holds no image; expected .png/.jpg files (+ optional prompts.txt).")
        if (folder / "prompts.txt").is_file():
            prompts = list(load_prompts(folder / "prompts.txt"))
    else:
        from var_export.calibration.tiny_llava import synthetic_images

        if num_synthetic < 1:
            raise ConfigError(f"--num-samples must be >= 1, found {num_synthetic}.")
        images = synthetic_images(num_synthetic, seed=0)
    prompts = prompts or list(DEFAULT_PROMPTS)
    return [(img, prompts[i % len(prompts)]) for i, img in enumerate(images)]
