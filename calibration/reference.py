"""The PyTorch VAR reference (DESIGN.md §1): the ground truth every exported graph is tested against.

VAR is hooked into an unmodified HF model at two clean points, without copying its modeling code:

* an attention function registered with ``transformers.AttentionInterface`` under the name
  ``var_reference`` (plus ``eager_mask`` for the same name in ``AttentionMaskInterface``: without a
  mask function transformers 5 hands a custom attention function *no* causal mask at prefill).
  It computes eager attention op for op, then applies :func:`redistribute` between the softmax
  and the product with V;
* a forward pre-hook on every decoder layer that sees the layer's input residual stream, where
  sink tokens are detected (:func:`sink_flags`).

Both are installed only for the duration of :meth:`VarReference.step`; outside it the model is
left exactly as it was given. The step API mirrors the ONNX decoder contract (DESIGN.md §3), so
parity tests feed identical inputs to ONNX Runtime and to this reference.

All knobs are in the released code's convention (``VarSettings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from var_export.core.errors import ConfigError
from var_export.core.settings import PORTION_EPS, RMS_EPS, VarSettings

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "var_reference"  # name under which the attention function is registered

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer (key, value), each (B, KV, T, hd)


class StepOutput(NamedTuple):
    """What one decoder step returns (the ONNX decoder's outputs)."""

    logits: torch.Tensor  # (B, S, V)
    present: KVCache  # per layer (key, value), each (B, KV, T, hd)
    present_sink_mask: torch.Tensor  # (B, Lv, T) bool, Lv = len(var_layers)


# --------------------------------------------------------------------------------------------
# The algorithm as pure functions (tested alone)
# --------------------------------------------------------------------------------------------


def sink_flags(hidden: torch.Tensor, sink_dims: Sequence[int], tau: float) -> torch.Tensor:
    """Sink tokens of one decoder layer's input residual stream.

    hidden: (B, S, D), any float dtype. Returns (B, S) bool: ``max_d |rmsnorm(x)[d]| > tau`` over
    ``sink_dims``, with a weightless RMS norm in float32 (eps 1e-6).
    """
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)  # (B, S, D)
    return normed[..., list(sink_dims)].abs().amax(-1) > tau  # (B, S)


def eligible_rows(visual: torch.Tensor, valid: torch.Tensor, past_len: int) -> torch.Tensor:
    """Query rows VAR may change: not visual, not padding, with a visual key at or before them.

    visual, valid: (B, T) bool over all key positions. Returns (B, S) bool for the S = T - past_len
    current queries.
    """
    seen_visual = torch.cumsum(visual.long(), dim=-1) > 0  # (B, T)
    rows = valid & ~visual & seen_visual  # (B, T)
    return rows[:, past_len:]  # (B, S)


@dataclasses.dataclass
class RowMasses:
    """Per-row attention masses over the key classes of DESIGN.md §1, all (B, H, S) float32."""

    visual: torch.Tensor  # sum(a[V])
    visual_sink: torch.Tensor  # sum(a[S_v])
    text_sink: torch.Tensor  # sum(a[S_t])
    visual_nonsink: torch.Tensor  # sum(a[V \ S_v])
    portion: torch.Tensor  # sum(a[S_v]) / sum over V of (a + 1e-6)


def row_masses(attn: torch.Tensor, visual: torch.Tensor, sink: torch.Tensor) -> RowMasses:
    """attn: (B, H, S, T) probabilities; visual, sink: (B, T) bool."""
    a = attn.float()
    vis = visual[:, None, None, :]  # (B, 1, 1, T)
    snk = sink[:, None, None, :]
    visual_mass = (a * vis).sum(-1)  # (B, H, S)
    visual_sink_mass = (a * (snk & vis)).sum(-1)
    text_sink_mass = (a * (snk & ~vis)).sum(-1)
    nonsink_mass = (a * (vis & ~snk)).sum(-1)
    n_visual = visual.sum(-1).to(a.dtype)[:, None, None]  # (B, 1, 1)
    portion = visual_sink_mass / (visual_mass + PORTION_EPS * n_visual)
    return RowMasses(visual_mass, visual_sink_mass, text_sink_mass, nonsink_mass, portion)


def image_centric_rows(
    attn: torch.Tensor, visual: torch.Tensor, sink: torch.Tensor, settings: VarSettings
) -> torch.Tensor:
    """The per-row test: the sample has a visual sink, portion <= rho and summation >= summ.

    attn: (B, H, S, T); visual, sink: (B, T) bool. Returns (B, H, S) bool (eligibility not applied).
    """
    m = row_masses(attn, visual, sink)
    has_visual_sink = (sink & visual).any(-1)[:, None, None]  # (B, 1, 1)
    return has_visual_sink & (m.portion <= settings.rho) & (m.visual >= settings.summ)


def redistribute(
    attn: torch.Tensor,
    visual: torch.Tensor,
    sink: torch.Tensor,
    eligible: torch.Tensor,
    head_mask: torch.Tensor | None,
    settings: VarSettings,
    dynamic: bool,
) -> torch.Tensor:
    """VAR on one layer's attention probabilities (DESIGN.md §1).

    attn: (B, H, S, T) post-softmax; visual, sink: (B, T) bool; eligible: (B, S) bool;
    head_mask: (H,) bool over query heads, None = every head; dynamic: apply the per-row test
    (dynamic and hybrid modes) or not (static mode). Rows that are not selected keep their exact
    values; selected rows are computed in float32 and cast back to ``attn.dtype``.
    """
    m = row_masses(attn, visual, sink)
    has_visual_sink = (sink & visual).any(-1)[:, None, None]  # (B, 1, 1)
    selected = eligible[:, None, :] & has_visual_sink & (m.visual_nonsink > 0)  # (B, H, S)
    if head_mask is not None:
        selected = selected & head_mask.to(torch.bool)[None, :, None]
    if dynamic:
        selected = selected & (m.portion <= settings.rho) & (m.visual >= settings.summ)

    a = attn.float()
    p = settings.p
    budget = (1.0 - p) * (m.visual_sink + m.text_sink)  # (B, H, S)
    safe_nonsink = torch.where(m.visual_nonsink > 0, m.visual_nonsink, torch.ones_like(m.visual_nonsink))
    gained = a + budget[..., None] * (a / safe_nonsink[..., None])  # (B, H, S, T)
    snk = sink[:, None, None, :]  # (B, 1, 1, T)
    vis_nonsink = (visual & ~sink)[:, None, None, :]
    changed = torch.where(snk, a * p, torch.where(vis_nonsink, gained, a))  # (B, H, S, T)
    return torch.where(selected[..., None], changed.to(attn.dtype), attn)


# --------------------------------------------------------------------------------------------
# Observation (calibration statistics)
# --------------------------------------------------------------------------------------------


class VarObserver:
    """What the reference sees, per step; subclass and override. All methods are no-ops here."""

    def layer_input(self, layer: int, hidden: torch.Tensor, valid: torch.Tensor, past_len: int) -> None:
        """hidden: (B, S, D) input residual stream of ``layer``; valid: (B, S) not-padding."""

    def layer_sinks(
        self, layer: int, sink: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, past_len: int
    ) -> None:
        """sink, visual, valid: (B, T) bool at a VAR layer (sink includes the past flags)."""

    def layer_rows(
        self, layer: int, eligible: torch.Tensor, passed: torch.Tensor, past_len: int
    ) -> None:
        """eligible: (B, S) bool; passed: (B, H, S) bool = per-row test (eligibility not applied)."""


class VarCounts(VarObserver):
    """Counts for calibration: per layer sink tokens, per (layer, head) eligible and passing rows.

    Only prefill steps (past_len == 0) are counted unless ``prefill_only`` is False.
    """

    def __init__(self, num_heads: int, prefill_only: bool = True) -> None:
        self.num_heads = num_heads  # query heads per layer
        self.prefill_only = prefill_only  # ignore decode steps
        self.sink_tokens: dict[int, int] = {}  # layer -> sink tokens (valid positions)
        self.visual_sink_tokens: dict[int, int] = {}  # layer -> sink tokens that are visual
        self.eligible: dict[int, int] = {}  # layer -> eligible rows (same for every head)
        self.passed: dict[int, list[int]] = {}  # layer -> per head rows passing the test

    def layer_sinks(self, layer, sink, visual, valid, past_len) -> None:  # noqa: D102
        if self.prefill_only and past_len:
            return
        flags = sink & valid  # (B, T)
        self.sink_tokens[layer] = self.sink_tokens.get(layer, 0) + int(flags.sum())
        self.visual_sink_tokens[layer] = self.visual_sink_tokens.get(layer, 0) + int(
            (flags & visual).sum()
        )

    def layer_rows(self, layer, eligible, passed, past_len) -> None:  # noqa: D102
        if self.prefill_only and past_len:
            return
        self.eligible[layer] = self.eligible.get(layer, 0) + int(eligible.sum())
        per_head = (passed & eligible[:, None, :]).sum(dim=(0, 2)).tolist()  # (H,)
        old = self.passed.get(layer, [0] * self.num_heads)
        self.passed[layer] = [int(x) + int(y) for x, y in zip(old, per_head)]

    def head_scores(self, layer: int) -> list[float]:
        """Fraction of eligible rows passing the per-row test, per head (0 when no eligible row)."""
        n = self.eligible.get(layer, 0)
        passed = self.passed.get(layer, [0] * self.num_heads)
        return [x / n if n else 0.0 for x in passed]


# --------------------------------------------------------------------------------------------
# Hooking into HF models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StepState:
    """What the hooks of one step share."""

    ref: VarReference  # the reference running this step
    visual: torch.Tensor  # (B, T) bool
    valid: torch.Tensor  # (B, T) bool, attention_mask != 0
    eligible: torch.Tensor  # (B, S) bool
    past_len: int  # P
    past_sink: torch.Tensor  # (B, Lv, P) bool
    sinks: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, T)


_ACTIVE: list[_StepState] = []  # the step in progress (a stack: steps do not nest in practice)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, hd) -> (B, KV * n_rep, T, hd): GQA key/value heads shared by query heads."""
    if n_rep == 1:
        return x
    b, kv, t, hd = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, hd).reshape(b, kv * n_rep, t, hd)


def var_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (same ops, same order as HF's) with VAR between softmax and ``@ V``.

    query: (B, H, S, hd); key, value: (B, KV, T, hd); attention_mask: (B, 1, S, T) additive.
    Returns attn_output (B, S, H, hd) and the (possibly redistributed) probabilities (B, H, S, T).
    """
    n_rep = query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, H, S, T)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    if _ACTIVE:
        attn_weights = _ACTIVE[-1].ref._apply_var(_ACTIVE[-1], module.layer_idx, attn_weights)
    attn_output = torch.matmul(attn_weights, value_states)  # (B, H, S, hd)
    attn_output = attn_output.transpose(1, 2).contiguous()  # (B, S, H, hd)
    return attn_output, attn_weights


AttentionInterface.register(ATTN_IMPLEMENTATION, var_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a ``LlavaForConditionalGeneration`` or a ``*ForCausalLM``."""
    inner = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if inner is None or lm_head is None:
        raise ConfigError(
            f"expected a LlavaForConditionalGeneration or a *ForCausalLM (with .model and .lm_head), "
            f"found {type(model).__name__}."
        )
    decoder = getattr(inner, "language_model", inner)
    if not hasattr(decoder, "layers"):
        raise ConfigError(
            f"expected a decoder with .layers inside {type(model).__name__}, found {type(decoder).__name__}."
        )
    return decoder, lm_head


def multimodal_embeds(
    model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, **vision_inputs: torch.Tensor
) -> torch.Tensor:
    """``inputs_embeds`` (B, S, D) as the HF model builds them: token embeddings with the projected
    image features scattered (row-major) into the image-token positions. ``vision_inputs``: the
    family's extra processor outputs (``image_sizes`` for LLaVA-NeXT, ...)."""
    from var_export.families import family_of

    decoder, _ = split_model(model)
    embeds = decoder.get_input_embeddings()(input_ids)  # (B, S, D)
    if pixel_values is None:
        return embeds
    features = family_of(model).image_features(model, {"pixel_values": pixel_values, **vision_inputs})
    features = features.to(embeds.device, embeds.dtype)  # (N_img_tokens, D)
    image_mask = (input_ids == model.config.image_token_id)[..., None]  # (B, S, 1)
    if int(image_mask.sum()) != features.shape[0]:
        raise ConfigError(
            f"the prompt has {int(image_mask.sum())} image tokens but the image gives "
            f"{features.shape[0]} features; build input_ids with the model's processor."
        )
    return embeds.masked_scatter(image_mask.expand_as(embeds), features)


def prompt_positions(model: nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
    """position_ids of a prompt batch by the model family's rule ([B, S], or [3, B, S] for M-RoPE)
    and the state later decode steps need (Qwen-VL: rope_deltas [B, 1]; None otherwise)."""
    from var_export.families import family_of

    family = family_of(model)
    keys = ("input_ids", "attention_mask", *family.processor_keys)
    arrays = {k: batch[k].detach().cpu().numpy() for k in keys if batch.get(k) is not None}
    pos, state = family.prefill_positions(arrays)
    return torch.from_numpy(pos), state


class VarReference:
    """VAR over an HF model, one decoder step at a time (the ONNX decoder contract).

    settings None = VAR off (the plain decoder, bit-exact with HF eager attention). ``heads`` are
    the calibrated (layer, query head) pairs used by the static and hybrid modes.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: VarSettings | None,
        heads: Sequence[tuple[int, int]] | None = None,
        observer: VarObserver | None = None,
    ) -> None:
        self.model = model
        self.decoder, self.lm_head = split_model(model)
        cfg = self.decoder.config
        self.num_layers: int = cfg.num_hidden_layers
        self.num_heads: int = cfg.num_attention_heads
        self.hidden_size: int = cfg.hidden_size
        self.settings = settings
        self.observer = observer
        self.var_layers: list[int] = []
        self.head_masks: dict[int, torch.Tensor] | None = None  # layer -> (H,) bool; None = all heads
        if settings is not None:
            settings.check_model(self.num_layers, self.hidden_size)
            self.var_layers = settings.var_layers(self.num_layers)
            if settings.heads in ("static", "hybrid"):
                self.head_masks = self._head_masks(heads, settings.heads)
        self._slot = {layer: i for i, layer in enumerate(self.var_layers)}  # layer -> index in Lv
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        )

    def _head_masks(
        self, heads: Sequence[tuple[int, int]] | None, mode: str
    ) -> dict[int, torch.Tensor]:
        if heads is None:
            raise ConfigError(
                f"head mode {mode!r} needs the calibrated (layer, head) list, found none. "
                "Run `var-export calibrate` and pass its heads, or use --heads dynamic."
            )
        masks: dict[int, torch.Tensor] = {}
        for pair in heads:
            layer, head = (int(x) for x in pair)
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise ConfigError(
                    f"head ({layer}, {head}) does not exist in a model with {self.num_layers} layers "
                    f"and {self.num_heads} query heads; was the calibration made for another model?"
                )
            masks.setdefault(layer, torch.zeros(self.num_heads, dtype=torch.bool))[head] = True
        ignored = sorted(set(masks) - set(self.var_layers))
        if ignored:
            log.warning("calibrated heads on layers %s are outside the VAR layers and are ignored", ignored)
        return masks

    # -- hooks -------------------------------------------------------------------------------

    def _pre_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = _ACTIVE[-1] if _ACTIVE else None
            if state is None or state.ref is not self:
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, S, D)
            p = state.past_len
            if self.observer is not None:
                self.observer.layer_input(layer, hidden, state.valid[:, p:], p)
            if layer not in self._slot:
                return
            settings = self.settings
            assert settings is not None
            if p == 0 or settings.sink_scope == "all":
                current = sink_flags(hidden, settings.sink_dims, settings.tau) & state.valid[:, p:]
            else:  # sink_scope "prompt": generated tokens are never sinks
                current = torch.zeros_like(state.valid[:, p:])
            sink = torch.cat([state.past_sink[:, self._slot[layer]], current], dim=-1)  # (B, T)
            state.sinks[layer] = sink
            if self.observer is not None:
                self.observer.layer_sinks(layer, sink, state.visual, state.valid, p)

        return hook

    def _apply_var(self, state: _StepState, layer: int, attn: torch.Tensor) -> torch.Tensor:
        if state.ref is not self or layer not in self._slot:
            return attn
        settings = self.settings
        assert settings is not None
        sink = state.sinks[layer]  # (B, T)
        if self.observer is not None:
            passed = image_centric_rows(attn, state.visual, sink, settings)  # (B, H, S)
            self.observer.layer_rows(layer, state.eligible, passed, state.past_len)
        if self.head_masks is None:  # dynamic
            return redistribute(attn, state.visual, sink, state.eligible, None, settings, dynamic=True)
        head_mask = self.head_masks.get(layer)
        if head_mask is None:  # no calibrated head on this layer: untouched
            return attn
        return redistribute(
            attn, state.visual, sink, state.eligible, head_mask.to(attn.device), settings,
            dynamic=settings.heads == "hybrid",
        )

    @contextlib.contextmanager
    def _installed(self, state: _StepState) -> Iterator[None]:
        cfg = self.decoder.config
        old_impl = cfg._attn_implementation
        handles = [
            layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            for i, layer in enumerate(self.decoder.layers)
        ]
        cfg._attn_implementation = ATTN_IMPLEMENTATION
        _ACTIVE.append(state)
        try:
            yield
        finally:
            _ACTIVE.pop()
            cfg._attn_implementation = old_impl
            for h in handles:
                h.remove()

    # -- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        visual_token_mask: torch.Tensor | None = None,
        past_sink_mask: torch.Tensor | None = None,
    ) -> StepOutput:
        """One decoder step: inputs_embeds (B, S, D), attention_mask (B, T) int, position_ids (B, S),
        past_key_values per layer (B, KV, P, hd) or None, visual_token_mask (B, T) bool,
        past_sink_mask (B, Lv, P) bool or None (= no past sinks)."""
        b, s, _ = inputs_embeds.shape
        p = past_key_values[0][0].shape[-2] if past_key_values else 0
        t = p + s
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be (B, T) = ({b}, {t}), found {tuple(attention_mask.shape)}")
        device = inputs_embeds.device
        if visual_token_mask is None:
            visual_token_mask = torch.zeros(b, t, dtype=torch.bool, device=device)
        if tuple(visual_token_mask.shape) != (b, t):
            raise ValueError(
                f"visual_token_mask must be (B, T) = ({b}, {t}), found {tuple(visual_token_mask.shape)}"
            )
        n_var = len(self.var_layers)
        if past_sink_mask is None:
            past_sink_mask = torch.zeros(b, n_var, p, dtype=torch.bool, device=device)
        if tuple(past_sink_mask.shape) != (b, n_var, p):
            raise ValueError(
                f"past_sink_mask must be (B, Lv, P) = ({b}, {n_var}, {p}), found {tuple(past_sink_mask.shape)}"
            )
        valid = attention_mask != 0  # (B, T)
        visual = visual_token_mask.to(torch.bool) & valid
        state = _StepState(
            ref=self, visual=visual, valid=valid, eligible=eligible_rows(visual, valid, p),
            past_len=p, past_sink=past_sink_mask.to(torch.bool),
        )
        if past_key_values:
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        else:
            cache = DynamicCache(config=self.decoder.config)
        with self._installed(state):
            out = self.decoder(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{self._cache_kw: cache},
            )
        logits = self.lm_head(out.last_hidden_state)  # (B, S, V)
        present = [(layer.keys, layer.values) for layer in cache.layers]
        if n_var:
            present_sink = torch.stack([state.sinks[layer] for layer in self.var_layers], dim=1)
        else:
            present_sink = torch.zeros(b, 0, t, dtype=torch.bool, device=device)
        return StepOutput(logits, present, present_sink)

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_token_mask: torch.Tensor,
        max_new_tokens: int,
        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        rope_deltas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding through :meth:`step`. Returns the new token ids (B, max_new_tokens).

        embed_fn maps token ids (B, 1) to embeddings (B, 1, D); default: the decoder's embeddings.
        position_ids None: HF's left-padding convention (cumsum of the mask - 1). M-RoPE models pass
        the prompt's [3, B, S] positions and ``rope_deltas`` [B, 1] (:func:`prompt_positions`);
        decode steps then sit at ``cumsum(mask) - 1 + rope_deltas``, as HF generate does.
        """
        embed = embed_fn or self.decoder.get_input_embeddings()
        mask = attention_mask.long()
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
        visual = visual_token_mask.to(torch.bool)
        out = self.step(inputs_embeds, mask, position_ids, None, visual, None)
        tokens: list[torch.Tensor] = []
        for i in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1)  # (B,)
            tokens.append(next_token)
            if i == max_new_tokens - 1:
                break
            b = mask.shape[0]
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=-1)
            visual = torch.cat([visual, visual.new_zeros(b, 1)], dim=-1)
            if rope_deltas is not None:  # (3, B, 1)
                position_ids = (mask.cumsum(-1)[:, -1:] - 1 + rope_deltas.view(b, 1))[None].expand(3, b, 1)
            else:
                position_ids = position_ids[..., -1:] + 1
            out = self.step(
                embed(next_token[:, None]), mask, position_ids, out.present, visual,
                out.present_sink_mask,
            )
        if not tokens:
            return torch.zeros(mask.shape[0], 0, dtype=torch.long, device=mask.device)
        return torch.stack(tokens, dim=1)
