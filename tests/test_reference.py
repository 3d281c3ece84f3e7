"""The PyTorch VAR reference: exactness with VAR off, batching, sink state, head modes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AttentionInterface,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from var_export.calibration.reference import (
    ATTN_IMPLEMENTATION,
    VarReference,
    eligible_rows,
    multimodal_embeds,
    redistribute,
    sink_flags,
)
from var_export.core.errors import ConfigError
from var_export.core.settings import VarSettings

SINK_DIMS = (5, 17)
HIDDEN = 64


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    return model


def planted_embeds(b: int, s: int, sinks: list[int], seed: int = 1) -> torch.Tensor:
    """Random embeddings with massive values in SINK_DIMS at positions ``sinks`` (all samples)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, HIDDEN, generator=g)
    for pos in sinks:
        x[:, pos, list(SINK_DIMS)] = 300.0
    return x


def settings(**kw) -> VarSettings:
    base = dict(sink_dims=SINK_DIMS, tau=4.0, rho=0.5, summ=0.2, p=0.6, layers="2:", heads="dynamic")
    base.update(kw)
    return VarSettings(**base)


def visual_mask(b: int, t: int, start: int, n: int) -> torch.Tensor:
    v = torch.zeros(b, t, dtype=torch.bool)
    v[:, start : start + n] = True
    return v


def positions(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


# sequence used below: BOS sink at 0, text 1, image 2..9 (sinks at 3 and 7), text 10..13
S = 14
SINKS = [0, 3, 7]


def test_var_off_equals_hf_eager_exactly_prefill_and_decode():
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS)
    mask = torch.ones(1, S, dtype=torch.long)
    pos = positions(mask)
    x1 = torch.randn(1, 1, HIDDEN)
    mask1 = torch.ones(1, S + 1, dtype=torch.long)
    for ref in (VarReference(model, None), VarReference(model, settings())):
        hf = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        vis = torch.zeros(1, S, dtype=torch.bool)  # all-False visual mask: VAR cannot touch a row
        out = ref.step(x, mask, pos, None, vis, None)
        assert torch.equal(out.logits, hf.logits)
        # one decode step from the reference's own cache (HF's cache grows in place)
        hf1 = model(inputs_embeds=x1, attention_mask=mask1, position_ids=pos[:, -1:] + 1, cache=hf.cache)
        out1 = ref.step(x1, mask1, pos[:, -1:] + 1, out.present,
                        torch.zeros(1, S + 1, dtype=torch.bool), out.present_sink_mask)
        assert torch.equal(out1.logits, hf1.logits)
    assert model.config._attn_implementation == "eager"  # the model is left as it was


def test_custom_attention_needs_a_mask_function():
    """Without a mask function for its name, transformers 5 gives a custom attention no mask."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    seen: dict[str, object] = {}

    def spy(module, q, k, v, mask, scaling, dropout=0.0, **kw):
        seen["mask"] = mask
        return eager_attention_forward(module, q, k, v, mask, scaling, dropout, **kw)

    AttentionInterface.register("var_test_spy_nomask", spy)
    model = tiny_llama(layers=1)
    x = torch.randn(1, 5, HIDDEN)
    model.config._attn_implementation = "var_test_spy_nomask"
    model(inputs_embeds=x)
    assert seen["mask"] is None  # the pitfall
    model.config._attn_implementation = "eager"
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    # and ours is causal: the first logits do not depend on later tokens
    ref = VarReference(model, None)
    mask = torch.ones(1, 5, dtype=torch.long)
    a = ref.step(x, mask, positions(mask)).logits
    x2 = x.clone()
    x2[:, 3:] += 1.0
    b = ref.step(x2, mask, positions(mask)).logits
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.equal(a[:, 3:], b[:, 3:])


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=16, patch_size=8, projection_dim=32,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63,
                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    return model


def test_llava_var_off_equals_hf_eager_exactly():
    model = tiny_llava()
    n_img = 5  # (16 / 8)^2 patches + CLS ("full" keeps it)
    ids = torch.tensor([[1, 5, *([63] * n_img), 7, 8, 9]])
    pix = torch.randn(1, 3, 16, 16)
    mask = torch.ones_like(ids)
    hf = model(input_ids=ids, pixel_values=pix, attention_mask=mask)
    embeds = multimodal_embeds(model, ids, pix)
    out = VarReference(model, None).step(embeds, mask, positions(mask), None, ids == 63, None)
    assert torch.equal(out.logits, hf.logits)


def test_var_changes_attention_and_tracks_sinks():
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS)
    mask = torch.ones(1, S, dtype=torch.long)
    vis = visual_mask(1, S, 2, 8)
    off = VarReference(model, None).step(x, mask, positions(mask), None, vis, None)
    ref = VarReference(model, settings())
    out = ref.step(x, mask, positions(mask), None, vis, None)
    assert ref.var_layers == [2, 3]
    assert out.present_sink_mask.shape == (1, 2, S)
    for li in range(2):
        assert out.present_sink_mask[0, li].nonzero().flatten().tolist() == SINKS
    # rows before the first query after the image are untouched, later ones change
    assert torch.equal(out.logits[:, :10], off.logits[:, :10])
    assert not torch.allclose(out.logits[:, 10:], off.logits[:, 10:], atol=1e-4)


@pytest.mark.parametrize("scope", ["prompt", "all"])
def test_sink_scope_at_decode(scope):
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS)
    mask = torch.ones(1, S, dtype=torch.long)
    vis = visual_mask(1, S, 2, 8)
    ref = VarReference(model, settings(sink_scope=scope))
    out = ref.step(x, mask, positions(mask), None, vis, None)
    new = planted_embeds(1, 1, [0], seed=5)  # a generated token with massive sink-dim values
    mask1 = torch.ones(1, S + 1, dtype=torch.long)
    vis1 = torch.cat([vis, torch.zeros(1, 1, dtype=torch.bool)], -1)
    out1 = ref.step(new, mask1, positions(mask1)[:, -1:], out.present, vis1, out.present_sink_mask)
    assert torch.equal(out1.present_sink_mask[:, :, :S], out.present_sink_mask)
    assert bool(out1.present_sink_mask[0, :, S].all()) == (scope == "all")


def test_padded_positions_are_never_sinks():
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS + [1])
    mask = torch.ones(1, S, dtype=torch.long)
    mask[:, :2] = 0  # positions 0, 1 are padding (both planted)
    out = VarReference(model, settings()).step(x, mask, positions(mask), None, visual_mask(1, S, 2, 8))
    assert not out.present_sink_mask[:, :, :2].any()
    assert out.present_sink_mask[:, :, 3].all()


def test_batched_left_padded_equals_one_at_a_time():
    model = tiny_llama()
    lengths, img = [S, S - 3], (2, 8)
    rows = []
    for i, n in enumerate(lengths):
        x = planted_embeds(1, n, SINKS, seed=10 + i)
        vis = visual_mask(1, n, *img)
        rows.append((x, vis))
    ref = VarReference(model, settings())
    t = max(lengths)
    xb = torch.zeros(2, t, HIDDEN)
    visb = torch.zeros(2, t, dtype=torch.bool)
    maskb = torch.zeros(2, t, dtype=torch.long)
    for i, (x, vis) in enumerate(rows):
        n = x.shape[1]
        xb[i, t - n :], visb[i, t - n :], maskb[i, t - n :] = x[0], vis[0], 1
    steps = 3
    new = torch.randn(steps, 2, 1, HIDDEN)
    # batched: prefill + decode
    outb = [ref.step(xb, maskb, positions(maskb), None, visb, None)]
    m, v, pos = maskb, visb, positions(maskb)
    for k in range(steps):
        m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], -1)
        v = torch.cat([v, torch.zeros(2, 1, dtype=torch.bool)], -1)
        pos = pos[:, -1:] + 1
        outb.append(ref.step(new[k], m, pos, outb[-1].present, v, outb[-1].present_sink_mask))
    for i, (x, vis) in enumerate(rows):
        n = x.shape[1]
        mask = torch.ones(1, n, dtype=torch.long)
        o = ref.step(x, mask, positions(mask), None, vis, None)
        assert torch.allclose(o.logits[0], outb[0].logits[i, t - n :], atol=1e-5)
        assert torch.equal(o.present_sink_mask[0], outb[0].present_sink_mask[i, :, t - n :])
        vv, pp = vis, positions(mask)
        for k in range(steps):
            mask = torch.ones(1, n + k + 1, dtype=torch.long)
            vv = torch.cat([vv, torch.zeros(1, 1, dtype=torch.bool)], -1)
            pp = pp[:, -1:] + 1
            o = ref.step(new[k, i : i + 1], mask, pp, o.present, vv, o.present_sink_mask)
            assert torch.allclose(o.logits[0], outb[k + 1].logits[i], atol=1e-5)


def test_static_and_hybrid_heads():
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS)
    mask = torch.ones(1, S, dtype=torch.long)
    vis = visual_mask(1, S, 2, 8)
    off = VarReference(model, None).step(x, mask, positions(mask), None, vis).logits
    # no calibrated head at all: static and hybrid leave every layer untouched
    for mode in ("static", "hybrid"):
        out = VarReference(model, settings(heads=mode), heads=[]).step(x, mask, positions(mask), None, vis)
        assert torch.equal(out.logits, off)
    static = VarReference(model, settings(heads="static"), heads=[(3, 1)]).step(
        x, mask, positions(mask), None, vis).logits
    assert not torch.allclose(static, off, atol=1e-5)
    with pytest.raises(ConfigError, match="calibrated"):
        VarReference(model, settings(heads="hybrid"))
    with pytest.raises(ConfigError, match="does not exist"):
        VarReference(model, settings(heads="static"), heads=[(2, 9)])


def test_exclude_last_layer_and_layer_list():
    model = tiny_llama()
    assert VarReference(model, settings(exclude_last_layer=True)).var_layers == [2]
    assert VarReference(model, settings(layers="0,3")).var_layers == [0, 3]
    with pytest.raises(ConfigError, match="hidden size"):
        VarReference(model, settings(sink_dims=(5, HIDDEN)))


def test_generate_matches_manual_steps():
    model = tiny_llama()
    x = planted_embeds(1, S, SINKS)
    mask = torch.ones(1, S, dtype=torch.long)
    vis = visual_mask(1, S, 2, 8)
    ref = VarReference(model, settings())
    tokens = ref.generate(x, mask, vis, max_new_tokens=4)
    assert tokens.shape == (1, 4)
    out = ref.step(x, mask, positions(mask), None, vis, None)
    assert int(out.logits[0, -1].argmax()) == int(tokens[0, 0])


# ---- pure functions ---------------------------------------------------------------------------


def test_sink_flags_and_eligible_rows():
    h = torch.randn(1, 4, HIDDEN)
    h[0, 2, 17] = 500.0
    assert sink_flags(h, SINK_DIMS, 4.0).tolist() == [[False, False, True, False]]
    visual = torch.tensor([[False, True, True, False, False]])
    valid = torch.tensor([[False, True, True, True, True]])
    assert eligible_rows(visual, valid, 0).tolist() == [[False, False, False, True, True]]
    assert eligible_rows(visual, valid, 3).tolist() == [[True, True]]


def test_redistribute_by_hand():
    # keys: 0 text sink, 1 visual sink, 2-3 visual, 4 text
    a = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.3]).view(1, 1, 1, 5)
    visual = torch.tensor([[False, True, True, True, False]])
    sink = torch.tensor([[True, True, False, False, False]])
    s = settings(p=0.5, rho=0.9, summ=0.1)
    out = redistribute(a, visual, sink, torch.ones(1, 1, dtype=torch.bool), None, s, dynamic=True)
    budget = 0.5 * (0.3 + 0.2)
    expected = torch.tensor([0.15, 0.1, 0.1 + budget / 2, 0.1 + budget / 2, 0.3])
    assert torch.allclose(out.view(-1), expected, atol=1e-7)
    # portion 0.2 / 0.4 = 0.5 > rho 0.4: not selected
    out2 = redistribute(a, visual, sink, torch.ones(1, 1, dtype=torch.bool), None, s.replace(rho=0.4), True)
    assert torch.equal(out2, a)
    # static mode ignores the row test; head_mask False leaves it
    out3 = redistribute(a, visual, sink, torch.ones(1, 1, dtype=torch.bool), torch.tensor([True]),
                        s.replace(rho=0.0), dynamic=False)
    assert torch.allclose(out3.view(-1), expected, atol=1e-7)
    out4 = redistribute(a, visual, sink, torch.ones(1, 1, dtype=torch.bool), torch.tensor([False]), s, False)
    assert torch.equal(out4, a)


def test_tiny_llava_exact_off_and_batched_var(tiny_loaded):
    """On the embedded tiny-llava (GQA, real processor, real sinks at tau=20)."""
    from var_export.calibration.tiny_llava import TINY_SINK_DIMS, synthetic_images
    from var_export.inputs import prepare_batch

    model = tiny_loaded.model
    images = synthetic_images(2, seed=1)
    prompts = ["What is in the image?", "Describe the picture in detail please."]
    batch = prepare_batch(tiny_loaded.processor, images, prompts)  # left padded
    mask, vis = batch["attention_mask"], batch["visual_token_mask"]
    embeds = multimodal_embeds(model, batch["input_ids"], batch["pixel_values"])
    hf = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=mask,
               position_ids=positions(mask))
    off = VarReference(model, None).step(embeds, mask, positions(mask), None, vis)
    assert torch.equal(off.logits, hf.logits)
    ref = VarReference(model, VarSettings(sink_dims=TINY_SINK_DIMS, heads="dynamic"))
    both = ref.step(embeds, mask, positions(mask), None, vis)
    assert both.present_sink_mask[:, :, :].any()
    for i in range(2):
        one = prepare_batch(tiny_loaded.processor, images[i : i + 1], prompts[i : i + 1])
        e1 = multimodal_embeds(model, one["input_ids"], one["pixel_values"])
        m1 = one["attention_mask"]
        single = ref.step(e1, m1, positions(m1), None, one["visual_token_mask"])
        n = m1.shape[1]
        assert torch.allclose(single.logits[0], both.logits[i, -n:], atol=1e-5)
        assert torch.equal(single.present_sink_mask[0], both.present_sink_mask[i, :, -n:])
        assert not torch.allclose(single.logits, off.logits[i : i + 1, -n:], atol=1e-4)  # VAR acts
