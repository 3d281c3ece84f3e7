"""``rewrite_decoder`` on a Qwen2.5-VL text decoder exported by onnxruntime-genai's model builder.

onnxruntime-genai 0.18.0 (the ``foreign`` extra) builds Qwen2.5-VL's text decoder
(``Qwen25VLTextModel``): ``com.microsoft::MRotaryEmbedding`` for M-RoPE on q and k (position_ids
[3, B, S]), ``GroupQueryAttention`` with ``do_rotary=0``, ``SkipSimplifiedLayerNormalization``;
with ``exclude_embeds=true`` it takes ``inputs_embeds`` (what genai's own Qwen2.5-VL pipeline
runs, the vision and embedding models apart). The builder runs here as a user runs it, offline,
on the embedded tiny-qwen2.5-vl (the graph is 57 MB, too large to commit as a fixture).

Then ``var-export rewrite`` (all head modes), and prefill + 4 greedy decode steps, batch 2 with
two images of different sizes (16 and 15 image tokens: different M-RoPE positions and rope
deltas per row; real image features in ``inputs_embeds``), against ``VarReference`` on the same
torch model. The rows are not padded: genai's CPU ``GroupQueryAttention`` reads ``seqlens_k`` as
a right-padded length and does not follow HF left padding (the graph as genai wrote it, before
any rewrite, is off by 3.4 in the logits of a left-padded row; exact on unpadded rows), as
tests/test_rewrite_foreign_forms.py found for genai's LLaMA graph; the prompts are chosen so that
both rows are 29 tokens long.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from tests.test_qwen import decode_parity
from var_export.calibration import tiny_qwen as tq
from var_export.calibration.reference import VarReference
from var_export.core.settings import VarSettings
from var_export.inputs import prepare_batch
from var_export.rewrite import rewrite_decoder

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the foreign extra) is not installed")

TOL = 1e-4
DECODE_STEPS = 4
SETTINGS = VarSettings(sink_dims=tq.TINY_SINK_DIMS, layers="2:", heads="dynamic")
HEADS = list(tq.PLANTED_IMAGE_CENTRIC_HEADS)
PROMPTS = ["what is in the image ?", "what is in the image ? ?"]  # 29 tokens each with these images


@pytest.fixture(scope="module")
def genai_decoder(tmp_path_factory):
    """genai's fp32 CPU export of tiny-qwen2.5-vl's text decoder (inputs_embeds form)."""
    from var_export.calibration.tiny_qwen import tiny_qwen_dir

    tmp = tmp_path_factory.mktemp("genai-qwen")
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_qwen_dir()), "-o", str(tmp / "out"),
         "-p", "fp32", "-e", "cpu", "-c", str(tmp / "cache"), "--extra_options", "exclude_embeds=true"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_offline_env(),
    )
    return tmp / "out" / "model.onnx"


def _offline_env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_genai_graph_form(genai_decoder):
    """What the builder wrote: the foreign form this test is about (else it tests nothing new)."""
    import onnx

    proto = onnx.load(str(genai_decoder), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert {("com.microsoft", "MRotaryEmbedding"), ("com.microsoft", "GroupQueryAttention")} <= ops
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs["position_ids"] == [3, "batch_size", "sequence_length"] and "inputs_embeds" in inputs


@pytest.mark.parametrize(("mode", "formulation"), [
    ("dynamic", "naive"), ("static", "naive"), ("hybrid", "naive"), ("dynamic", "fused-qk"), ("hybrid", "fused-qk"),
])
def test_rewrite_genai_qwen_decoder_matches_the_reference(tiny_qwen_loaded, genai_decoder, tmp_path, mode,
                                                          formulation):
    """naive: GQA unfused into eager ops; fused-qk: GQA (do_rotary=0, MRotaryEmbedding left as
    it is) -> one ONNX Attention per VAR layer, then the fused formulation."""
    model = tiny_qwen_loaded.model
    settings = SETTINGS.replace(heads=mode)
    heads = None if mode == "dynamic" else HEADS
    result = rewrite_decoder(genai_decoder, tmp_path / "var" / "model.onnx", settings, heads=heads,
                             formulation=formulation)
    assert result.formulation == formulation
    assert list(result.report.var_layers) == [2, 3]
    assert result.added_inputs == ["visual_token_mask", "past_sink_mask"]
    sess = ort.InferenceSession(str(result.out_path), providers=["CPUExecutionProvider"])

    images = tq.synthetic_images(2, seed=1, sizes=((64, 64), (48, 80)))
    batch = prepare_batch(tiny_qwen_loaded.processor, images, PROMPTS)
    assert bool((batch["attention_mask"] == 1).all()), "genai's GQA needs unpadded rows (module doc)"
    grids = batch["image_grid_thw"].tolist()
    assert grids[0] != grids[1]
    ort_past = {f"past_key_values.{i}.{k}": np.zeros((2, tq.NUM_KV_HEADS, 0, tq.HEAD_DIM), np.float32)
                for i in range(tq.NUM_LAYERS) for k in ("key", "value")}  # genai: head size symbolic
    ort_past["past_sink_mask"] = np.zeros((2, 2, 0), np.bool_)
    worst, effect = decode_parity(model, sess, batch, VarReference(model, settings, heads), ort_past)
    print(f"\ngenai Qwen2.5-VL text decoder + rewrite ({mode}, {formulation}): max |Δlogits| vs reference = {worst:.2e}, "
          f"VAR effect = {effect:.3f}")
    assert worst < TOL
    assert effect > 1e-2
