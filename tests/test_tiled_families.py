"""LLaVA-NeXT, LLaVA-OneVision (any-resolution tiles + image newlines) and InternVL (dynamic
tiles + pixel shuffle), on their tiny variants.

* every token ``<image>`` expands into (base tile, grid tiles, newlines) is visual; for InternVL
  the ``<IMG_CONTEXT>`` tokens are, ``<img>`` / ``</img>`` are not;
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

from tests.test_parity import TOL, Case, _run_both, _session
from tests.tiled_fixtures import HEADS
from var_export.calibration import tiny_anyres as ta
from var_export.calibration import tiny_internvl
from var_export.calibration import tiny_llava as tl
from var_export.families import anyres as packing
from var_export.families import family_of

ANYRES = list(ta.VARIANTS)
VARIANTS = [*ANYRES, tiny_internvl.NAME]
# The decoder export dominates the cost (~20-60 s per model on 2 shared cores): the default run
# exports LLaVA-NeXT's decoder (Mistral); OneVision's and InternVL's (Qwen2, q/k/v biases) run
# with -m slow.
DECODER_VARIANTS = [
    "tiny-llava-next",
    pytest.param("tiny-llava-onevision", marks=pytest.mark.slow),
    pytest.param(tiny_internvl.NAME, marks=pytest.mark.slow),
]
RESULTS: dict[str, float] = {}
RUN_SIZES = {"tiny-llava-next": (80, 48), "tiny-llava-onevision": (80, 48), "tiny-internvl": (160, 96)}
VISION_SIZES = {  # square, wide, tall, small
    "tiny-llava-next": [(64, 64), (80, 48), (48, 80), (40, 32)],
    "tiny-llava-onevision": [(64, 64), (80, 48), (48, 80), (40, 32)],
    "tiny-internvl": [(128, 128), (160, 64), (64, 144), (48, 40)],
}


def _numpy(batch: dict) -> dict:
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items()}


@pytest.mark.parametrize("variant", ANYRES)
def test_visual_tokens_are_tiles_and_newlines(tiled, variant):
    m = tiled(variant)
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


def test_internvl_visual_tokens_are_the_image_context(tiled):
    m = tiled(tiny_internvl.NAME)
    batch = m.batch()
    tok = m.processor.tokenizer
    ids, visual = batch["input_ids"], batch["visual_token_mask"]
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert bool((ids[visual] == context).all()) and int(visual.sum()) == int((ids == context).sum())
    n_tiles = batch["pixel_values"].shape[0]
    assert int(visual.sum()) == n_tiles * tiny_internvl.TOKENS_PER_TILE
    for marker in ("<img>", "</img>"):  # one pair per image, never visual
        pos = ids == tok.convert_tokens_to_ids(marker)
        assert pos.sum(1).tolist() == [1, 1] and not bool((pos & visual).any())
    counts = visual.sum(1).tolist()
    assert counts[0] != counts[1]  # different sizes, different numbers of tiles


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
def test_var_decoder_equals_reference(tiled, plain_logits, tmp_path, variant, mode, parity_results):
    from var_export.passes.pipeline import apply_var, load_model

    m = tiled(variant)
    batch = m.batch()
    embeds = m.embeds(batch)
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
    RESULTS[f"{variant}/{mode}"] = parity_results[f"{variant}/{mode}"] = max(diffs)
    assert max(diffs) < TOL, f"{variant}/{mode}: per-step max |Δlogits| {diffs}"
    effect = max(float((a - b).abs().max()) for a, b in zip(var_logits, plain_logits[variant]))
    RESULTS[f"{variant}/{mode} (VAR effect)"] = effect
    parity_results[f"{variant}/{mode} (VAR effect on logits)"] = effect
    assert effect > 100 * TOL, f"{variant}/{mode}: VAR changed logits by only {effect:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_calibration_finds_planted_sinks_and_heads(tiled, variant):
    from var_export.calibration.calibrate import calibrate

    m = tiled(variant)
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
def test_runtime_prompt_logits_and_run(tiled, variant, tmp_path, capsys):
    """The bundle's own path (processor -> vision graph -> numpy packing -> decoder) equals the
    reference; `var-export run` generates."""
    from var_export.calibration.reference import VarReference
    from var_export.cli import main
    from var_export.runtime import VarRuntime

    m = tiled(variant)
    manifest = json.loads((m.bundle / "manifest.json").read_text())
    assert manifest["family"] == family_of(m.model).name
    assert ("anyres" in manifest) == (variant in ANYRES)  # the packing facts of NeXT / OneVision
    image = ta.synthetic_images(2, seed=11, sizes=[RUN_SIZES[variant]])[1]
    prompt = "What color is the square on the left?"
    rt = VarRuntime(m.bundle)
    got = rt.prompt_logits(image, prompt)  # (S, V)
    batch = m.batch([image], [prompt])
    embeds = m.embeds(batch)
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
def test_vision_graph_matches_hf_features(tiled, variant):
    """Runs after the decoder tests: reuses their export when there is one."""
    from var_export.runtime import make_session

    m = tiled(variant)
    fam = family_of(m.model)
    sizes = VISION_SIZES[variant]
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


def test_inspect_draws_the_whole_image_tile(tiled, tmp_path):
    """NeXT: from the bundle, the base tile (first); InternVL: from the model, the thumbnail (last)."""
    from var_export.inspect import inspect_bundle, inspect_pretrained

    m = tiled("tiny-llava-next")
    image = ta.synthetic_images(1, seed=2, sizes=[(64, 64)])[0]
    result = inspect_bundle(m.bundle, image, "What is in the image?", tmp_path / "next")
    assert result.summary["grid"] == [ta.TILE_GRID, ta.TILE_GRID]
    image = ta.synthetic_images(1, seed=2, sizes=[(128, 96)])[0]
    internvl = inspect_pretrained(tiny_internvl.NAME, image, "What is in the image?", tmp_path / "internvl")
    side = tiny_internvl.PATCH_GRID // 2
    assert internvl.summary["grid"] == [side, side]
    for res in (result, internvl):
        sinks = [e for e in res.summary["layers"] if e["layer"] >= tl.FIRST_SINK_LAYER]
        assert sinks and all(e["visual_sinks"] > 0 and e["sink_patches"] for e in sinks)
        assert any(p.suffix == ".png" for p in res.files)


def test_report(capsys):
    with capsys.disabled():
        for k, v in sorted(RESULTS.items()):
            print(f"tiled {k:50s} {v:.2e}")

