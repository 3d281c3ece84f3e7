"""LLaVA-NeXT and LLaVA-OneVision (any-resolution tiles + image newlines), on their tiny variants.

* every token ``<image>`` expands into (base tile, grid tiles, newlines) is visual;
* the vision graph (per-tile features + image_newline) with the runtime's numpy packing equals HF
  ``get_image_features`` for several image sizes and aspect ratios (OneVision: both with and
  without its ``anyres_max`` bilinear downsampling);
* the VAR decoder equals the PyTorch reference (prefill + 4 greedy steps, batch 2 with left
  padding and two images of different sizes, all head modes), and VAR moves the logits;
* calibration finds the planted sink dims and heads; ``var-export run`` generates; ``inspect``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.anyres_fixtures import HEADS
from tests.test_parity import TOL, Case, _run_both, _session
from var_export.calibration import tiny_anyres as ta
from var_export.calibration import tiny_llava as tl
from var_export.families import anyres as packing
from var_export.families import family_of

VARIANTS = list(ta.VARIANTS)
# The decoder export dominates the cost (~20-60 s per model on 2 shared cores): the default run
# exports LLaVA-NeXT's decoder (Mistral); OneVision's (Qwen2, q/k/v biases) runs with -m slow.
DECODER_VARIANTS = ["tiny-llava-next", pytest.param("tiny-llava-onevision", marks=pytest.mark.slow)]
RESULTS: dict[str, float] = {}


def _numpy(batch: dict) -> dict:
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_visual_tokens_are_tiles_and_newlines(anyres, variant):
    m = anyres(variant)
    batch = m.batch()
    fam = family_of(m.model)
    with torch.no_grad():
        feats = fam.image_features(m.model, batch)  # (N_img_tokens, D)
    visual = batch["visual_token_mask"]
    assert int(visual.sum()) == feats.shape[0]  # every feature row has a visual position, and back
    newline = m.model.model.image_newline.detach()
    is_newline = (feats == newline).all(-1)
    # one newline per row of the unpadded grid, per image: both images have some
    assert int(is_newline.sum()) >= 2 * 4
    ids = batch["input_ids"]
    assert bool((ids[visual] == m.model.config.image_token_id).all())
    assert visual.sum(1).tolist()[0] != visual.sum(1).tolist()[1]  # different sizes, different counts
    assert (batch["attention_mask"][1] == 0).any() or (batch["attention_mask"][0] == 0).any()


def test_onevision_downsamples_large_grids():
    """anyres_max_2: a 2x2-tile grid (8x8 features) is interpolated to 5x5, a 2x1 one is not."""
    d, n = 6, ta.TOKENS_PER_TILE
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(5, n, d)).astype(np.float32)
    nl = np.zeros(d, np.float32)
    square = packing.pack_image(tiles, (64, 64), nl, pinpoints=ta.ONEVISION_PINPOINTS, tile_size=32, max_tiles=2)
    assert square.shape[0] == n + 5 * (5 + 1)
    plain = packing.pack_image(tiles, (64, 64), nl, pinpoints=ta.ONEVISION_PINPOINTS, tile_size=32)
    assert plain.shape[0] == n + 8 * (8 + 1)
    x = torch.from_numpy(rng.normal(size=(3, 7, 9)).astype(np.float32))
    want = torch.nn.functional.interpolate(x[None], [4, 5], mode="bilinear")[0].numpy()
    assert np.abs(packing.bilinear(x.numpy(), 4, 5) - want).max() < 1e-6


@pytest.fixture(scope="module")
def plain_logits():
    return {}


@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_var_decoder_equals_reference(anyres, plain_logits, tmp_path, variant, mode):
    from var_export.export import embed_and_merge
    from var_export.passes.pipeline import apply_var, load_model

    m = anyres(variant)
    batch = m.batch()
    embeds = embed_and_merge(m.model, batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
    settings = m.settings(mode)
    case = Case(variant, m.model, embeds, batch["attention_mask"], batch["visual_token_mask"], settings, HEADS)
    plain = load_model(m.exported.decoder)
    if variant not in plain_logits:
        diffs, logits = _run_both(case, _session(plain, tmp_path / "plain.onnx"), None, None)
        assert max(diffs) < TOL
        plain_logits[variant] = logits
    heads = None if mode == "dynamic" else HEADS
    model, _ = apply_var(plain, settings, heads)
    diffs, var_logits = _run_both(case, _session(model, tmp_path / "var.onnx"), settings, heads)
    RESULTS[f"{variant}/{mode}"] = max(diffs)
    assert max(diffs) < TOL, f"{variant}/{mode}: per-step max |Δlogits| {diffs}"
    effect = max(float((a - b).abs().max()) for a, b in zip(var_logits, plain_logits[variant]))
    RESULTS[f"{variant}/{mode} (VAR effect)"] = effect
    assert effect > 100 * TOL, f"{variant}/{mode}: VAR changed logits by only {effect:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_calibration_finds_planted_sinks_and_heads(anyres, variant):
    from var_export.calibration.calibrate import calibrate

    m = anyres(variant)
    images = ta.synthetic_images(4, seed=0)
    samples = [(img, tl.DEFAULT_PROMPTS[i]) for i, img in enumerate(images)]
    cal = calibrate(m.loaded, samples, m.settings().replace(sink_dims=(0,)))
    assert cal["sink_dims"] == list(tl.TINY_SINK_DIMS)
    assert cal["sink_dims_source"] == "data"
    assert set(map(tuple, tl.PLANTED_IMAGE_CENTRIC_HEADS)) <= set(map(tuple, cal["heads"]))
    for entry in cal["layers"]:  # visual sinks dominate (grey background tiles), BOS is the text sink
        assert entry["visual_sink_count"] > 0 and entry["sink_count"] > entry["visual_sink_count"]
    RESULTS[f"{variant}/calibration heads"] = float(len(cal["heads"]))


@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_runtime_prompt_logits_and_run(anyres, variant, tmp_path, capsys):
    """The bundle's own path (processor -> vision graph -> numpy packing -> decoder) equals the
    reference; `var-export run` generates."""
    from var_export.calibration.reference import VarReference
    from var_export.cli import main
    from var_export.export import embed_and_merge
    from var_export.runtime import VarRuntime

    m = anyres(variant)
    manifest = json.loads((m.bundle / "manifest.json").read_text())
    assert manifest["family"] == family_of(m.model).name and "anyres" in manifest
    image = ta.synthetic_images(2, seed=11, sizes=[(80, 48)])[1]
    prompt = "What color is the square on the left?"
    rt = VarRuntime(m.bundle)
    got = rt.prompt_logits(image, prompt)  # (S, V)
    batch = m.batch([image], [prompt])
    embeds = embed_and_merge(m.model, batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
    mask = batch["attention_mask"]
    out = VarReference(m.model, m.settings(), HEADS).step(
        embeds, mask, (mask.cumsum(-1) - 1), None, batch["visual_token_mask"], None
    )
    err = float(np.abs(got - out.logits[0].numpy()).max())
    RESULTS[f"{variant}/runtime-prefill-vs-reference"] = err
    assert err < TOL
    path = tmp_path / "img.png"
    image.save(path)
    code = main(["-q", "run", str(m.bundle), "--image", str(path), "--prompt", prompt, "--max-new-tokens", "5"])
    assert code == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_graph_matches_hf_features(anyres, variant):
    """Runs after the decoder tests: reuses their export when there is one."""
    from var_export.runtime import make_session

    m = anyres(variant)
    fam = family_of(m.model)
    sizes = [(64, 64), (80, 48), (48, 80), (40, 32)]  # square, wide, tall, small
    images = ta.synthetic_images(len(sizes), seed=3, sizes=sizes)
    batch = m.batch(images, ["what is it?"] * len(sizes))
    with torch.no_grad():
        ref = fam.image_features(m.model, batch).numpy()
    sess = make_session(m.vision_encoder)
    assert [o.name for o in sess.get_outputs()] == list(fam.vision_outputs)
    nb = _numpy(batch)
    outputs = dict(zip(fam.vision_outputs, sess.run(list(fam.vision_outputs), fam.vision_feeds(nb))))
    got = fam.merge_vision_outputs(outputs, nb, fam.manifest_fields(m.model.config))
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    RESULTS[f"{variant}/vision-vs-hf"] = err
    assert err < TOL


def test_inspect_draws_the_base_tile(anyres, tmp_path):
    from var_export.inspect import inspect_bundle

    m = anyres("tiny-llava-next")
    image = ta.synthetic_images(1, seed=2, sizes=[(64, 64)])[0]
    result = inspect_bundle(m.bundle, image, "What is in the image?", tmp_path / "inspect")
    summary = result.summary
    assert summary["grid"] == [ta.TILE_GRID, ta.TILE_GRID]
    sinks = [entry for entry in summary["layers"] if entry["layer"] >= tl.FIRST_SINK_LAYER]
    assert sinks and all(entry["visual_sinks"] > 0 for entry in sinks)
    assert any(p.suffix == ".png" for p in result.files)


def test_report(capsys):
    with capsys.disabled():
        for k, v in sorted(RESULTS.items()):
            print(f"anyres {k:50s} {v:.2e}")

