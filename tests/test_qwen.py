"""Qwen2.5-VL / Qwen2-VL end to end on the embedded tiny-qwen2.5-vl (issue 14).

* positions: the numpy ``get_rope_index`` port equals HF's, decode positions (rope_deltas) equal
  what HF ``generate`` uses (greedy tokens of the reference == HF generate, batch 2 left padded);
* the reference with VAR equals the released code's loops run inside the unmodified HF model;
* the vision graph equals HF's image features for grids other than the traced one;
* the VAR decoder graph equals the reference (prefill + 4 greedy steps, batch 2, left padding, two
  image sizes, every head mode) and VAR moves the logits;
* calibration finds the planted sink dims and heads; a bundle runs (`var-export run`).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from var_export.calibration import released_port
from var_export.calibration import tiny_qwen as tq
from var_export.calibration.reference import VarReference, multimodal_embeds, prompt_positions
from var_export.core.contract import DECODER, VISION_ENCODER
from var_export.core.settings import VarSettings
from var_export.families import family_of
from var_export.families.qwen import rope_index
from var_export.inputs import prepare_batch
from var_export.passes.pipeline import apply_var, load_model, save_model
from var_export.runtime import decode_step_numpy, empty_past

TOL = 1e-4
DECODE_STEPS = 4
PROMPTS = ["what is in the image ?", "describe the picture in detail . how many objects are there ?"]
SETTINGS = VarSettings(sink_dims=tq.TINY_SINK_DIMS, layers="2:", heads="dynamic")
HEADS = list(tq.PLANTED_IMAGE_CENTRIC_HEADS)


def decode_parity(model, sess, batch, ref, ort_past, steps: int = DECODE_STEPS) -> tuple[float, float]:
    """The ONNX decoder ``sess`` against the PyTorch ``ref`` over prefill + ``steps`` greedy decode
    steps (M-RoPE positions, rope deltas, fixed next tokens from the reference), starting from
    ``ort_past``: (max |Δlogits|, VAR's effect on the prefill logits). The sink masks must match
    exactly at every step and the planted sinks must be found."""
    with torch.no_grad():
        embeds = multimodal_embeds(model, batch["input_ids"], batch["pixel_values"],
                                   image_grid_thw=batch["image_grid_thw"])
        pos, deltas = prompt_positions(model, batch)
        assert tuple(pos.shape) == (3, *batch["input_ids"].shape)
        mask, visual, e, p = batch["attention_mask"], batch["visual_token_mask"], embeds, pos
        past, past_sink, b = None, None, int(mask.shape[0])
        worst = 0.0
        for step in range(steps + 1):
            out = ref.step(e, mask, p, past, visual, past_sink)
            logits, ort_past = decode_step_numpy(sess, e.numpy(), mask.numpy(), p.numpy(), ort_past, visual.numpy())
            worst = max(worst, float(np.abs(logits - out.logits.numpy()).max()))
            np.testing.assert_array_equal(ort_past["past_sink_mask"], out.present_sink_mask.numpy())
            if step == 0:
                assert out.present_sink_mask.any(), "planted sinks must be found"
            nxt = out.logits[:, -1].argmax(-1)
            past, past_sink = out.present, out.present_sink_mask
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
            visual = torch.cat([visual, torch.zeros(b, 1, dtype=torch.bool)], 1)
            p = torch.from_numpy(family_of(model).decode_positions(mask.numpy(), deltas))
            e = model.get_input_embeddings()(nxt[:, None])
        plain = VarReference(model, None).step(embeds, batch["attention_mask"], pos, None, batch["visual_token_mask"])
        first = ref.step(embeds, batch["attention_mask"], pos, None, batch["visual_token_mask"], None)
    return worst, float((plain.logits - first.logits).abs().max())


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _batch(loaded, sizes, seed=1):
    """Batch 2, left padded, one image per row of the given (H, W) sizes."""
    images = tq.synthetic_images(2, seed=seed, sizes=sizes)
    batch = prepare_batch(loaded.processor, images, PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left padded"
    return batch


@pytest.fixture(scope="module")
def batch(tiny_qwen_loaded):
    return _batch(tiny_qwen_loaded, ((64, 64), (48, 80)))


# ---------------------------------------------------------------------------------------------
# positions


def test_rope_index_and_decode_positions_match_hf(tiny_qwen_loaded, batch):
    model = tiny_qwen_loaded.model
    pos, deltas = rope_index(*(batch[k].numpy() for k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                          "image_grid_thw")))
    hf_pos, hf_deltas = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
    )
    np.testing.assert_array_equal(pos, hf_pos.numpy())
    np.testing.assert_array_equal(deltas, hf_deltas.numpy())
    assert (deltas < 0).all()
    # decode: HF compute_3d_position_ids with the cached rope deltas, after 3 generated tokens
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
    model.model.rope_deltas = hf_deltas
    try:
        hf_next = model.model.compute_3d_position_ids(
            input_ids=None, image_grid_thw=None, video_grid_thw=None, inputs_embeds=torch.zeros(2, 1, 4),
            attention_mask=mask, cache=_FakeCache(mask.shape[1] - 1),
        )
    finally:
        model.model.rope_deltas = None
    ours = family_of(model).decode_positions(mask.numpy(), deltas)  # (3, B, 1)
    np.testing.assert_array_equal(ours, hf_next[..., -1:].numpy())


class _FakeCache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def test_reference_generate_equals_hf_generate(tiny_qwen_loaded, batch):
    """Plain reference (VAR off) with our M-RoPE positions + rope_deltas == HF generate (greedy)."""
    model = tiny_qwen_loaded.model
    embeds = multimodal_embeds(model, batch["input_ids"], batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"])
    pos, deltas = prompt_positions(model, batch)
    ours = VarReference(model, None).generate(
        embeds, batch["attention_mask"], batch["visual_token_mask"], 6,
        position_ids=pos, rope_deltas=torch.as_tensor(deltas),
    )
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        hf = model.generate(**{k: batch[k] for k in keys}, max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours.numpy(), hf[:, batch["input_ids"].shape[1]:].numpy())


# ---------------------------------------------------------------------------------------------
# reference vs the released code's loops (batch 1, inside the unmodified HF model)


class _Port:
    """DimProspector at prefill, HeadFork + VAR in every layer's attention (released_port)."""

    def __init__(self, im: int, pa: int, s: VarSettings, num_layers: int) -> None:
        self.im, self.pa, self.s = im, pa, s
        self.layers = s.var_layers(num_layers)
        self.indices: dict[int, torch.Tensor] = {}
        self.prefill = True

    def pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self.prefill and layer in self.layers:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.indices[layer] = released_port.dim_prospector(hidden, self.s.sink_dims, self.s.tau)

        return hook

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        n_rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
        w = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask, -1,
                          dtype=torch.float32)
        if module.layer_idx in self.layers:
            sinks = self.indices.get(module.layer_idx, torch.zeros(0, dtype=torch.long))
            w = released_port.released_layer(w, sinks, self.im, self.pa, rho=self.s.rho, summ=self.s.summ,
                                              p=self.s.p, prefill=self.prefill)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def test_reference_equals_released_port(tiny_qwen_loaded):
    model = tiny_qwen_loaded.model
    one = prepare_batch(tiny_qwen_loaded.processor, tq.synthetic_images(1, seed=4, sizes=((48, 80),)), PROMPTS[1:])
    visual = one["visual_token_mask"]
    im, pa = int(visual[0].nonzero()[0]), int(visual.sum())
    embeds = multimodal_embeds(model, one["input_ids"], one["pixel_values"], image_grid_thw=one["image_grid_thw"])
    pos, deltas = prompt_positions(model, one)
    ref = VarReference(model, SETTINGS)
    out = ref.step(embeds, one["attention_mask"], pos, None, visual, None)
    ref_logits, tokens, mask, vis = [out.logits], [], one["attention_mask"], visual
    for _ in range(3):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        vis = torch.cat([vis, torch.zeros(1, 1, dtype=torch.bool)], 1)
        p = torch.from_numpy(family_of(model).decode_positions(mask.numpy(), deltas))
        out = ref.step(model.get_input_embeddings()(nxt), mask, p, out.present, vis, out.present_sink_mask)
        ref_logits.append(out.logits)

    port = _Port(im, pa, SETTINGS, tq.NUM_LAYERS)
    AttentionInterface.register("qwen_port", port.attention)
    AttentionMaskInterface.register("qwen_port", eager_mask)
    lm = model.model.language_model
    handles = [layer.register_forward_pre_hook(port.pre_hook(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "qwen_port"
    try:
        from transformers import DynamicCache

        with torch.no_grad():
            cache = DynamicCache(config=lm.config)
            keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            port_logits = [model(**{k: one[k] for k in keys}, cache=cache, use_cache=True).logits]
            port.prefill = False
            mask = one["attention_mask"]
            for nxt in tokens:  # HF's own decode positions (from the rope_deltas the model cached)
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
                emb = model.get_input_embeddings()(nxt)
                hf_pos = model.model.compute_3d_position_ids(
                    input_ids=None, image_grid_thw=None, video_grid_thw=None, inputs_embeds=emb,
                    attention_mask=mask, cache=cache,
                )[..., -1:]  # HF forward outside generate would use every row of the mask
                port_logits.append(model(input_ids=nxt, attention_mask=mask, position_ids=hf_pos, cache=cache,
                                         use_cache=True).logits)
    finally:
        lm.config._attn_implementation = old
        model.model.rope_deltas = None
        for h in handles:
            h.remove()
    assert sorted(port.indices) == [2, 3] and all(len(v) > 1 for v in port.indices.values())
    diffs = [float((a - b).abs().max()) for a, b in zip(ref_logits, port_logits)]
    off = VarReference(model, None).step(embeds, one["attention_mask"], pos, None, visual, None).logits
    assert float((off - ref_logits[0]).abs().max()) > 1e-2  # VAR did something
    assert max(diffs) < 1e-4, diffs


# ---------------------------------------------------------------------------------------------
# ONNX graphs vs HF / the reference


@pytest.mark.parametrize("sizes", [((64, 64), (48, 80)), ((32, 96), (80, 48))])
def test_vision_graph_any_grid(tiny_qwen_loaded, tiny_qwen_graphs, sizes):
    b = _batch(tiny_qwen_loaded, sizes, seed=2)
    sess = ort.InferenceSession(str(tiny_qwen_graphs.paths[VISION_ENCODER]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": b["pixel_values"].numpy(), "image_grid_thw": b["image_grid_thw"].numpy()})[0]
    with torch.no_grad():
        want = family_of(tiny_qwen_loaded.model).image_features(tiny_qwen_loaded.model, b).numpy()
    assert got.shape == want.shape == (int(b["visual_token_mask"].sum()), tq.HIDDEN_SIZE)
    diff = float(np.abs(got - want).max())
    print(f"\nvision graph vs HF, grids {b['image_grid_thw'].tolist()}: max |Δ| = {diff:.2e}")
    assert diff < TOL


@pytest.fixture(scope="module")
def var_decoders(tiny_qwen_graphs, tmp_path_factory):
    """mode -> path of the plain decoder with VAR baked in (dynamic, static, hybrid)."""
    out = {}
    for mode in ("dynamic", "static", "hybrid"):
        model = load_model(tiny_qwen_graphs.paths[DECODER])
        model, report = apply_var(model, SETTINGS.replace(heads=mode), None if mode == "dynamic" else HEADS,
                                  num_layers=tq.NUM_LAYERS)
        assert list(report.var_layers) == [2, 3]
        path = tmp_path_factory.mktemp(f"qwen-{mode}") / DECODER
        save_model(model, path)
        out[mode] = path
    return out


PARITY: dict[str, float] = {}


@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
def test_decoder_parity_all_modes(tiny_qwen_loaded, batch, var_decoders, mode, parity_results):
    model = tiny_qwen_loaded.model
    settings = SETTINGS.replace(heads=mode)
    ref = VarReference(model, settings, HEADS)
    sess = ort.InferenceSession(str(var_decoders[mode]), providers=["CPUExecutionProvider"])
    worst, effect = decode_parity(model, sess, batch, ref, empty_past(sess, 2))
    PARITY[mode] = worst
    parity_results[f"tiny-qwen2.5-vl/{mode}"] = worst
    parity_results[f"tiny-qwen2.5-vl/{mode} (VAR effect on logits)"] = effect
    print(f"\ntiny-qwen2.5-vl {mode}: max |Δlogits| ONNX vs reference = {worst:.2e}, VAR effect = {effect:.3f}")
    assert worst < TOL
    assert effect > 1e-2


# ---------------------------------------------------------------------------------------------
# calibration, bundle, run


def test_calibration_finds_planted_sinks_and_heads(tiny_qwen_loaded):
    from var_export.calibration.calibrate import calibrate

    samples = list(zip(tq.synthetic_images(4, seed=7), tq.DEFAULT_PROMPTS))
    cal = calibrate(tiny_qwen_loaded, samples, VarSettings(sink_dims=(0,)), head_threshold=0.5)
    assert tuple(cal["sink_dims"]) == tq.TINY_SINK_DIMS
    heads = {tuple(h) for h in cal["heads"]}
    assert set(tq.PLANTED_IMAGE_CENTRIC_HEADS) <= heads, cal["heads"]


@pytest.fixture(scope="module")
def qwen_bundle(tiny_qwen_bundle):
    """The session's hybrid bundle (conftest.tiny_qwen_bundle: SETTINGS with heads=hybrid, HEADS)."""
    return tiny_qwen_bundle


def test_runtime_matches_reference_and_generates(tiny_qwen_loaded, qwen_bundle, tmp_path):
    from var_export.cli import main
    from var_export.runtime import VarRuntime

    image = tq.synthetic_images(1, seed=5, sizes=((48, 80),))[0]
    rt = VarRuntime(qwen_bundle)
    logits = rt.prompt_logits(image, PROMPTS[0])  # (S, V): processor -> vision -> merge -> M-RoPE
    model = tiny_qwen_loaded.model
    one = prepare_batch(tiny_qwen_loaded.processor, [image], PROMPTS[:1])
    embeds = multimodal_embeds(model, one["input_ids"], one["pixel_values"], image_grid_thw=one["image_grid_thw"])
    pos, _ = prompt_positions(model, one)
    want = VarReference(model, SETTINGS.replace(heads="hybrid"), HEADS).step(
        embeds, one["attention_mask"], pos, None, one["visual_token_mask"]).logits[0]
    assert float(np.abs(logits - want.numpy()).max()) < TOL
    result = rt.generate(image, PROMPTS[0], max_new_tokens=5, stop_on_eos=False)
    assert len(result.token_ids) == 5 and result.var
    path = tmp_path / "img.png"
    image.save(path)
    rc = main(["run", str(qwen_bundle), "--image", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", "3"])
    assert rc in (0, None)
    manifest = json.loads((qwen_bundle / "manifest.json").read_text())
    assert manifest["family"] == "qwen2_5_vl" and manifest["io"][VISION_ENCODER]["inputs"] == ["pixel_values", "image_grid_thw"]


# ---------------------------------------------------------------------------------------------
# loading, presets, inspect


def test_local_dir_and_hub_ids(tiny_qwen_loaded, tmp_path, monkeypatch):
    """A save_pretrained directory (model + processor) loads; a hub id in the HF cache loads
    offline; a hub id that is not cached fails in seconds with what to do."""
    from var_export.core.errors import ModelLoadError
    from var_export.models import load_llava, resolve_model

    d = tmp_path / "qwen-local"
    tiny_qwen_loaded.model.save_pretrained(d)
    tiny_qwen_loaded.processor.save_pretrained(d)
    local = load_llava(str(d))
    assert type(local.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert local.processor.image_token == tq.IMAGE_TOKEN
    assert not hasattr(local.processor, "video_processor") or local.processor.video_processor is None
    b1 = prepare_batch(local.processor, tq.synthetic_images(1), PROMPTS[:1])
    b2 = prepare_batch(tiny_qwen_loaded.processor, tq.synthetic_images(1), PROMPTS[:1])
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["pixel_values"], b2["pixel_values"])

    spec = resolve_model("qwen2.5-vl")
    assert spec.kind == "hub" and spec.hf_id == "Qwen/Qwen2.5-VL-7B-Instruct" and spec.sink_dims is None
    assert resolve_model("Qwen/Qwen2-VL-7B-Instruct").preset["family"] == "qwen2_vl"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Qwen/Qwen2.5-VL-7B-Instruct.*hf download"):
        load_llava("qwen2.5-vl")


def test_inspect_draws_qwen(tiny_qwen_loaded, tmp_path):
    from var_export.inspect import inspect_model

    image = tq.synthetic_images(1, seed=3, sizes=((48, 80),))[0]
    cal_settings = SETTINGS
    from var_export.calibration.calibrate import calibrate

    cal = calibrate(tiny_qwen_loaded, [(image, PROMPTS[0])], cal_settings)
    result = inspect_model(tiny_qwen_loaded, image, PROMPTS[0], cal_settings, cal, tmp_path / "inspect")
    summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
    assert summary["grid"] == [3, 5]  # 48x80 pixels, 16-pixel image tokens
    assert result is not None
    # the picture under the sinks is the image itself (patches put back in place)
    from var_export.families.qwen import unpatchify

    one = prepare_batch(tiny_qwen_loaded.processor, [image], PROMPTS[:1])
    back = unpatchify(one["pixel_values"], one["image_grid_thw"], tiny_qwen_loaded.processor.image_processor)
    want = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    assert back.shape == (3, 48, 80) and float((back - want).abs().max()) < 1e-5


@pytest.mark.slow
def test_qwen2_vl_end_to_end(tmp_path):
    """Qwen2-VL (no window attention): vision graph for two grids and the dynamic VAR decoder."""
    from var_export.export import export_graphs
    from var_export.models import load_llava

    loaded = load_llava("tiny-qwen2-vl")
    graphs = export_graphs(loaded.model, tmp_path / "graphs")
    sess = ort.InferenceSession(str(graphs.paths[VISION_ENCODER]), providers=["CPUExecutionProvider"])
    for sizes in (((64, 64), (48, 80)), ((32, 96), (80, 48))):
        b = _batch(loaded, sizes, seed=2)
        got = sess.run(None, {"pixel_values": b["pixel_values"].numpy(), "image_grid_thw": b["image_grid_thw"].numpy()})[0]
        want = family_of(loaded.model).image_features(loaded.model, b).numpy()
        assert float(np.abs(got - want).max()) < TOL
    model_ir = load_model(graphs.paths[DECODER])
    model_ir, _ = apply_var(model_ir, SETTINGS, None, num_layers=tq.NUM_LAYERS)
    save_model(model_ir, tmp_path / "var.onnx")
    dec = ort.InferenceSession(str(tmp_path / "var.onnx"), providers=["CPUExecutionProvider"])
    b = _batch(loaded, ((64, 64), (48, 80)))
    embeds = multimodal_embeds(loaded.model, b["input_ids"], b["pixel_values"], image_grid_thw=b["image_grid_thw"])
    pos, _ = prompt_positions(loaded.model, b)
    want = VarReference(loaded.model, SETTINGS).step(embeds, b["attention_mask"], pos, None, b["visual_token_mask"])
    got, _ = decode_step_numpy(dec, embeds.numpy(), b["attention_mask"].numpy(), pos.numpy(), empty_past(dec, 2),
                               b["visual_token_mask"].numpy())
    assert float(np.abs(got - want.logits.numpy()).max()) < TOL
    if importlib.util.find_spec("tensorrt_rtx") is not None:  # the three graphs build (this export, no other)
        from tests.test_family_trt import SMALL
        from var_export import trt
        from var_export.bundle import write_bundle
        from var_export.models import model_fingerprint
        from var_export.pipeline import _family_facts, _token_facts

        bundle = write_bundle(tmp_path / "bundle", graphs={**graphs.paths, DECODER: tmp_path / "var.onnx"},
                              manifest_fields={"model_id": "tiny-qwen2-vl", "var": SETTINGS.to_dict(),
                                               "fingerprint": model_fingerprint(loaded.config),
                                               **_token_facts(loaded.config), **_family_facts(loaded.config)},
                              calibration=None, processor=loaded.processor)
        engines = trt.build_engines(bundle, tmp_path / "e.plan", SMALL)
        assert engines.manifest["engines"][VISION_ENCODER]["profiles"][0]["image_grid_thw"] == [[1, 3], [1, 3], [2, 3]]
        assert all(p.stat().st_size > 100_000 for p in engines.engines.values()) and len(engines.engines) == 3
