"""The one command on a local HF LLaVA directory that is not tiny-llava, and its refusals."""

from __future__ import annotations

import json
import shutil
import sys

import onnx
import pytest
import torch

from var_export.cli import main


@pytest.fixture(scope="session")  # session: under xdist each test of this file is a unit of its own
def local_llava(tmp_path_factory, tiny_llava_path):
    """A random LLaVA (hidden 256, MHA 4 heads, 3 layers) saved with save_pretrained, with the
    tiny-llava processor (same vision geometry) — any user's local HF directory looks like this."""
    from transformers import AutoProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    src = LlavaConfig.from_pretrained(tiny_llava_path)
    text = LlamaConfig(
        hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=src.text_config.vocab_size, max_position_embeddings=512,
    )
    cfg = LlavaConfig(
        text_config=text, vision_config=src.vision_config, image_token_id=src.image_token_id,
        vision_feature_layer=src.vision_feature_layer,
        vision_feature_select_strategy=src.vision_feature_select_strategy,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("local") / "my-llava"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_llava_path).save_pretrained(out)
    return out


def test_one_command_on_a_local_llava_dir(local_llava, tmp_path):
    out = tmp_path / "b"
    rc = main(["-q", "--model", str(local_llava), "--out", str(out), "--heads", "dynamic",
               "--sink-dims", "3,200", "--tau", "6", "--layers", "1:"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["var_layers"] == [1, 2]
    assert manifest["var"]["sink_dims"] == [3, 200] and manifest["var"]["tau"] == 6
    assert manifest["head_mode"] == "dynamic"
    decoder = onnx.load(out / "decoder_model_merged.onnx", load_external_data=False)
    names = {i.name for i in decoder.graph.input} | {o.name for o in decoder.graph.output}
    assert {"visual_token_mask", "past_sink_mask", "present_sink_mask"} <= names
    meta = {p.key: p.value for p in decoder.metadata_props}
    assert "var_export.applied" in meta
    for f in ("vision_encoder.onnx", "embed_tokens.onnx", "tokenizer.json", "processor_config.json"):
        assert (out / f).is_file(), f


def test_calibration_from_another_model_is_refused(local_llava, tmp_path, tiny_loaded):
    from var_export.calibration.calibrate import calibrate, write_calibration
    from var_export.core.settings import VarSettings
    from var_export.inputs import calibration_samples

    cal = calibrate(tiny_loaded, calibration_samples(None, 1), VarSettings(sink_dims=(5, 17)))
    cal_path = write_calibration(cal, tmp_path / "calibration.json")
    out = tmp_path / "b"
    rc = main(["-q", "export", "--model", str(local_llava), "--out", str(out), "--calibration", str(cal_path)])
    assert rc != 0
    assert not out.exists()


def test_export_no_var_and_bad_inputs_leave_nothing(local_llava, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["-q", "export", "--model", str(local_llava), "--out", str(out), "--no-var"]) == 0
    decoder = onnx.load(out / "decoder_model_merged.onnx", load_external_data=False)
    assert "visual_token_mask" not in {i.name for i in decoder.graph.input}
    assert json.loads((out / "manifest.json").read_text())["var"] is None
    # sink dim out of range for hidden 256; unknown preset; a model dir without weights
    broken = tmp_path / "broken"
    shutil.copytree(local_llava, broken)
    (broken / "model.safetensors").unlink()
    for args, needle in (
        (["--model", str(local_llava), "--heads", "dynamic", "--sink-dims", "3,999"], "999"),
        (["--model", "no-such-preset"], "no-such-preset"),
        (["--model", str(broken), "--heads", "dynamic", "--sink-dims", "3"], "weights"),
    ):
        target = tmp_path / "x"
        rc = main(["-q", "export", "--out", str(target), *args])
        err = capsys.readouterr().err
        assert rc != 0, args
        assert needle in err, (needle, err)
        assert not target.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".var-export-")]


def test_plan_output_without_tensorrt_keeps_bundle_and_names_build_trt(local_llava, tmp_path, capsys, monkeypatch):
    """--out X.plan where no TensorRT is importable keeps the complete bundle and names the
    command that finishes the job; with TensorRT-RTX here, that command then builds the engines."""
    pytest.importorskip("onnxruntime")
    from var_export import trt

    rtx_here = "tensorrt-rtx" in trt.available_flavours()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensorrt", None)
        m.setitem(sys.modules, "tensorrt_rtx", None)
        plan = tmp_path / "engine.plan"
        rc = main(["-q", "--model", str(local_llava), "--out", str(plan), "--heads", "dynamic",
                   "--sink-dims", "3,200", "--tau", "6"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "var-export build-trt" in err and str(tmp_path / "engine_bundle") in err
    assert not plan.exists()
    from var_export.bundle import load_bundle

    bundle = load_bundle(tmp_path / "engine_bundle")  # complete and verified
    assert bundle.var_layers == [2]
    if rtx_here:  # finish as the message says
        rc = main(["-q", "build-trt", str(tmp_path / "engine_bundle"), "--out", str(plan),
                   "--trt-targets", "86", "--max-batch", "1", "--max-seq", "16", "--max-past", "16"])
        assert rc == 0 and plan.is_file() and (tmp_path / "engine.vision_encoder.plan").is_file()
        engines = json.loads((tmp_path / "engine.engines.json").read_text())
        assert engines["var_layers"] == [2] and engines["bundle"] == "engine_bundle"


def test_default_hybrid_calibrates_a_local_llava_dir(local_llava, tmp_path):
    """No --heads: hybrid, so the command calibrates the local model itself (any hidden size,
    head count) and bakes exactly the heads its calibration.json lists."""
    out = tmp_path / "b"
    # random weights may give no image-centric head: --allow-noop (the refusal: tests/test_trust.py)
    rc = main(["-q", "--model", str(local_llava), "--out", str(out), "--sink-dims", "3,200", "--tau", "6",
               "--allow-noop"])
    assert rc == 0
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["sink_dims"] == [3, 200] and cal["fingerprint"]["hidden_size"] == 256
    assert cal["fingerprint"]["num_heads"] == 4 and len(cal["layers"]) >= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head_mode"] == "hybrid" and manifest["heads"] == cal["heads"]
    decoder = onnx.load(out / "decoder_model_merged.onnx", load_external_data=False)
    meta = {p.key: p.value for p in decoder.metadata_props}
    assert json.loads(meta["var_export.heads"]) == cal["heads"]


def test_fp16_bundle_keeps_var_in_fp32_and_tracks_the_reference(tmp_path, tiny_loaded):
    """--dtype fp16: the graph runs in half precision, VAR's arithmetic in fp32; its sink masks equal
    the fp32 reference's and its VAR effect matches the reference's to fp16 rounding."""
    import numpy as np

    from var_export.calibration.reference import VarReference
    from var_export.calibration.tiny_llava import synthetic_images
    from var_export.export import embed_and_merge
    from var_export.inputs import prepare_batch
    from var_export.pipeline import BuildOptions, build_bundle
    from var_export.runtime import decode_step_numpy, empty_past, make_session, prefill_position_ids

    result = build_bundle(BuildOptions(out=tmp_path / "fp16", model="tiny-llava", heads="dynamic", dtype="fp16"))
    decoder = make_session(result.bundle_dir / "decoder_model_merged.onnx")
    batch = prepare_batch(tiny_loaded.processor, synthetic_images(1, seed=3), ["Describe the image."])
    embeds = embed_and_merge(tiny_loaded.model, batch["input_ids"], batch["pixel_values"])
    mask, visual = batch["attention_mask"], batch["visual_token_mask"]
    pos = prefill_position_ids(mask.numpy())
    feeds = (embeds.numpy().astype(np.float16), mask.numpy(), pos, empty_past(decoder, 1))
    on, nxt = decode_step_numpy(decoder, *feeds, visual.numpy())
    off, _ = decode_step_numpy(decoder, *feeds, None)
    ref = VarReference(tiny_loaded.model, result.settings)
    ref_on = ref.step(embeds, mask, torch.from_numpy(pos), None, visual, None)
    ref_off = VarReference(tiny_loaded.model, None).step(embeds, mask, torch.from_numpy(pos), None, visual, None)
    np.testing.assert_array_equal(nxt["past_sink_mask"], ref_on.present_sink_mask.numpy())
    effect16 = on.astype(np.float32) - off.astype(np.float32)
    effect32 = (ref_on.logits - ref_off.logits).numpy()
    assert np.abs(effect32).max() > 1e-2  # VAR does something here
    assert np.abs(effect16 - effect32).max() < 0.25 * np.abs(effect32).max()
    assert np.abs(on.astype(np.float32) - ref_on.logits.numpy()).max() < 2e-2
