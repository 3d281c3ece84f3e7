"""TensorRT engines for the model families beyond LLaVA-1.5 (issue 14), on their tiny variants.

Each family's vision graph takes other inputs than LLaVA-1.5's images: Qwen2.5-VL flattened
patches ``pixel_values`` [N_patches, C*T*P*P] + ``image_grid_thw`` [images, 3] (and M-RoPE
``position_ids`` [3, B, S] in the decoder), LLaVA-NeXT / OneVision and InternVL tiles
[N_tiles, 3, H, W]. The optimization profiles come from the family named in the bundle
manifest and the bundle's image processor settings:

* unit tests of those ranges (no TensorRT needed);
* per family, TensorRT-RTX's parser accepts the bundle's three graphs and builds the three
  engines (ahead of time, no GPU); the profiles admit what the processor and the runtime feed
  for two images of different sizes in one batch. The bundles are the session's (conftest.py,
  tiled_fixtures.py): nothing is exported again here.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from var_export import trt
from var_export.calibration import tiny_internvl
from var_export.calibration import tiny_qwen as tq
from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
from var_export.core.errors import ConfigError
from var_export.families import INTERNVL, LLAVA, LLAVA_NEXT, QWEN2_5_VL, family_for_model_type

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX (the dev extra) is not installed"
)
MAX_SEQ = 128
# small profiles, one target and the lowest builder optimization level keep each build to seconds
SMALL = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=2, max_seq=MAX_SEQ, max_past=MAX_SEQ,
                        opt_level=0)


# ---------------------------------------------------------------------------------------------
# profile ranges (no TensorRT)


def _qwen_manifest(**extra):
    return {"family": "qwen2_5_vl", "spatial_merge_size": tq.MERGE_SIZE, "max_position_embeddings": 1024, **extra}


QWEN_PROCESSOR = {"patch_size": tq.PATCH_SIZE, "merge_size": tq.MERGE_SIZE,
                  "size": {"shortest_edge": tq.MIN_PIXELS, "longest_edge": tq.MAX_PIXELS}}


def test_qwen_vision_profile_follows_the_processor_pixels_and_the_prompt():
    unit = tq.MERGE_SIZE**2  # patches per image token
    lo, hi = tq.MIN_PIXELS // tq.UNIT**2, tq.MAX_PIXELS // tq.UNIT**2  # tokens per image: 4, 64
    limits = trt.ProfileLimits.for_bundle(_qwen_manifest(), max_batch=3)
    (p,) = trt.make_profiles({"pixel_values": ["4*image_tokens", 384], "image_grid_thw": ["images", 3]}, limits,
                             trt.family_axes(_qwen_manifest(), QWEN_PROCESSOR))
    opt = int(round(np.sqrt(lo * hi)))
    assert p["pixel_values"] == ((unit * lo, 384), (unit * opt, 384), (3 * unit * hi, 384))
    assert p["image_grid_thw"] == ((1, 3), (1, 3), (3, 3))
    # a prompt shorter than the processor's largest image caps the tokens per image; --max-images
    short = trt.ProfileLimits.from_max(max_batch=2, max_seq=20, max_past=8, max_images=5)
    axes = QWEN2_5_VL.vision_profile_axes(_qwen_manifest(), QWEN_PROCESSOR, images=short.image_count,
                                          sequence=short.sequence)
    assert axes == {"pixel_values": {0: (unit * lo, unit * 9, 5 * unit * 20)}, "image_grid_thw": {0: (1, 1, 5)}}
    # without processor settings: 1 token .. a prompt's worth per image
    bare = QWEN2_5_VL.vision_profile_axes(_qwen_manifest(), {}, images=(1, 1, 2), sequence=(1, 1, 100))
    assert bare["pixel_values"] == {0: (unit, unit * 10, 2 * unit * 100)}
    with pytest.raises(Exception, match="spatial_merge_size"):
        QWEN2_5_VL.vision_profile_axes({"family": "qwen2_5_vl"}, {}, images=(1, 1, 2), sequence=(1, 1, 8))


def test_mrope_position_ids_and_lone_qwen_vision_graph():
    limits = trt.ProfileLimits.from_max(max_batch=2, max_seq=16, max_past=32)
    (p,) = trt.make_profiles({"position_ids": [3, "batch", "sequence"]}, limits)
    assert p["position_ids"] == ((3, 1, 1), (3, 1, 1), (3, 2, 16))
    # a Qwen vision graph on its own (no manifest, so no family): refused, with the way out
    with pytest.raises(ConfigError, match="no known role.*Build from the bundle directory"):
        trt.make_profiles({"pixel_values": ["4*image_tokens", 384]}, limits, trt.family_axes(None))


def test_tiled_families_profile_tiles_per_image():
    next_manifest = {"family": "llava_next", "anyres": {"grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
                                                        "tile_size": 32, "vision_aspect_ratio": None}}
    assert LLAVA_NEXT.max_tiles_per_image(next_manifest) == 5  # 2x2 grid + the base tile
    axes = trt.family_axes(next_manifest, {})(trt.ProfileLimits.from_max(max_batch=3))
    assert axes == {"pixel_values": {0: (1, 5, 15)}}
    with pytest.raises(Exception, match="anyres"):
        LLAVA_NEXT.vision_profile_axes({"family": "llava_next"}, {}, images=(1, 1, 2), sequence=(1, 1, 8))
    # InternVL: max_patches crops + a thumbnail; one crop has no thumbnail; no cropping = 1 tile
    for proc, k in (({"max_patches": 4}, 5), ({"max_patches": 1}, 1), ({"max_patches": 12, "crop_to_patches": False}, 1)):
        assert INTERNVL.vision_profile_axes({}, proc, images=(1, 1, 2), sequence=(1, 1, 64)) == {
            "pixel_values": {0: (1, k, 2 * k)}}
    # without processor settings: as many tiles as a prompt holds
    assert INTERNVL.max_tiles_per_image({}, {"image_seq_length": 16}, 100) == 6
    with pytest.raises(ConfigError, match="max_patches"):
        INTERNVL.max_tiles_per_image({}, {}, 100)
    # LLaVA-1.5 (and a manifest without a family): images [I, 3, H, W]
    assert family_for_model_type("llava") is LLAVA
    assert trt.family_axes({}, {})(trt.ProfileLimits.from_max(max_batch=2, max_images=3)) == {
        "pixel_values": {0: (1, 1, 3)}}


def test_limits_and_build_config_are_checked():
    with pytest.raises(ConfigError, match="--max-images must be >= 1"):
        trt.ProfileLimits.from_max(max_images=0)
    with pytest.raises(ConfigError, match=r"optimization level 0..5.*found 7"):
        trt.BuildConfig(opt_level=7)
    assert trt.ProfileLimits.for_bundle({}, max_images=6).to_dict()["images"] == (1, 1, 6)


def test_image_processor_config_of_a_bundle(tmp_path):
    assert trt.image_processor_config(None) == {} == trt.image_processor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_patches": 6}))
    assert trt.image_processor_config(tmp_path) == {"max_patches": 6}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_patches": 3}}))
    assert trt.image_processor_config(tmp_path) == {"max_patches": 3}
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        trt.image_processor_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# real engines (TensorRT-RTX, ahead of time)


def _build(bundle, tmp_path, variant):
    reports = trt.lint_sources(bundle, "tensorrt-rtx")
    for name, report in reports.items():
        assert report.ok and report.authority.startswith("tensorrt_rtx"), f"{name}: {report.format()}"
    engines = trt.build_engines(bundle, tmp_path / "e.plan", SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.embed_tokens.plan", "e.engines.json", "e.plan", "e.vision_encoder.plan"]
    entries = engines.manifest["engines"]
    for name in (VISION_ENCODER, EMBED_TOKENS, DECODER):
        assert engines.engines[name].stat().st_size == entries[name]["bytes"] > 100_000
    print(f"\n{variant}: " + ", ".join(f"{n} {e['bytes'] / 1e6:.1f} MB in {e['build_seconds']:.1f} s"
                                       for n, e in entries.items()))
    profiles = {name: {k: tuple(tuple(v) for v in r) for k, r in entries[name]["profiles"][0].items()}
                for name in entries}
    io = {name: {t["name"]: t for t in entries[name]["io"]["inputs"]} for name in entries}
    return engines, profiles, io


def _decoder_feeds(batch):
    """Shapes the runtime feeds the decoder at prefill (positions [B, S] or [3, B, S])."""
    b, s = batch["input_ids"].shape
    return {"inputs_embeds": (b, s, tq.HIDDEN_SIZE), "attention_mask": (b, s), "visual_token_mask": (b, s)}


@needs_rtx
def test_qwen2_5_vl_engines(tiny_qwen_loaded, tiny_qwen_bundle, tmp_path):
    from var_export.inputs import prepare_batch

    engines, profiles, io = _build(tiny_qwen_bundle, tmp_path, "tiny-qwen2.5-vl")
    unit, lo, hi = tq.MERGE_SIZE**2, tq.MIN_PIXELS // tq.UNIT**2, tq.MAX_PIXELS // tq.UNIT**2
    c_t_p_p = 3 * tq.TEMPORAL_PATCH * tq.PATCH_SIZE**2
    vision = profiles[VISION_ENCODER]
    assert vision["pixel_values"] == ((unit * lo, c_t_p_p), (unit * 16, c_t_p_p), (2 * unit * hi, c_t_p_p))
    assert vision["image_grid_thw"] == ((1, 3), (1, 3), (2, 3))
    assert io[VISION_ENCODER]["image_grid_thw"]["dtype"] == "int64"
    assert io[VISION_ENCODER]["pixel_values"]["shape"] == [-1, c_t_p_p]
    assert io[DECODER]["position_ids"]["shape"] == [3, -1, -1]
    assert profiles[DECODER]["position_ids"] == ((3, 1, 1), (3, 1, 1), (3, 2, MAX_SEQ))
    # two images of different sizes (different token counts) in one batch fit the profiles
    for sizes in (((64, 64), (48, 80)), ((32, 96), (80, 48))):
        images = tq.synthetic_images(2, seed=3, sizes=sizes)
        batch = prepare_batch(tiny_qwen_loaded.processor, images, ["what is it ?", "describe it ."])
        feeds = QWEN2_5_VL.vision_feeds(batch)
        assert len(set(np.asarray(batch["image_grid_thw"]).prod(-1).tolist())) == 2
        trt.check_shapes(engines.manifest["engines"][VISION_ENCODER]["profiles"][0],
                         {k: v.shape for k, v in feeds.items()}, "vision")
        pos, _ = QWEN2_5_VL.prefill_positions(batch)
        trt.check_shapes(engines.manifest["engines"][DECODER]["profiles"][0],
                         {**_decoder_feeds(batch), "position_ids": pos.shape}, "decoder")
    too_big = {"pixel_values": (2 * unit * hi + unit, c_t_p_p)}
    with pytest.raises(ConfigError, match="outside the engine's profile"):
        trt.check_shapes(engines.manifest["engines"][VISION_ENCODER]["profiles"][0], too_big, "vision")


TILED = [
    "tiny-llava-next",
    # their decoder exports are slow tests in test_tiled_families.py too (shared fixture)
    pytest.param("tiny-llava-onevision", marks=pytest.mark.slow),
    pytest.param(tiny_internvl.NAME, marks=pytest.mark.slow),
]
TILES_PER_IMAGE = {"tiny-llava-next": 5, "tiny-llava-onevision": 5, tiny_internvl.NAME: 5}


@needs_rtx
@pytest.mark.parametrize("variant", TILED)
def test_tiled_family_engines(tiled, tmp_path, variant):
    from var_export.families import family_of

    m = tiled(variant)
    engines, profiles, io = _build(m.bundle, tmp_path, variant)
    k = TILES_PER_IMAGE[variant]
    side = int(io[VISION_ENCODER]["pixel_values"]["shape"][-1])
    assert profiles[VISION_ENCODER]["pixel_values"] == (
        (1, 3, side, side), (k, 3, side, side), (2 * k, 3, side, side))
    assert profiles[DECODER]["position_ids"] == ((1, 1), (1, 1), (2, MAX_SEQ))
    # the batch of two images of different sizes: every tile the runtime feeds fits
    batch = m.batch()
    feeds = family_of(m.model).vision_feeds(batch)
    assert feeds["pixel_values"].shape[0] > 2
    trt.check_shapes(engines.manifest["engines"][VISION_ENCODER]["profiles"][0],
                     {k: v.shape for k, v in feeds.items()}, "vision")
    b, s = batch["input_ids"].shape
    trt.check_shapes(engines.manifest["engines"][DECODER]["profiles"][0],
                     {**_decoder_feeds(batch), "position_ids": (b, s)}, "decoder")
    if variant == tiny_internvl.NAME:  # the vision graph returns one output; LLaVA-NeXT's two
        assert [t["name"] for t in engines.manifest["engines"][VISION_ENCODER]["io"]["outputs"]] == ["image_features"]
    else:
        assert [t["name"] for t in engines.manifest["engines"][VISION_ENCODER]["io"]["outputs"]] == [
            "image_features", "image_newline"]
