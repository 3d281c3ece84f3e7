"""ONNX Runtime generation from a bundle (var_export.runtime, `var-export run`) against torch."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from var_export import runtime as rt
from var_export.calibration.tiny_llava import (
    PLANTED_IMAGE_CENTRIC_HEADS,
    PLANTED_MIXED_HEADS,
    TINY_SINK_DIMS,
)
from var_export.cli import main
from var_export.core.errors import BundleError, ConfigError, DataError

PROMPT = "What is in the picture?"
HEADS = sorted(PLANTED_IMAGE_CENTRIC_HEADS + PLANTED_MIXED_HEADS)


def _settings():
    from var_export.core.settings import VarSettings

    return VarSettings(sink_dims=TINY_SINK_DIMS, heads="hybrid", layers="2:")


@pytest.fixture(scope="module")
def tiny(tiny_bundles):
    return tiny_bundles


def _hf_greedy(tiny, prompt_text: str, max_new_tokens: int) -> list[int]:
    from PIL import Image

    proc = tiny["processor"]
    batch = proc(images=[Image.open(tiny["image"]).convert("RGB")], text=[prompt_text], return_tensors="pt")
    with torch.no_grad():
        out = tiny["model"].generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def test_generation_equals_hf_greedy_with_var_off(tiny):
    text = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    expected = _hf_greedy(tiny, text, 12)
    assert len(expected) >= 2
    off = rt.VarRuntime(tiny["var"], var=False).generate(tiny["image"], text, max_new_tokens=12)
    plain = rt.VarRuntime(tiny["plain"]).generate(tiny["image"], text, max_new_tokens=12)
    assert off.token_ids == expected
    assert plain.token_ids == expected
    assert not off.var and not plain.var
    assert off.text == tiny["processor"].tokenizer.decode(expected, skip_special_tokens=True)
    assert set(off.timings) >= {"vision", "prefill", "decode", "total", "tokens_per_s"}


def test_var_on_equals_the_torch_reference(tiny):
    from var_export.calibration.reference import VarReference
    from var_export.export import embed_and_merge

    runtime = rt.VarRuntime(tiny["var"], var=True)
    res = runtime.generate(tiny["image"], PROMPT, max_new_tokens=8, stop_on_eos=False)
    assert res.var and len(res.token_ids) == 8
    batch = runtime.prepare(tiny["image"], PROMPT)
    ids = torch.from_numpy(batch["input_ids"])
    with torch.no_grad():
        embeds = embed_and_merge(tiny["model"], ids, torch.from_numpy(batch["pixel_values"]))
        ref = VarReference(tiny["model"], _settings(), HEADS).generate(
            embeds, torch.from_numpy(batch["attention_mask"]), ids == runtime.image_token_id, 8
        )
    assert res.token_ids == ref[0].tolist()
    # The tokens may not move on this tiny prompt: compare the VAR prefill numerically too.
    embeds_np, _ = runtime.prompt_embeds(batch)
    np.testing.assert_allclose(embeds_np, embeds.numpy(), atol=1e-5, rtol=1e-5)
    pos = rt.prefill_position_ids(batch["attention_mask"])
    visual = batch["input_ids"] == runtime.image_token_id
    logits, present = rt.decode_step_numpy(
        runtime.decoder, embeds_np, batch["attention_mask"], pos, rt.empty_past(runtime.decoder, 1), visual
    )
    with torch.no_grad():
        step = VarReference(tiny["model"], _settings(), HEADS).step(
            embeds, torch.from_numpy(batch["attention_mask"]), torch.from_numpy(pos), None,
            torch.from_numpy(visual), None,
        )
    np.testing.assert_allclose(logits, step.logits.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(present[rt.PAST_SINK_MASK], step.present_sink_mask.numpy())


def test_var_changes_logits_and_all_false_mask_is_the_plain_decoder(tiny):
    var_rt = rt.VarRuntime(tiny["var"])
    plain_rt = rt.VarRuntime(tiny["plain"])
    batch = var_rt.prepare(tiny["image"], PROMPT)
    embeds, _ = var_rt.prompt_embeds(batch)
    pos = rt.prefill_position_ids(batch["attention_mask"])
    visual = batch["input_ids"] == var_rt.image_token_id

    def prefill(r, mask):
        return rt.decode_step_numpy(r.decoder, embeds, batch["attention_mask"], pos, rt.empty_past(r.decoder, 1), mask)

    on, present = prefill(var_rt, visual)
    off, _ = prefill(var_rt, None)
    plain, _ = prefill(plain_rt, None)
    np.testing.assert_allclose(off, plain, atol=1e-5, rtol=1e-5)
    assert np.abs(on - off).max() > 1e-3  # VAR does something on this image
    lv = len(tiny_var_layers(tiny))
    assert present[rt.PAST_SINK_MASK].shape == (1, lv, embeds.shape[1])
    assert present[rt.PAST_SINK_MASK].any()  # tiny-llava has planted sinks


def tiny_var_layers(tiny) -> list[int]:
    from var_export.bundle import load_bundle

    return load_bundle(tiny["var"], verify=False).var_layers


def test_batched_left_padded_decode_equals_single_rows(tiny):
    runtime = rt.VarRuntime(tiny["var"], var=True)
    tok = runtime.tokenizer
    rows = [runtime.prepare(tiny["image"], p) for p in (PROMPT, "Describe the red square and the picture in words.")]
    embeds = [runtime.prompt_embeds(r)[0] for r in rows]
    singles = [
        rt.greedy_decode_numpy(
            runtime.decoder, runtime._embed, e, r["attention_mask"], 6,
            visual_token_mask=r["input_ids"] == runtime.image_token_id,
        ).tokens[0].tolist()
        for e, r in zip(embeds, rows)
    ]
    s = max(e.shape[1] for e in embeds)
    assert s > min(e.shape[1] for e in embeds)  # there is padding to do
    b_embeds = np.zeros((2, s, embeds[0].shape[2]), embeds[0].dtype)
    b_mask = np.zeros((2, s), np.int64)
    b_visual = np.zeros((2, s), bool)
    for i, (e, r) in enumerate(zip(embeds, rows)):
        n = e.shape[1]
        b_embeds[i, s - n :] = e[0]
        b_embeds[i, : s - n] = runtime._embed(np.full((1, s - n), tok.pad_token_id))[0] if s > n else 0
        b_mask[i, s - n :] = 1
        b_visual[i, s - n :] = r["input_ids"][0] == runtime.image_token_id
    batched = rt.greedy_decode_numpy(
        runtime.decoder, runtime._embed, b_embeds, b_mask, 6, visual_token_mask=b_visual
    )
    assert batched.tokens.tolist() == singles


def test_stream_and_prompt_without_image_token(tiny):
    runtime = rt.VarRuntime(tiny["var"])
    pieces: list[str] = []
    res = runtime.generate(tiny["image"], PROMPT, max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == res.text and res.text
    # The runtime inserts the image with the processor's chat template: same as writing it out.
    explicit = runtime.generate(tiny["image"], f"USER: <image>\n{PROMPT} ASSISTANT:", max_new_tokens=10)
    assert explicit.token_ids == res.token_ids
    assert res.prompt_tokens == explicit.prompt_tokens > 64


def test_cli_run_streams_text(tiny, capsys):
    ref = rt.VarRuntime(tiny["var"]).generate(tiny["image"], PROMPT, max_new_tokens=6)
    code = main(["-q", "run", str(tiny["var"]), "--image", str(tiny["image"]), "--prompt", PROMPT, "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip() == ref.text.strip()
    off = rt.VarRuntime(tiny["var"], var=False).generate(tiny["image"], PROMPT, max_new_tokens=6)
    code = main(["-q", "run", str(tiny["var"]), "--image", str(tiny["image"]), "--prompt", PROMPT, "--max-new-tokens", "6", "--no-var"])
    assert code == 0 and capsys.readouterr().out.strip() == off.text.strip()


def _run(tiny, bundle, image, prompt, *extra):
    return main(["-q", "run", str(bundle), "--image", str(image), "--prompt", prompt, *extra])


def test_run_errors_exit_non_zero_with_clear_messages(tiny, capsys):
    tmp = tiny["tmp"]
    # missing bundle file: a hard-linked copy of the bundle without the decoder
    broken = tmp / "broken_bundle"
    if not broken.exists():
        shutil.copytree(tiny["var"], broken, copy_function=os.link)
        (broken / "decoder_model_merged.onnx").unlink()
    assert _run(tiny, broken, tiny["image"], PROMPT) == BundleError.exit_code
    assert "missing decoder_model_merged.onnx" in capsys.readouterr().err.replace("\n", "")

    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    assert _run(tiny, tiny["var"], corrupt, PROMPT) == DataError.exit_code
    err = capsys.readouterr().err.replace("\n", "")
    assert "DataError" in err and "corrupt" in err

    assert _run(tiny, tiny["var"], tmp / "nope.png", PROMPT) == DataError.exit_code
    assert "expected an image file" in capsys.readouterr().err.replace("\n", "")

    assert _run(tiny, tiny["var"], tiny["image"], "<image> and <image> again") == DataError.exit_code
    assert "at most one" in capsys.readouterr().err.replace("\n", "")

    long_prompt = " ".join(["red"] * 600)
    assert _run(tiny, tiny["var"], tiny["image"], long_prompt) == DataError.exit_code
    err = capsys.readouterr().err.replace("\n", "")
    assert "at most 512 positions" in err and "Shorten the prompt" in err

    assert _run(tiny, tiny["var"], tiny["image"], PROMPT, "--provider", "cuda") == ConfigError.exit_code
    assert "CUDAExecutionProvider" in capsys.readouterr().err.replace("\n", "")

    assert not (tmp / "bundle_that_is_not_there").exists()
    assert _run(tiny, tmp / "bundle_that_is_not_there", tiny["image"], PROMPT) == BundleError.exit_code


def test_max_new_tokens_is_capped_to_the_position_limit(tiny, caplog):
    runtime = rt.VarRuntime(tiny["plain"])
    runtime.max_positions = runtime.prepare(tiny["image"], PROMPT)["input_ids"].shape[1] + 3
    res = runtime.generate(tiny["image"], PROMPT, max_new_tokens=20, stop_on_eos=False)
    assert len(res.token_ids) == 3
    assert "generating at most 3" in caplog.text

