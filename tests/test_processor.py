"""The torch-free bundle processor (var_export.processor) equals transformers' AutoProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from var_export.inputs import format_prompt
from var_export.processor import ClipImageProcessor, torch_free_processor

PROMPTS = ["What is in the picture?", "USER: <image>\nDescribe the ünïcode scene, please. ASSISTANT:"]
SIZES = [(64, 64), (97, 53), (40, 130), (200, 200), (30, 20)]  # (width, height)


@pytest.fixture(scope="module")
def both(tiny_llava_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_path), torch_free_processor(tiny_llava_path)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_prompt_ids_and_pixels_equal_transformers(both, w, h):
    hf, ours = both
    assert ours is not None, "tiny-llava's LlavaProcessor + CLIPImageProcessor is supported"
    img = _image(w, h)
    for prompt in PROMPTS:
        text = format_prompt(hf, prompt)
        assert format_prompt(ours, prompt) == text  # the chat template, rendered by jinja2
        want = hf(images=[img], text=[text], return_tensors="np")
        got = ours(images=[img], text=[text])
        np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))
        np.testing.assert_array_equal(got["pixel_values"], np.asarray(want["pixel_values"]))
    assert (got["input_ids"] == hf.image_token_id).sum() == 64  # <image> expanded to the patches


def test_tokenizer_facts_and_decode_equal_transformers(both):
    hf, ours = both
    tok = hf.tokenizer
    assert (ours.tokenizer.eos_token_id, ours.tokenizer.pad_token_id, ours.image_token_id) == (
        tok.eos_token_id, tok.pad_token_id, hf.image_token_id)
    assert ours.tokenizer.model_max_length == tok.model_max_length
    ids = list(range(0, 257, 3))
    assert ours.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def test_center_crop_pads_a_small_image_like_transformers():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 28}, "resample": 2,
              "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    img = _image(37, 24, seed=3)
    want = CLIPImageProcessorPil(**config)(images=[img], return_tensors="np")["pixel_values"]
    got = ClipImageProcessor(config)([img])
    assert got.shape == (1, 3, 32, 28)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_unsupported_processor_is_none(tmp_path):
    (tmp_path / "processor_config.json").write_text('{"processor_class": "Qwen2VLProcessor"}')
    assert torch_free_processor(tmp_path) is None
