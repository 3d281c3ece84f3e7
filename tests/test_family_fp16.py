"""``var-export export --dtype fp16`` for the model families beyond LLaVA-1.5 (issue 14).

The pipeline builds an fp16 bundle of tiny-qwen2.5-vl (M-RoPE, dynamic-resolution vision graph),
of tiny-llava-next (any-resolution tiles) and, ``-m slow``, of tiny-internvl (crops + thumbnail): all three graphs run in half precision, VAR's
arithmetic in fp32 (as tiny-llava's fp16 bundle, tests/test_pipeline.py). Checked against the
fp32 PyTorch reference:

* the fp16 vision graph's features (through the runtime's merge) vs HF's fp32 features;
* the full runtime path (processor -> fp16 vision -> merge -> fp16 VAR decoder): prompt logits
  within fp16 rounding of the fp32 reference with VAR;
* the decoder's sink masks equal the reference's, and its VAR effect matches the reference's;
* with TensorRT-RTX installed, the fp16 bundle's three graphs build into fp16 engines.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from var_export import trt
from var_export.calibration import tiny_qwen as tq
from var_export.calibration.reference import VarReference, multimodal_embeds, prompt_positions
from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
from var_export.families import family_of
from var_export.inputs import prepare_batch

# fp16 tolerances, as tests/test_pipeline.py's tiny-llava fp16 test: |logits| are O(10) here, the
# half-precision ulp at 8 is 8e-3; the vision graph adds its own rounding to the image features
LOGIT_TOL = 2e-2
FEATURE_RTOL = 5e-3  # max |Δ| / max |features|
PROMPT = "describe the picture in detail ."


def _loaded(request, variant):
    if variant == "tiny-qwen2.5-vl":
        return request.getfixturevalue("tiny_qwen_loaded")
    return request.getfixturevalue("tiled")(variant).loaded


def _image(variant):
    if variant == "tiny-qwen2.5-vl":
        return tq.synthetic_images(1, seed=5, sizes=((48, 80),))[0]
    from var_export.calibration import tiny_anyres as ta

    if variant == "tiny-internvl":
        return ta.synthetic_images(1, seed=5, sizes=((128, 128),))[0]  # 4 crops + the thumbnail
    return ta.synthetic_images(1, seed=5, sizes=((64, 64),))[0]  # square: VAR moves the logits most


@pytest.mark.parametrize("variant", ["tiny-qwen2.5-vl",  # the tiled families: slow (the suite's 3-minute aim)
                                     pytest.param("tiny-llava-next", marks=pytest.mark.slow),
                                     pytest.param("tiny-internvl", marks=pytest.mark.slow)])
def test_fp16_family_bundle_tracks_the_fp32_reference(request, tmp_path, variant):
    from var_export.pipeline import BuildOptions, build_bundle
    from var_export.runtime import VarRuntime, decode_step_numpy, empty_past

    loaded = _loaded(request, variant)
    model, family = loaded.model, family_of(loaded.model)
    result = build_bundle(BuildOptions(out=tmp_path / "fp16", model=variant, heads="hybrid", dtype="fp16"))
    rt = VarRuntime(result.bundle_dir)
    rt_manifest = rt.bundle.manifest
    assert rt_manifest["dtype"] == "fp16" and rt_manifest["family"] == family.name
    for graph in (VISION_ENCODER, DECODER):
        floats = {i.type for i in rt.sessions[graph].get_inputs() if "float" in i.type}
        assert floats == {"tensor(float16)"}, (graph, floats)

    image = _image(variant)
    batch = prepare_batch(loaded.processor, [image], [PROMPT])
    extra = {k: batch[k] for k in family.processor_keys if k in batch}
    np_batch = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items()}
    with torch.no_grad():
        # vision: the fp16 graph + the runtime's merge vs HF's fp32 image features
        vision = rt.sessions[VISION_ENCODER]
        feeds = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v
                 for k, v in family.vision_feeds(np_batch).items()}
        names = [o.name for o in vision.get_outputs()]
        got = family.merge_vision_outputs(dict(zip(names, vision.run(names, feeds))), np_batch, rt_manifest)
        want = family.image_features(model, {"pixel_values": batch["pixel_values"], **extra}).numpy()
        feat_err = float(np.abs(got.astype(np.float32) - want).max() / np.abs(want).max())

        embeds = multimodal_embeds(model, batch["input_ids"], batch["pixel_values"], **extra)
        pos, _ = prompt_positions(model, batch)
        mask, visual = batch["attention_mask"], batch["visual_token_mask"]
        heads = [tuple(h) for h in result.heads]
        ref_on = VarReference(model, result.settings, heads).step(embeds, mask, pos, None, visual, None)
        ref_off = VarReference(model, None).step(embeds, mask, pos, None, visual, None)

    # the whole runtime path in fp16 (VAR on) vs the fp32 reference
    logits16 = rt.prompt_logits(image, PROMPT)
    runtime_err = float(np.abs(logits16.astype(np.float32) - ref_on.logits[0].numpy()).max())
    # the decoder alone on the reference's embeddings: sink masks and the VAR effect
    dec = rt.decoder
    args = (embeds.numpy().astype(np.float16), mask.numpy(), pos.numpy(), empty_past(dec, 1))
    on, nxt = decode_step_numpy(dec, *args, visual.numpy())
    off, _ = decode_step_numpy(dec, *args, None)
    np.testing.assert_array_equal(nxt["past_sink_mask"], ref_on.present_sink_mask.numpy())
    effect16 = on.astype(np.float32) - off.astype(np.float32)
    effect32 = (ref_on.logits - ref_off.logits).numpy()
    decoder_err = float(np.abs(on.astype(np.float32) - ref_on.logits.numpy()).max())
    effect_err = float(np.abs(effect16 - effect32).max())
    print(f"\n{variant} fp16: vision rel |Δ| {feat_err:.2e}, runtime logits |Δ| {runtime_err:.2e}, decoder "
          f"logits |Δ| {decoder_err:.2e}, VAR effect fp32 {np.abs(effect32).max():.3f} vs fp16 |Δ| {effect_err:.2e}")
    assert feat_err < FEATURE_RTOL
    assert np.abs(effect32).max() > 1e-2  # VAR does something here
    assert effect_err < 0.25 * np.abs(effect32).max()
    assert decoder_err < LOGIT_TOL and runtime_err < LOGIT_TOL

    if importlib.util.find_spec("tensorrt_rtx") is not None:  # fp16 engines of the three graphs
        config = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=1, max_seq=128, max_past=128,
                                 opt_level=0)
        engines = trt.build_engines(result.bundle_dir, tmp_path / "e.plan", config)
        assert engines.manifest["precision"] == "fp16"
        for graph in (VISION_ENCODER, EMBED_TOKENS, DECODER):
            assert engines.engines[graph].stat().st_size > 100_000
        dtypes = {t["name"]: t["dtype"] for t in engines.manifest["engines"][DECODER]["io"]["inputs"]}
        assert dtypes["inputs_embeds"] == "float16" and dtypes["visual_token_mask"] == "bool"
        vision_in = {t["name"]: t["dtype"] for t in engines.manifest["engines"][VISION_ENCODER]["io"]["inputs"]}
        assert vision_in["pixel_values"] == "float16"
