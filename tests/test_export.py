"""Export of the three graphs (DESIGN.md §3) against HF torch eager, run with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from var_export.core.errors import ConfigError, ModelLoadError
from var_export.export import (
    DECODER,
    EMBED_TOKENS,
    VISION_ENCODER,
    decoder_io_names,
    embed_and_merge,
    export_decoder,
    export_embed_tokens,
    export_graphs,
    merge_image_features,
)

IMAGE_TOKEN = 250
NUM_LAYERS = 3
KV_HEADS, HEAD_DIM = 2, 16
N_PATCHES = 16  # (32 / 8)^2, CLS dropped by the "default" strategy
TOL = 1e-4


def small_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A random LLaVA: LLaMA text model with GQA (4 query heads, 2 KV heads), small CLIP tower."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        attn_implementation="eager",
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # make logits less flat than the default init so argmax is meaningful
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="session")  # session: tests using only the model are xdist units of their own
def model() -> LlavaForConditionalGeneration:
    return small_llava()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    events: list[tuple[str, int, int]] = []
    result = export_graphs(model, out, progress=lambda *e: events.append(e))
    return result, events


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prompt_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 2, S=26: sample 0 unpadded, sample 1 left-padded by 4; one image each."""
    batch, seq, pad = 2, 26, 4
    input_ids = torch.randint(0, IMAGE_TOKEN - 10, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    input_ids[0, 2 : 2 + N_PATCHES] = IMAGE_TOKEN
    attention_mask[1, :pad] = 0
    input_ids[1, :pad] = 0
    input_ids[1, pad + 1 : pad + 1 + N_PATCHES] = IMAGE_TOKEN
    return input_ids, attention_mask, torch.randn(batch, 3, 32, 32, generator=generator)


def test_decoder_io_names():
    inputs, outputs = decoder_io_names(2)
    assert inputs == [
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert outputs == [
        "logits",
        "present.0.key",
        "present.0.value",
        "present.1.key",
        "present.1.value",
    ]


def test_graph_io_and_axes(exported):
    result, events = exported
    assert set(result.paths) == {VISION_ENCODER, EMBED_TOKENS, DECODER}
    assert [e for e in events if e[1] == e[2]] == [(DECODER, 3, 3)]
    m = onnx.load(str(result.decoder))
    names_in, names_out = decoder_io_names(NUM_LAYERS)
    assert [i.name for i in m.graph.input] == names_in
    assert [o.name for o in m.graph.output] == names_out

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in list(m.graph.input) + list(m.graph.output)}
    assert dims(by_name["inputs_embeds"]) == ["batch", "sequence", 64]
    assert dims(by_name["attention_mask"]) == ["batch", "total_sequence"]
    assert dims(by_name["past_key_values.0.key"]) == ["batch", KV_HEADS, "past_sequence", HEAD_DIM]
    assert dims(by_name["present.2.value"]) == ["batch", KV_HEADS, "total_sequence", HEAD_DIM]
    assert dims(by_name["logits"]) == ["batch", "sequence", 256]
    # Eager attention: every layer has Softmax feeding MatMul directly (fp32).
    softmax = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == NUM_LAYERS
    consumers = {n.op_type for n in m.graph.node for s in softmax if s.output[0] in n.input}
    assert consumers == {"MatMul"}
    assert m.opset_import[0].version == 18


def test_vision_and_embed_match_torch(model, exported):
    result, _ = exported
    g = torch.Generator().manual_seed(1)
    input_ids, _, pixel_values = _prompt_batch(g)
    feats = _session(result.vision_encoder).run(None, {"pixel_values": pixel_values.numpy()})[0]
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    ref_feats = torch.stack(list(ref.pooler_output)).numpy()
    assert feats.shape == (2, N_PATCHES, 64)
    assert np.abs(feats - ref_feats).max() < TOL

    embeds = _session(result.embed_tokens).run(None, {"input_ids": input_ids.numpy()})[0]
    merged = merge_image_features(embeds, feats, input_ids.numpy(), IMAGE_TOKEN)
    ref_merged = embed_and_merge(model, input_ids, pixel_values).numpy()
    assert np.abs(merged - ref_merged).max() < TOL
    # the image rows really were replaced, sample by sample
    assert np.abs(merged[1, 5] - feats[1, 0]).max() < TOL


def test_merge_count_mismatch_is_clear():
    ids = np.array([[IMAGE_TOKEN, 1, IMAGE_TOKEN]])
    with pytest.raises(ConfigError, match="2 image tokens but the images give 3"):
        merge_image_features(
            np.zeros((1, 3, 4), np.float32), np.zeros((1, 3, 4), np.float32), ids, IMAGE_TOKEN
        )


def test_decoder_prefill_and_decode_match_hf(model, exported):
    """ORT pipeline (vision -> embed -> merge -> decoder, present fed back) == HF torch eager."""
    result, _ = exported
    vision, embed, decoder = (
        _session(result.paths[n]) for n in (VISION_ENCODER, EMBED_TOKENS, DECODER)
    )
    g = torch.Generator().manual_seed(2)
    input_ids, attention_mask, pixel_values = _prompt_batch(g)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    feats = vision.run(None, {"pixel_values": pixel_values.numpy()})[0]
    embeds = embed.run(None, {"input_ids": input_ids.numpy()})[0]
    feed = {
        "inputs_embeds": merge_image_features(embeds, feats, input_ids.numpy(), IMAGE_TOKEN),
        "attention_mask": attention_mask.numpy(),
        "position_ids": position_ids.numpy(),
    }
    empty = np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32)  # P = 0 at prefill
    for i in range(NUM_LAYERS):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
    _, out_names = decoder_io_names(NUM_LAYERS)

    with torch.no_grad():
        hf = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
        )
    got = dict(zip(out_names, decoder.run(out_names, feed)))
    diffs = [float(np.abs(got["logits"] - hf.logits.numpy()).max())]
    assert got["present.0.key"].shape == (2, KV_HEADS, 26, HEAD_DIM)

    cache = hf.cache
    for _ in range(3):
        next_ids = hf.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy
        assert np.array_equal(got["logits"][:, -1].argmax(-1), next_ids[:, 0].numpy())
        attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        with torch.no_grad():
            hf = model(
                input_ids=next_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        cache = hf.cache
        feed = {
            "inputs_embeds": embed.run(None, {"input_ids": next_ids.numpy()})[0],
            "attention_mask": attention_mask.numpy(),
            "position_ids": position_ids.numpy(),
        }
        for i in range(NUM_LAYERS):
            feed[f"past_key_values.{i}.key"] = got[f"present.{i}.key"]
            feed[f"past_key_values.{i}.value"] = got[f"present.{i}.value"]
        got = dict(zip(out_names, decoder.run(out_names, feed)))
        diffs.append(float(np.abs(got["logits"] - hf.logits.numpy()).max()))
    assert got["present.2.value"].shape == (2, KV_HEADS, 29, HEAD_DIM)
    assert max(diffs) < TOL, diffs
    assert float(np.abs(hf.logits.numpy()).std()) > 1e3 * TOL  # the tolerance is not trivially met


def test_fp16_decoder_keeps_fp32_softmax(tmp_path):
    """fp16 export of an sdpa-configured model: eager attention is forced for the export only."""
    model = small_llava()
    model.set_attn_implementation("sdpa")
    path = tmp_path / DECODER
    data, seconds = export_decoder(model, path, dtype="fp16")
    assert data == [] and seconds > 0
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    m = onnx.load(str(path))
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert m.graph.input[0].type.tensor_type.elem_type == f16
    producers = {o: n for n in m.graph.node for o in n.output}
    softmax = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == NUM_LAYERS
    for s in softmax:  # Cast(fp32) -> Softmax -> Cast(fp16) -> MatMul
        cast_in = producers[s.input[0]]
        assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == f32
        (cast_out,) = [n for n in m.graph.node if s.output[0] in n.input]
        assert cast_out.op_type == "Cast" and cast_out.attribute[0].i == f16
        assert {n.op_type for n in m.graph.node if cast_out.output[0] in n.input} == {"MatMul"}

    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 7, 64, generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    pos = torch.arange(7).expand(2, 7)
    feed = {
        "inputs_embeds": embeds.half().numpy(),
        "attention_mask": mask.numpy(),
        "position_ids": pos.numpy(),
    }
    for i in range(NUM_LAYERS):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float16)
    logits = _session(path).run(["logits"], feed)[0]
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos
        )
        ref = model.lm_head(hidden.last_hidden_state).numpy()
    assert logits.dtype == np.float16
    assert np.abs(logits.astype(np.float32) - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())


def test_fused_decoder_has_attention_ops_and_matches_hf(model, tmp_path):
    """fused=True: SDPA attention -> one ONNX Attention per layer at opset 23; eager restored."""
    path = tmp_path / DECODER
    with pytest.raises(ConfigError, match="opset >= 23"):
        export_decoder(model, path, opset=18, fused=True)
    export_decoder(model, path, fused=True)
    assert model.config.get_text_config()._attn_implementation == "eager"
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Attention") == NUM_LAYERS and "Softmax" not in ops
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {23}

    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 7, 64, generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[0, :2] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    feed = {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i in range(NUM_LAYERS):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32)
    logits = _session(path).run(["logits"], feed)[0]
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        ref = model.lm_head(hidden.last_hidden_state).numpy()
    rows = mask.bool().numpy()  # a fully masked query row is undefined
    assert np.abs(logits - ref)[rows].max() < TOL


def test_external_data_forced(model, tmp_path):
    path = tmp_path / EMBED_TOKENS
    data, _ = export_embed_tokens(model, path, external_data=True)
    assert data and all(p.exists() and p.parent == tmp_path for p in data)
    ids = np.array([[1, 2, 3]], np.int64)
    out = _session(path).run(None, {"input_ids": ids})[0]
    assert (
        np.abs(out - model.get_input_embeddings()(torch.from_numpy(ids)).detach().numpy()).max()
        < TOL
    )


def test_rejects_non_llava_and_bad_dtype(model, tmp_path):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(model.config.text_config)
    with pytest.raises(ModelLoadError, match="model family handles model_type=.llama."):
        export_graphs(llama, tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        export_graphs(model, tmp_path, dtype="bf16")


def test_exported_graphs_make_a_bundle(model, exported, tmp_path):
    from var_export.bundle import load_bundle, write_bundle

    result, _ = exported
    out = write_bundle(
        tmp_path / "bundle",
        graphs=result.paths,
        manifest_fields={"model_id": "test/small-llava", "fingerprint": "f", "var": None},
        calibration=None,
    )
    bundle = load_bundle(out)
    names_in, names_out = decoder_io_names(NUM_LAYERS)
    assert bundle.io(DECODER) == {"inputs": names_in, "outputs": names_out}
    assert bundle.manifest["opset"] == 18
    assert [i.name for i in _session(bundle.decoder).get_inputs()] == names_in
