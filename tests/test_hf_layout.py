"""The bundle as Hugging Face tooling and transformers.js expect it (var_export.hf_layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
from var_export.core.errors import ConfigError
from var_export.hf_layout import TJS_PAST_SINK_MASK, write_transformers_js_layout


def test_autoconfig_loads_the_bundle(tiny_var_bundle):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(tiny_var_bundle["bundle"]))
    assert config.model_type == "llava"
    assert GenerationConfig.from_pretrained(str(tiny_var_bundle["bundle"])).eos_token_id is not None


def _tjs_feeds_loop(session, embeds, mask, visual, embed, steps: int) -> list[np.ndarray]:
    """The transformers.js decode loop, plus what docs/serving.md tells its user to add:
    outputs named present* come back as past_key_values* (its renaming rule); the caller adds
    an empty sink cache at prefill and visual_token_mask at every step."""
    from var_export.runtime import empty_past, prefill_position_ids

    past = empty_past(session, 1)  # the KV caches transformers.js creates from the config
    lv = next(i.shape[1] for i in session.get_inputs() if i.name == TJS_PAST_SINK_MASK)
    past[TJS_PAST_SINK_MASK] = np.zeros((1, lv, 0), bool)  # what its user adds
    empty = {i.name for i in session.get_inputs()} - {"inputs_embeds", "attention_mask", "position_ids", "visual_token_mask"}
    assert set(past) == empty  # the user's prefill feeds: KV caches and the one sink cache
    positions = prefill_position_ids(mask)
    names = [o.name for o in session.get_outputs()]
    logits_per_step = []
    for _ in range(steps):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                 "visual_token_mask": visual, **past}
        outs = dict(zip(names, session.run(names, feeds)))
        logits_per_step.append(outs["logits"][:, -1])
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        token = outs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        embeds = embed(token)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        visual = np.concatenate([visual, np.zeros((1, 1), bool)], 1)
        positions = positions[:, -1:] + 1
    return logits_per_step


def test_transformers_js_layout_runs_the_var_cache_loop(tiny_var_bundle, tmp_path):
    import onnxruntime as ort

    from var_export.runtime import VarRuntime, decode_step_numpy, empty_past, prefill_position_ids

    out = write_transformers_js_layout(tiny_var_bundle["bundle"], tmp_path / "tjs")
    for name in (VISION_ENCODER, EMBED_TOKENS, DECODER):
        assert (out / "onnx" / name).is_file()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"

    session = ort.InferenceSession(str(out / "onnx" / DECODER), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    assert TJS_PAST_SINK_MASK in inputs and "past_sink_mask" not in inputs
    assert "present_sink_mask".replace("present", "past_key_values") == TJS_PAST_SINK_MASK

    rt = VarRuntime(tiny_var_bundle["bundle"])
    batch = rt.prepare(tiny_var_bundle["images"][0], "What is in the picture?")
    embeds, _ = rt.prompt_embeds(batch)
    visual = batch["input_ids"] == rt.image_token_id
    got = _tjs_feeds_loop(session, embeds, batch["attention_mask"], visual, rt._embed, steps=4)
    # the same loop on the bundle's own decoder (var_export.runtime's names)
    mask, past, pos, e, v = batch["attention_mask"], empty_past(rt.decoder, 1), None, embeds, visual
    pos = prefill_position_ids(mask)
    for step in range(4):
        logits, past = decode_step_numpy(rt.decoder, e, mask, pos, past, v)
        np.testing.assert_allclose(got[step], logits[:, -1], rtol=1e-5, atol=1e-5)
        e = rt._embed(logits[:, -1].argmax(-1)[:, None].astype(np.int64))
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        v = np.concatenate([v, np.zeros((1, 1), bool)], 1)
        pos = pos[:, -1:] + 1
    assert past["past_sink_mask"].any()  # the sink cache carried planted sinks through the loop


def test_layout_refuses_a_non_empty_out(tiny_var_bundle, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(ConfigError, match="has files"):
        write_transformers_js_layout(tiny_var_bundle["bundle"], tmp_path / "x")
    assert (tmp_path / "x" / "keep").read_text() == "mine"
