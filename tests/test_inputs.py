"""Images + prompts -> model inputs: folder loading, prompt formatting, left padding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from var_export.calibration import tiny_llava as tl
from var_export.core.errors import DataError
from var_export.inputs import format_prompt, load_images, load_prompts, prepare_batch


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tl.tiny_llava_dir())


def test_load_images_sorted_rgb(tmp_path):
    imgs = tl.synthetic_images(2, seed=1)
    imgs[1].convert("L").save(tmp_path / "a.png")
    imgs[0].save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    out = load_images(tmp_path)
    assert [p.name for p, _ in out] == ["a.png", "b.jpg"]
    assert all(im.mode == "RGB" for _, im in out)
    assert np.array_equal(np.asarray(out[0][1])[..., 0], np.asarray(imgs[1].convert("L")))


def test_load_images_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_images(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "missing")
    tl.synthetic_images(1)[0].save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_images(tmp_path)


def test_load_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("what is this?\n\n  describe it  \n")
    assert load_prompts(txt) == ["what is this?", "describe it"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a", "b c"]))
    assert load_prompts(js) == ["a", "b c"]
    js.write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        load_prompts(js)
    txt.write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(txt)
    with pytest.raises(DataError, match="cannot read"):
        load_prompts(tmp_path / "missing.txt")


def test_format_prompt(processor):
    assert format_prompt(processor, "what?") == "USER: <image>\nwhat? ASSISTANT:"
    assert format_prompt({"prompt_format": "<image> Q: {prompt} A:"}, "hi") == "<image> Q: hi A:"
    assert format_prompt({}, "hi") == "USER: <image>\nhi ASSISTANT:"
    done = "USER: <image>\nalready formatted ASSISTANT:"
    assert format_prompt(processor, done) == done
    with pytest.raises(DataError, match="placeholders"):
        format_prompt(processor, "<image> and <image>")
    with pytest.raises(DataError, match="exactly one"):
        format_prompt({"prompt_format": "Q: {prompt} A:"}, "no image here")


def test_prepare_batch_left_pads(processor):
    images = tl.synthetic_images(2, seed=3)
    prompts = ["what?", "describe the picture in detail please"]
    side = processor.tokenizer.padding_side
    batch = prepare_batch(processor, images, prompts)
    ids, mask, vis = batch["input_ids"], batch["attention_mask"], batch["visual_token_mask"]
    assert ids.dtype == torch.long and vis.dtype == torch.bool
    assert batch["pixel_values"].shape == (2, 3, tl.IMAGE_SIZE, tl.IMAGE_SIZE)
    # independent: tokenize each prompt alone, no padding
    singles = [prepare_batch(processor, [im], [p]) for im, p in zip(images, prompts)]
    lens = [s["input_ids"].shape[1] for s in singles]
    assert lens[0] < lens[1] == ids.shape[1]
    pad = lens[1] - lens[0]
    assert mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()
    assert (ids[0, :pad] == processor.tokenizer.pad_token_id).all()
    for b, s in enumerate(singles):
        n = lens[b]
        assert torch.equal(ids[b, -n:], s["input_ids"][0])
        assert torch.equal(batch["pixel_values"][b], s["pixel_values"][0])
    assert vis.sum(1).tolist() == [tl.NUM_IMAGE_TOKENS] * 2
    assert torch.equal(vis, ids == processor.tokenizer.convert_tokens_to_ids("<image>"))
    assert not vis[mask == 0].any()
    # right padding on request, and the processor's tokenizer keeps its setting
    right = prepare_batch(processor, images, prompts, padding_side="right")
    assert right["attention_mask"][0, : lens[0]].all() and right["attention_mask"][0, lens[0]:].sum() == 0
    assert processor.tokenizer.padding_side == side


def test_prepare_batch_errors(processor):
    images = tl.synthetic_images(2)
    with pytest.raises(DataError, match="one image per prompt"):
        prepare_batch(processor, images, ["only one prompt"])
    with pytest.raises(DataError, match="no image"):
        prepare_batch(processor, [], ["a prompt"])
    with pytest.raises(DataError, match="no prompts"):
        prepare_batch(processor, images, [])
    with pytest.raises(DataError, match="at most 70"):
        prepare_batch(processor, images[:1], ["what is in the image ?"], max_prompt_tokens=70)
    long = " ".join(["image"] * (tl.MAX_POSITIONS + 10))
    with pytest.raises(DataError, match=f"at most {tl.MAX_POSITIONS}"):
        prepare_batch(processor, images[:1], [long])


def test_prepare_batch_runs_model(processor):
    """The batch feeds HF LLaVA directly (visual_token_mask dropped)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tl.tiny_llava_dir()).eval()
    batch = prepare_batch(processor, tl.synthetic_images(2), ["what?", "how many objects are there?"])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "visual_token_mask"})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_images_of_other_sizes_are_resized(processor, tmp_path: Path):
    big = Image.new("RGB", (200, 120), (128, 128, 128))
    batch = prepare_batch(processor, [big], ["what?"])
    assert batch["pixel_values"].shape[-2:] == (tl.IMAGE_SIZE, tl.IMAGE_SIZE)
