"""The baked graph does exactly what the PyTorch reference does (DESIGN.md §1, §3).

For tiny-llava and several small random LLaVA configs (hidden sizes, GQA and MHA, 3–4
layers) the exported decoder with VAR baked in is run with ONNX Runtime next to
``calibration.reference.VarReference`` on identical inputs: prefill + 4 greedy decode
steps feeding ``present.*`` and ``present_sink_mask`` back, batch 2 with left padding,
every head mode. Logits must agree to 1e-4, sink masks exactly, and VAR must move the
logits by far more than the tolerance (else the comparison would prove nothing).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from var_export.calibration.reference import VarReference
from var_export.core.settings import VarSettings
from var_export.export import embed_and_merge, export_decoder
from var_export.passes.pipeline import apply_var, load_model, save_model

TOL = 1e-4
DECODE_STEPS = 4


@dataclasses.dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs_embeds: torch.Tensor  # (B, S, D)
    attention_mask: torch.Tensor  # (B, S) int64, left padded
    visual: torch.Tensor  # (B, S) bool
    settings: VarSettings
    heads: list[tuple[int, int]]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _session(model_ir, path) -> ort.InferenceSession:
    save_model(model_ir, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_both(case: Case, sess: ort.InferenceSession, settings: VarSettings | None, heads):
    """Prefill + DECODE_STEPS greedy steps through ORT and the reference; returns per-step max |Δ|
    and the reference logits of every step (for the VAR-effect check)."""
    ref = VarReference(case.model, settings, heads)
    names = [i.name for i in sess.get_inputs()]
    n_layers = sum(1 for n in names if n.endswith(".key"))
    b = case.inputs_embeds.shape[0]
    mask = case.attention_mask.clone()
    visual = case.visual.clone()
    pos = _positions(mask)
    embeds = case.inputs_embeds
    past, past_sink = None, None
    kv = case.model.config.text_config if hasattr(case.model.config, "text_config") else case.model.config
    hd = getattr(kv, "head_dim", None) or kv.hidden_size // kv.num_attention_heads
    empty = np.zeros((b, kv.num_key_value_heads, 0, hd), np.float32)
    ort_past = {f"past_key_values.{i}.{w}": empty for i in range(n_layers) for w in ("key", "value")}
    sink_input = [i for i in sess.get_inputs() if i.name == "past_sink_mask"]
    ort_sink = np.zeros((b, sink_input[0].shape[1] if sink_input else 0, 0), bool)
    diffs, ref_logits = [], []
    embed = ref.decoder.get_input_embeddings()
    for _ in range(DECODE_STEPS + 1):
        out = ref.step(embeds, mask, pos, past, visual, past_sink)
        feeds = {
            "inputs_embeds": embeds.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": pos.numpy(),
            **ort_past,
        }
        if "visual_token_mask" in names:
            feeds["visual_token_mask"] = visual.numpy()
            feeds["past_sink_mask"] = ort_sink
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        diffs.append(float(np.abs(res["logits"] - out.logits.numpy()).max()))
        ref_logits.append(out.logits)
        if "present_sink_mask" in res:
            np.testing.assert_array_equal(res["present_sink_mask"], out.present_sink_mask.numpy())
            ort_sink = res["present_sink_mask"]
        ort_past = {
            f"past_key_values.{i}.{w}": res[f"present.{i}.{w}"] for i in range(n_layers) for w in ("key", "value")
        }
        nxt = out.logits[:, -1].argmax(-1)  # same token for both: inputs stay identical
        embeds = embed(nxt[:, None]).detach()
        mask = torch.cat([mask, mask.new_ones(b, 1)], -1)
        visual = torch.cat([visual, visual.new_zeros(b, 1)], -1)
        pos = pos[:, -1:] + 1
        past, past_sink = out.present, out.present_sink_mask
    return diffs, ref_logits


# ------------------------------------------------------------------------- cases


def _tiny_case(tiny_loaded) -> Case:
    from var_export.calibration.tiny_llava import (
        PLANTED_IMAGE_CENTRIC_HEADS,
        PLANTED_MIXED_HEADS,
        TINY_SINK_DIMS,
        synthetic_images,
    )
    from var_export.inputs import prepare_batch

    batch = prepare_batch(
        tiny_loaded.processor,
        synthetic_images(2, seed=7),
        ["Describe the red object in the image in detail please.", "What is it?"],
    )
    assert (batch["attention_mask"][1] == 0).any(), "the second prompt must be left padded"
    embeds = embed_and_merge(tiny_loaded.model, batch["input_ids"], batch["pixel_values"])
    return Case(
        "tiny-llava",
        tiny_loaded.model,
        embeds,
        batch["attention_mask"],
        batch["visual_token_mask"],
        VarSettings(sink_dims=TINY_SINK_DIMS),
        [tuple(h) for h in PLANTED_IMAGE_CENTRIC_HEADS + PLANTED_MIXED_HEADS],
    )


def _random_case(name, hidden, heads, kv_heads, layers, seed) -> Case:
    """A random small LLaVA decoder; sinks are planted as massive values in the embeddings of
    the first token and two visual tokens per sample (the residual stream carries them)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=120,
        max_position_embeddings=256,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=3))
    model.eval()
    rng = np.random.default_rng(seed)
    b, s, pad = 2, 24, 5
    embeds = torch.tensor(rng.normal(size=(b, s, hidden)), dtype=torch.float32)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[1, :pad] = 0
    visual = torch.zeros(b, s, dtype=torch.bool)
    sink_dims = (3, hidden - 5)
    for i, start in enumerate((0, pad)):
        visual[i, start + 2 : start + 14] = True  # a 12-token "image"
        for pos, dim in ((start, sink_dims[0]), (start + 4, sink_dims[1]), (start + 9, sink_dims[0])):
            embeds[i, pos, dim] = 80.0
    settings = VarSettings(sink_dims=sink_dims, tau=float(np.sqrt(hidden)) * 0.5, layers="2:")
    chosen = [(la, h) for la in range(2, layers) for h in range(heads) if (la + h) % 2 == 0]
    return Case(name, model, embeds, mask, visual, settings, chosen)


RANDOM_CASES = {
    "mha-h96-l3": dict(hidden=96, heads=4, kv_heads=4, layers=3, seed=1),
    "gqa-h128-l4": dict(hidden=128, heads=8, kv_heads=2, layers=4, seed=2),
    "gqa-h160-l3": dict(hidden=160, heads=5, kv_heads=1, layers=3, seed=3),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request, tiny_llava_graphs):
    """name -> (Case, plain decoder ir.Model); each model exported once."""
    cache: dict[str, tuple[Case, object]] = {}

    def get(name: str):
        if name not in cache:
            if name == "tiny-llava":  # the session's export of tiny-llava's decoder (conftest)
                case = _tiny_case(request.getfixturevalue("tiny_loaded"))
                path = tiny_llava_graphs["naive-novar"]
            else:
                case = _random_case(name, **RANDOM_CASES[name])
                path = tmp_path_factory.mktemp(name) / "decoder.onnx"
                export_decoder(case.model, path)
            cache[name] = (case, load_model(path))
        return cache[name]

    return get


_PLAIN_LOGITS: dict[str, list[torch.Tensor]] = {}


def _plain_logits(case: Case, plain, tmp_path, results: dict[str, float]) -> list[torch.Tensor]:
    if case.name not in _PLAIN_LOGITS:
        diffs, logits = _run_both(case, _session(plain, tmp_path / "plain.onnx"), None, None)
        assert max(diffs) < TOL
        results[f"{case.name}/no-var"] = max(diffs)
        _PLAIN_LOGITS[case.name] = logits
    return _PLAIN_LOGITS[case.name]


def _random(*names: str) -> list:
    """The random cases use no shared export: under xdist each case (its one export) is a group of
    its own, free to run beside tiny-llava's group."""
    return [pytest.param(name, marks=pytest.mark.xdist_group(f"parity-{name}")) for name in names]


@pytest.mark.parametrize("mode", ["dynamic", "static", "hybrid"])
@pytest.mark.parametrize("name", ["tiny-llava", *_random(*RANDOM_CASES)])
def test_var_graph_equals_reference(exported, tmp_path, name, mode, parity_results):
    case, plain = exported(name)
    settings = dataclasses.replace(case.settings, heads=mode)
    heads = None if mode == "dynamic" else case.heads
    model, report = apply_var(plain, settings, heads)
    sess = _session(model, tmp_path / "var.onnx")
    diffs, var_logits = _run_both(case, sess, settings, heads)
    parity_results[f"{name}/{mode}"] = max(diffs)
    assert max(diffs) < TOL, f"{name}/{mode}: per-step max |Δlogits| {diffs}"
    # VAR must visibly change the model: compare with the plain graph run by the reference
    plain_logits = _plain_logits(case, plain, tmp_path, parity_results)
    effect = max(float((a - b).abs().max()) for a, b in zip(var_logits, plain_logits))
    parity_results[f"{name}/{mode} (VAR effect on logits)"] = effect
    assert effect > 100 * TOL, f"{name}/{mode}: VAR changed logits by only {effect:.2e}"
    assert report.var_layers == settings.var_layers(report.num_layers)


@pytest.mark.parametrize("name", ["tiny-llava", *_random("gqa-h128-l4")])
def test_plain_graph_equals_hf_and_var_off_graph_is_plain(exported, tmp_path, name, parity_results):
    """No VAR: the exported graph equals the reference with VAR off (itself bit-equal to HF eager);
    a VAR graph fed an all-False visual mask computes the plain decoder."""
    case, plain = exported(name)
    _plain_logits(case, plain, tmp_path, parity_results)
    settings = dataclasses.replace(case.settings, heads="dynamic")
    model, _ = apply_var(plain, settings, None)
    off = dataclasses.replace(case, visual=torch.zeros_like(case.visual))
    diffs_off, off_logits = _run_both(off, _session(model, tmp_path / "var.onnx"), settings, None)
    parity_results[f"{name}/var-graph-visual-off-vs-reference"] = max(diffs_off)
    assert max(diffs_off) < TOL
    # with no visual token VAR is the identity: bit-equal to the plain reference (same inputs)
    plain_logits = _PLAIN_LOGITS[case.name]
    assert all(torch.equal(a, b) for a, b in zip(off_logits, plain_logits))
