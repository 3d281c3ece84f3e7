"""tiny-llava: builds offline, loads with the HF auto classes, and really shows the phenomenon.

The expected sinks and heads are derived here from the image pixels and the token ids, and
checked against hidden states / attentions of HF eager attention -- not against the model's
own bookkeeping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from var_export.calibration import tiny_llava as tl

TAU, RHO, SUMM = 20.0, 0.5, 0.2


@pytest.fixture(scope="module")
def tiny_llava_path():
    return tl.tiny_llava_dir()  # cached: built once per machine / $VAR_EXPORT_CACHE


@pytest.fixture(scope="module")
def loaded(tiny_llava_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_llava_path)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, attn_implementation="eager")
    return model.eval(), proc


@pytest.fixture(scope="module")
def run(loaded):
    """One left-padded batch of 4 synthetic images x prompts of different lengths."""
    model, proc = loaded
    images = tl.synthetic_images(4, seed=7)
    prompts = [tl.PROMPT_FORMAT.format(prompt=p) for p in tl.DEFAULT_PROMPTS[:4]]
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    return images, inputs, out


def _object_patches(image) -> np.ndarray:
    """Independent ground truth: a patch is an object patch iff some pixel is clearly coloured."""
    pix = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
    chroma = pix.max(-1) - pix.min(-1)  # (H, W)
    g, p = tl.GRID, tl.PATCH_SIZE
    return (chroma.reshape(g, p, g, p) > 0.2).any(axis=(1, 3)).reshape(-1)  # (G*G,)


def _sink_flags(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    n = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return n[..., list(tl.TINY_SINK_DIMS)].abs().amax(-1) > TAU  # (B, S)


def test_loads_with_auto_classes(tiny_llava_path, loaded):
    model, proc = loaded
    assert (tiny_llava_path / "config.json").is_file()
    assert list(tiny_llava_path.glob("*.safetensors"))
    assert not list(tiny_llava_path.glob("*.bin"))
    cfg = model.config
    assert cfg.model_type == "llava"
    tc = cfg.text_config
    assert tc.hidden_size >= 768 and tc.num_key_value_heads < tc.num_attention_heads
    assert tc.num_hidden_layers == tl.NUM_LAYERS
    assert type(proc).__name__ == "LlavaProcessor"
    ids = proc.tokenizer("USER: what is in the image?")["input_ids"]
    assert ids[0] == proc.tokenizer.bos_token_id
    assert proc.tokenizer.unk_token_id not in ids
    info = json.loads((tiny_llava_path / "tiny_llava.json").read_text())
    assert info["sink_dims"] == list(tl.TINY_SINK_DIMS)


def test_preset_matches_planted_sink_dims():
    from var_export.configs import load_preset

    assert load_preset("tiny-llava")["sink_dims"] == list(tl.TINY_SINK_DIMS)


def test_chat_template_matches_prompt_format(loaded):
    _, proc = loaded
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi there"}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    assert text == tl.PROMPT_FORMAT.format(prompt="hi there")


def test_synthetic_images_deterministic_and_shaped():
    a, b = tl.synthetic_images(3, seed=5), tl.synthetic_images(3, seed=5)
    c = tl.synthetic_images(3, seed=6)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))
    for img in a:
        obj = _object_patches(img)
        assert img.size == (tl.IMAGE_SIZE, tl.IMAGE_SIZE)
        assert 4 <= obj.sum() <= tl.NUM_IMAGE_TOKENS // 2


def test_exactly_planted_tokens_are_sinks(run, loaded):
    model, proc = loaded
    images, inputs, out = run
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = ids == model.config.image_token_id
    bos = (ids == proc.tokenizer.bos_token_id) & mask
    expected = bos.clone()
    for b, img in enumerate(images):
        expected[b, visual[b]] = torch.from_numpy(~_object_patches(img))
    assert visual.sum(1).tolist() == [tl.NUM_IMAGE_TOKENS] * len(images)
    assert (expected & visual).sum() > 0 and (~expected & visual).sum() > 0
    for layer in range(tl.NUM_LAYERS):
        sinks = _sink_flags(out.hidden_states[layer]) & mask
        if layer < 2:
            assert not sinks.any(), f"layer {layer} has sinks"
        else:
            assert torch.equal(sinks, expected), f"layer {layer}: sinks differ from the planted ones"


def test_planted_heads_are_image_centric(run, loaded):
    model, proc = loaded
    _, inputs, out = run
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = ids == model.config.image_token_id  # (B, S)
    seq = ids.shape[1]
    first_visual = torch.where(visual.any(1), visual.float().argmax(1), torch.full_like(ids[:, 0], seq))
    pos = torch.arange(seq)
    eligible = mask & ~visual & (pos[None] > first_visual[:, None])  # (B, S) query rows
    assert eligible.sum() >= 8
    planted, mixed = set(tl.PLANTED_IMAGE_CENTRIC_HEADS), set(tl.PLANTED_MIXED_HEADS)
    vocab = proc.tokenizer.get_vocab()
    visual_word_ids = torch.tensor([vocab[w] for w in tl.VISUAL_WORDS])
    visual_word = torch.isin(ids, visual_word_ids)  # (B, S)
    assert 0 < visual_word[eligible].sum() < eligible.sum()
    kinds: set[str] = set()
    assert planted and all(layer >= 2 for layer, _ in planted)
    for layer in range(2, tl.NUM_LAYERS):
        sinks = _sink_flags(out.hidden_states[layer]) & mask  # (B, S)
        vsink = sinks & visual
        a = out.attentions[layer].float()  # (B, H, S, S)
        vis_mass = (a * visual[:, None, None]).sum(-1)  # (B, H, S)
        sink_mass = (a * vsink[:, None, None]).sum(-1)
        portion = sink_mass / (a * visual[:, None, None] + 1e-6 * visual[:, None, None]).sum(-1)
        passed = (portion <= RHO) & (vis_mass >= SUMM) & vsink.any(1)[:, None, None]  # (B, H, S)
        for head in range(a.shape[1]):
            rate = passed[:, head][eligible].float().mean().item()
            if (layer, head) in mixed:  # image-centric exactly on the rows of visual words
                assert torch.equal(passed[:, head][eligible], visual_word[eligible]), (layer, head)
                continue
            mass = vis_mass[:, head][eligible].median().item()
            if mass < SUMM:
                kinds.add("text")
            elif portion[:, head][eligible].median().item() > RHO:
                kinds.add("sink")
            if (layer, head) in planted:
                assert rate >= 0.9, f"planted head ({layer}, {head}) passes on only {rate:.2f}"
            else:
                assert rate <= 0.1, f"head ({layer}, {head}) is image-centric on {rate:.2f}"
    # the other heads fail for both reasons: some look mostly at visual sinks, some at text
    assert kinds == {"sink", "text"}, kinds


def test_patch_colourfulness_matches_planted_patches(run):
    images, inputs, _ = run
    col = tl.patch_colourfulness(inputs["pixel_values"])  # (B, N)
    for b, img in enumerate(images):
        sinks = col[b] < tl.SINK_COLOURFULNESS_THRESHOLD
        assert torch.equal(sinks, torch.from_numpy(~_object_patches(img)))


def test_greedy_generation_runs(loaded):
    model, proc = loaded
    img = tl.synthetic_images(1, seed=3)
    inputs = proc(images=img, text=[tl.PROMPT_FORMAT.format(prompt="what is in the image?")], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_build_is_deterministic(tmp_path, tiny_llava_path):
    from safetensors.torch import load_file

    out = tl.build_tiny_llava(tmp_path / "again")
    a = load_file(next(out.glob("*.safetensors")))
    b = load_file(next(tiny_llava_path.glob("*.safetensors")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_rebuilds_incomplete_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VAR_EXPORT_CACHE", str(tmp_path))
    broken = tmp_path / f"tiny-llava-v{tl.TINY_LLAVA_VERSION}"
    broken.mkdir()
    (broken / "config.json").write_text("{")  # interrupted build
    d = tl.tiny_llava_dir()
    assert d == broken
    assert (d / "tiny_llava.json").is_file() and list(d.glob("*.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == [broken.name]  # no temp dirs left
