"""The vectorised reference against a literal port of the released code's loops."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from var_export.calibration import released_port
from var_export.calibration.reference import (
    VarReference,
    eligible_rows,
    image_centric_rows,
    redistribute,
)
from var_export.core.settings import VarSettings

log = logging.getLogger(__name__)


def make_case(seed: int, decode: bool):
    """A random attention layer: batch 1, one image span, causal softmax rows, random sinks."""
    g = torch.Generator().manual_seed(seed)

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    heads = rint(1, 4)
    im = rint(1, 4)  # text before the image (BOS included)
    pa = rint(3, 10)
    prompt = im + pa + rint(1, 6)
    sink = torch.zeros(1, prompt, dtype=torch.bool)
    visual = torch.zeros(1, prompt, dtype=torch.bool)
    visual[:, im : im + pa] = True
    sink[0, 0] = bool(torch.rand(1, generator=g) < 0.8)  # BOS
    n_vis_sinks = rint(0, pa - 1)  # at least one visual non-sink
    vis_sinks = im + torch.randperm(pa, generator=g)[:n_vis_sinks]
    sink[0, vis_sinks] = True
    text_positions = [k for k in range(1, prompt) if not visual[0, k]]
    for k in text_positions:
        if torch.rand(1, generator=g) < 0.15:
            sink[0, k] = True
    if decode:
        past = prompt + rint(0, 3)  # generated tokens before this one are never sinks
        t = past + 1
        q_pos = torch.tensor([past])
    else:
        past, t = 0, prompt
        q_pos = torch.arange(t)
    pad = t - prompt
    sink = torch.cat([sink, torch.zeros(1, pad, dtype=torch.bool)], -1)
    visual = torch.cat([visual, torch.zeros(1, pad, dtype=torch.bool)], -1)
    scale = float(torch.rand(1, generator=g)) * 4 + 0.5
    scores = torch.randn(1, heads, len(q_pos), t, generator=g) * scale
    boost = torch.randn(1, heads, 1, 1, generator=g).abs() * 3  # some heads stare at sinks
    scores = scores + boost * sink[:, None, None, :]
    causal = torch.arange(t)[None, :] <= q_pos[:, None]  # (Q, T)
    scores = scores.masked_fill(~causal, float("-inf"))
    attn = torch.softmax(scores, dim=-1)  # (1, H, Q, T)
    return attn, visual, sink, im, pa, past


def reference_layer(attn, visual, sink, past, s: VarSettings) -> torch.Tensor:
    valid = torch.ones_like(visual)
    eligible = eligible_rows(visual, valid, past)
    return redistribute(attn, visual, sink, eligible, None, s, dynamic=True)


def port_layer(attn, sink, im, pa, past, s: VarSettings) -> torch.Tensor:
    sink_inds = sink[0].nonzero().flatten()
    return released_port.released_layer(
        attn, sink_inds, im, pa, rho=s.rho, summ=s.summ, p=s.p, prefill=past == 0
    )


KNOBS = [
    dict(p=0.6, rho=0.5, summ=0.2),
    dict(p=0.3, rho=0.8, summ=0.0),
    dict(p=0.9, rho=0.2, summ=0.5),
    dict(p=0.6, rho=1.0, summ=0.05),
    dict(p=1.0, rho=0.5, summ=0.2),
]


def test_reference_equals_released_port_on_random_cases():
    max_diff, changed, rows = 0.0, 0, 0
    for knobs in KNOBS:
        s = VarSettings(sink_dims=(0,), layers="0", heads="dynamic", **knobs)
        for seed in range(60):
            for decode in (False, True):
                attn, visual, sink, im, pa, past = make_case(seed, decode)
                ref = reference_layer(attn, visual, sink, past, s)
                port = port_layer(attn, sink, im, pa, past, s)
                assert not torch.isnan(port).any()
                max_diff = max(max_diff, float((ref - port).abs().max()))
                changed += int((ref != attn).any(-1).sum())
                eligible = eligible_rows(visual, torch.ones_like(visual), past)
                rows += attn.shape[1] * int(eligible.sum())
    log.warning("reference vs released port: max |diff| = %.3g over %d eligible rows (%d changed)",
                max_diff, rows, changed)
    print(f"\nreference vs released port: max |diff| = {max_diff:.3g} over {rows} eligible rows ({changed} changed)")
    assert max_diff < 1e-6
    assert 0.1 * rows < changed < 0.9 * rows  # the comparison is not vacuous


# ---- properties --------------------------------------------------------------------------------

knob = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6), decode=st.booleans(),
    p=st.floats(min_value=0.01, max_value=1.0), rho=knob, summ=knob, static=st.booleans(),
)
def test_redistribute_properties(seed, decode, p, rho, summ, static):
    attn, visual, sink, im, pa, past = make_case(seed, decode)
    s = VarSettings(sink_dims=(0,), layers="0", p=p, rho=rho, summ=summ, heads="dynamic")
    eligible = eligible_rows(visual, torch.ones_like(visual), past)  # (1, Q)
    heads = attn.shape[1]
    head_mask = (torch.arange(heads) % 2 == 0) if static else None
    out = redistribute(attn, visual, sink, eligible, head_mask, s, dynamic=not static)
    assert (out >= 0).all()
    assert torch.allclose(out.sum(-1), torch.ones(out.shape[:-1]), atol=1e-5)
    # rows that may not change are bit-identical
    untouched = ~eligible[:, None, :].expand(1, heads, -1).clone()  # (1, H, Q)
    if static:
        untouched |= ~head_mask[None, :, None]
    else:
        untouched |= ~image_centric_rows(attn, visual, sink, s)
    assert torch.equal(out[untouched], attn[untouched])
    # p = 1 is the identity
    ident = redistribute(attn, visual, sink, eligible, head_mask, s.replace(p=1.0), dynamic=not static)
    assert torch.equal(ident, attn)


# ---- end to end: a random LLaMA with the reference vs with the port in its attention ----------

PORT_IMPL = "var_released_port_test"
HIDDEN, DIMS = 64, (5, 17)


class PortHooks:
    """The released pipeline around an HF model: DimProspector at prefill, HeadFork + VAR."""

    def __init__(self, im: int, pa: int, s: VarSettings, num_layers: int) -> None:
        self.im, self.pa, self.s = im, pa, s
        self.sink_layers = list(range(num_layers))[2:]  # the released default: layers 2..
        self.indices: dict[int, torch.Tensor] = {}
        self.prefill = True

    def pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self.prefill and layer in self.sink_layers:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.indices[layer] = released_port.dim_prospector(hidden, self.s.sink_dims, self.s.tau)

        return hook

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        n_rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
        w = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32)
        sinks = self.indices.get(module.layer_idx, torch.zeros(0, dtype=torch.long))
        w = released_port.released_layer(
            w, sinks, self.im, self.pa, rho=self.s.rho, summ=self.s.summ, p=self.s.p, prefill=self.prefill
        )
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w


@pytest.mark.parametrize("knobs", [dict(p=0.6, rho=0.5, summ=0.2), dict(p=0.2, rho=0.9, summ=0.1)])
def test_end_to_end_reference_equals_port(knobs):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    s = VarSettings(sink_dims=DIMS, tau=4.0, layers="2:", heads="dynamic", **knobs)
    im, pa, n = 2, 8, 14
    x = torch.randn(1, n, HIDDEN)
    for pos in (0, 3, 7):
        x[:, pos, list(DIMS)] = 300.0
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[:, im : im + pa] = True
    steps = [torch.randn(1, 1, HIDDEN) for _ in range(3)]

    # reference
    ref = VarReference(model, s)
    mask = torch.ones(1, n, dtype=torch.long)
    out = ref.step(x, mask, torch.arange(n)[None], None, visual, None)
    ref_logits = [out.logits]
    for k, xk in enumerate(steps):
        t = n + k + 1
        visual_t = torch.cat([visual, torch.zeros(1, k + 1, dtype=torch.bool)], -1)
        out = ref.step(xk, torch.ones(1, t, dtype=torch.long), torch.tensor([[t - 1]]), out.present,
                       visual_t, out.present_sink_mask)
        ref_logits.append(out.logits)

    # the released pipeline
    port = PortHooks(im, pa, s, cfg.num_hidden_layers)
    AttentionInterface.register(PORT_IMPL, port.attention)
    AttentionMaskInterface.register(PORT_IMPL, eager_mask)
    handles = [layer.register_forward_pre_hook(port.pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    model.config._attn_implementation = PORT_IMPL
    try:
        with torch.no_grad():
            cache = DynamicCache(config=cfg)
            port_logits = [model(inputs_embeds=x, cache=cache, use_cache=True).logits]
            port.prefill = False
            for k, xk in enumerate(steps):
                port_logits.append(model(inputs_embeds=xk, position_ids=torch.tensor([[n + k]]),
                                         cache=cache, use_cache=True).logits)
    finally:
        model.config._attn_implementation = "eager"
        for h in handles:
            h.remove()
    assert [sorted(v.tolist()) for v in port.indices.values()] == [[0, 3, 7]] * 2
    off = VarReference(model, None).step(x, mask, torch.arange(n)[None], None, visual).logits
    assert not torch.allclose(off, ref_logits[0], atol=1e-4)  # VAR did something
    diffs = [float((a - b).abs().max()) for a, b in zip(ref_logits, port_logits)]
    print(f"\nend to end reference vs port: max |logit diff| per step = {diffs}")
    assert max(diffs) < 1e-5
