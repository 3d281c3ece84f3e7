"""``python -m benchmarks.run`` (``make bench``): the price of VAR, measured side by side in one run.

Graphs (one decoder each, same weights), built with public library calls only
(``var_export.export.export_decoder``, ``var_export.passes.pipeline.apply_var``,
``var_export.passes.fused_var.apply_fused_var``):

* ``unfused``  no VAR, eager export at opset 18 (MatMul -> Softmax -> MatMul);
* ``fused``    no VAR, SDPA export at opset 23 (ONNX ``Attention``), the fastest baseline;
* ``naive-<mode>``      VAR by ``apply_var`` on ``unfused`` (Softmax rewritten);
* ``fused-qk-<mode>``   VAR by ``apply_fused_var`` (class masses + Q/K augmented scores);
* ``fused-mask-<mode>`` VAR by ``apply_fused_var`` (class masses + per-head additive mask);

for mode in dynamic / static / hybrid. The timing protocol (interleaved rounds, A/A pair on
``fused``) is the library's :mod:`var_export.timing`, the one ``var-export bench`` uses.

Also, per generated token, in PyTorch: the released code's approach (eager attention, Python
per-head loops: ``calibration.released_port``) vs the vectorised reference
(``calibration.reference``), beside the ORT graphs. Where a goal is missed, ORT's profiler gives
the per-node-type time of the VAR graph and its fused baseline.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import ConfigError
from var_export.timing import (
    GOALS,
    DecoderFeeds,
    machine_info,
    op_type_profile,
    time_graphs,
    write_report,
)

log = logging.getLogger(__name__)

FORMULATIONS: tuple[str, ...] = ("naive", "fused-qk", "fused-mask", "kernel")
MODES: tuple[str, ...] = ("dynamic", "static", "hybrid")
BASELINES: tuple[str, ...] = ("fused", "unfused")  # the first: reference of goals and A/A
RELEASED_SPEEDUP_GOAL = 10.0  # ORT VAR graph vs the released-code approach, per token


# --------------------------------------------------------------------------------------------
# Cases: a model and one batch of decoder inputs


@dataclasses.dataclass
class Case(DecoderFeeds):
    """A torch model plus the decoder inputs every graph is fed (identical for all)."""

    name: str = ""
    model: Any = None  # LlavaForConditionalGeneration (fp32, eval)
    settings: Any = None  # VarSettings
    heads: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # static / hybrid heads
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def reference_logits(self, ref: Any, steps: int) -> list[np.ndarray]:
        """Logits of ``ref.step`` (``VarReference``) for prefill and ``steps`` decode steps."""
        import torch

        mask = torch.from_numpy(self.attention_mask)
        pos = torch.from_numpy(self.position_ids())
        visual = torch.from_numpy(self.visual)
        out = ref.step(torch.from_numpy(self.inputs_embeds), mask, pos, None, visual, None)
        logits = [out.logits.numpy()]
        for i in range(steps):
            b = mask.shape[0]
            mask = torch.cat([mask, mask.new_ones(b, 1)], -1)
            visual = torch.cat([visual, visual.new_zeros(b, 1)], -1)
            pos = pos[:, -1:] + 1
            out = ref.step(
                torch.from_numpy(self.decode_embeds[i]), mask, pos, out.present, visual, out.present_sink_mask
            )
            logits.append(out.logits.numpy())
        return logits


def tiny_llava_case(batch: int = 2, seed: int = 7, decode_steps: int = 8) -> Case:
    """tiny-llava (planted sinks and heads), ``batch`` prompts of different lengths, left padded."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from var_export.calibration import tiny_llava as tl
    from var_export.calibration.reference import multimodal_embeds
    from var_export.core.settings import VarSettings

    path = tl.tiny_llava_dir()
    proc = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    proc.tokenizer.padding_side = "left"
    prompts = [tl.PROMPT_FORMAT.format(prompt=tl.DEFAULT_PROMPTS[(seed + i) % len(tl.DEFAULT_PROMPTS)]) for i in range(batch)]
    inputs = proc(images=tl.synthetic_images(batch, seed=seed), text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        embeds = multimodal_embeds(model, inputs["input_ids"], inputs["pixel_values"])
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.get_text_config().vocab_size
        tokens = torch.randint(4, vocab, (decode_steps, batch, 1), generator=gen)
        table = model.get_input_embeddings()
        decode = [table(t).numpy() for t in tokens]
    heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
    tc = model.config.get_text_config()
    return Case(
        name="tiny-llava",
        model=model,
        inputs_embeds=embeds.numpy(),
        attention_mask=inputs["attention_mask"].numpy().astype(np.int64),
        visual=(inputs["input_ids"] == model.config.image_token_id).numpy(),
        decode_embeds=decode,
        settings=VarSettings(sink_dims=tl.TINY_SINK_DIMS, layers="2:"),
        heads=heads,
        num_layers=tc.num_hidden_layers,
        kv_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim,
        var_layer_count=len(range(2, tc.num_hidden_layers)),
        info={"hidden": tc.hidden_size, "heads": tc.num_attention_heads, "layers": tc.num_hidden_layers},
    )


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """A LLaMA-width decoder slice with random weights (defaults: LLaMA-2-7B width, 2 layers)."""

    hidden: int = 4096  # hidden size
    heads: int = 32  # query heads (= KV heads, as LLaMA-2-7B)
    layers: int = 2  # decoder layers (VAR on all of them)
    intermediate: int = 11008  # MLP width
    vocab: int = 32000  # lm_head rows
    image_tokens: int = 576  # LLaVA-1.5 image tokens
    text_before: int = 5  # "<s> USER:" before the image
    text_after: int = 52  # question + "ASSISTANT:" after it (prompt = 633 tokens)
    heads_per_layer: int = 8  # calibrated heads per layer (static / hybrid)
    sink_dims: tuple[int, ...] = (1415, 2533)  # LLaVA-1.5-7B
    seed: int = 0

    @classmethod
    def tiny(cls) -> SliceSpec:
        return cls(hidden=128, heads=4, layers=2, intermediate=256, vocab=512, image_tokens=24,
                   text_before=3, text_after=9, heads_per_layer=2, sink_dims=(5, 17))


def slice_case(spec: SliceSpec = SliceSpec(), decode_steps: int = 16) -> Case:  # noqa: B008
    """Random-weight LLaVA with a ``spec``-sized LLaMA decoder; batch 1; sinks planted in the embeds:
    BOS and 1/64 of the image tokens get a massive value in the sink dims."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from var_export.core.settings import VarSettings

    if max(spec.sink_dims) >= spec.hidden:
        raise ConfigError(f"sink dims {spec.sink_dims} do not fit hidden size {spec.hidden}.")
    torch.manual_seed(spec.seed)
    text = LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads, vocab_size=spec.vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=spec.vocab - 1, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    s = spec.text_before + spec.image_tokens + spec.text_after
    with torch.no_grad():
        embeds = torch.randn(1, s, spec.hidden, generator=gen)
        im = spec.text_before
        sinks = [0] + list(range(im + 7, im + spec.image_tokens, 64))
        for pos in sinks:
            embeds[0, pos, list(spec.sink_dims)] = 100.0  # normalised ~ 40 > tau
        decode = [torch.randn(1, 1, spec.hidden, generator=gen).numpy() for _ in range(decode_steps)]
    visual = np.zeros((1, s), dtype=bool)
    visual[0, im : im + spec.image_tokens] = True
    rng = np.random.default_rng(spec.seed)
    heads = sorted(
        (layer, int(h)) for layer in range(spec.layers)
        for h in rng.choice(spec.heads, size=min(spec.heads_per_layer, spec.heads), replace=False)
    )
    return Case(
        name=f"slice-h{spec.hidden}-L{spec.layers}",
        model=model,
        inputs_embeds=embeds.numpy(),
        attention_mask=np.ones((1, s), dtype=np.int64),
        visual=visual,
        decode_embeds=decode,
        settings=VarSettings(sink_dims=spec.sink_dims, layers="0:"),
        heads=heads,
        num_layers=spec.layers,
        kv_heads=spec.heads,
        head_dim=spec.hidden // spec.heads,
        var_layer_count=spec.layers,
        info={**dataclasses.asdict(spec), "prompt_tokens": s, "sink_tokens": sinks},
    )


# --------------------------------------------------------------------------------------------
# Graphs


def graph_names(formulations: Sequence[str] = FORMULATIONS, modes: Sequence[str] = MODES) -> list[str]:
    return ["unfused", "fused"] + [f"{f}-{m}" for f in formulations for m in modes]


def build_graphs(
    case: Case,
    out_dir: Path,
    formulations: Sequence[str] = FORMULATIONS,
    modes: Sequence[str] = MODES,
    *,
    external_data: bool | None = None,
) -> dict[str, Path]:
    """Export both baselines and write every VAR variant beside its base graph.

    VAR graphs reuse the base's external data file (weights are written once per base).
    """
    import onnx_ir as ir

    from var_export.export import export_decoder
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var

    bad = sorted(set(formulations) - set(FORMULATIONS)) + sorted(set(modes) - set(MODES))
    if bad:
        raise ConfigError(f"unknown formulations/modes {bad}; expected {FORMULATIONS} and {MODES}.")
    out_dir = Path(out_dir)
    paths = {"unfused": out_dir / "unfused" / "decoder.onnx", "fused": out_dir / "fused" / "decoder.onnx"}
    t0 = time.perf_counter()
    export_decoder(case.model, paths["unfused"], external_data=external_data)
    export_decoder(case.model, paths["fused"], external_data=external_data, fused=True)
    log.info("exported both baselines in %.1f s", time.perf_counter() - t0)
    for form in formulations:
        base_name = "unfused" if form == "naive" else "fused"
        for mode in modes:
            settings = case.settings.replace(heads=mode)
            heads = None if mode == "dynamic" else case.heads
            base = ir.load(str(paths[base_name]))
            if form == "naive":
                model, _ = apply_var(base, settings, heads, num_layers=case.num_layers, inplace=True)
            else:
                shift = "kernel" if form == "kernel" else form.split("-", 1)[1]
                model, _ = apply_fused_var(base, settings, heads, num_layers=case.num_layers, shift=shift, inplace=True)  # type: ignore[arg-type]
            path = paths[base_name].parent / f"{form}-{mode}.onnx"
            ir.save(model, str(path))  # external tensors keep pointing at the base's data file
            paths[f"{form}-{mode}"] = path
    return paths


# --------------------------------------------------------------------------------------------
# PyTorch per-token comparison: released-code approach vs our reference


def torch_per_token(case: Case, steps: int, rounds: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds per prefill / per decode token in eager PyTorch, batch 1 (released code
    supports batch 1 only): ``released`` = eager attention + ``calibration.released_port`` loops;
    ``reference`` = ``calibration.reference.VarReference`` (dynamic mode, as the released code)."""
    import torch

    from var_export.calibration.reference import VarReference

    one = _first_sample(case)
    settings = one.settings.replace(heads="dynamic")
    result: dict[str, dict[str, float]] = {}
    for name, make in (("released", lambda: _ReleasedRunner(one, settings)), ("reference", lambda: VarReference(one.model, settings))):
        runner = make()
        pre: list[float] = []
        dec: list[float] = []
        with torch.inference_mode():
            for _ in range(rounds):
                times: list[tuple[float, int]] = []
                _torch_steps(runner, one, steps, on_step=lambda dt, i, acc=times: acc.append((dt, i)))
                pre += [dt for dt, i in times if i == 0]
                dec += [dt for dt, i in times if i > 0]
        result[name] = {"prefill_s": statistics.median(pre), "decode_s": statistics.median(dec)}
    return result


def _first_sample(case: Case) -> Case:
    keep = case.attention_mask[0] != 0
    return dataclasses.replace(
        case,
        inputs_embeds=case.inputs_embeds[:1, keep],
        attention_mask=case.attention_mask[:1, keep],
        visual=case.visual[:1, keep],
        decode_embeds=[e[:1] for e in case.decode_embeds],
    )


def _torch_steps(runner: Any, case: Case, steps: int, on_step: Callable[[float, int], None]) -> None:
    import torch

    mask = torch.from_numpy(case.attention_mask)
    pos = torch.from_numpy(case.position_ids())
    visual = torch.from_numpy(case.visual)
    t0 = time.perf_counter()
    out = runner.step(torch.from_numpy(case.inputs_embeds), mask, pos, None, visual, None)
    on_step(time.perf_counter() - t0, 0)
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones(1, 1)], -1)
        visual = torch.cat([visual, visual.new_zeros(1, 1)], -1)
        pos = pos[:, -1:] + 1
        t0 = time.perf_counter()
        out = runner.step(torch.from_numpy(case.decode_embeds[i]), mask, pos, out.present, visual, out.present_sink_mask)
        on_step(time.perf_counter() - t0, i + 1)


class _ReleasedRunner:
    """The released code's approach: eager attention with ``output_attentions``-style probability
    maps, sink indices from ``dim_prospector`` at prefill, ``head_fork`` + the per-head
    ``attn_redist`` loop on every VAR layer (``calibration.released_port``). Batch 1."""

    def __init__(self, case: Case, settings: Any) -> None:
        from var_export.calibration.reference import split_model

        self.case = case
        self.settings = settings
        self.model = case.model
        self.decoder, self.lm_head = split_model(case.model)
        self.var_layers = settings.var_layers(case.num_layers)
        vis = np.flatnonzero(case.visual[0])
        self.im, self.pa = int(vis[0]), int(len(vis))
        self.sinks: dict[int, Any] = {}
        self.prefill = True
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def step(self, embeds, mask, pos, present, visual, past_sink):  # type: ignore[no-untyped-def]
        import torch
        from transformers.cache_utils import DynamicCache

        from var_export.calibration import released_port as rp

        self.prefill = present is None
        cfg = self.decoder.config
        runner = self
        handles = []

        def pre_hook(layer: int):  # type: ignore[no-untyped-def]
            def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
                if runner.prefill and layer in runner.var_layers:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    runner.sinks[layer] = rp.dim_prospector(hidden, runner.settings.sink_dims, runner.settings.tau)
            return hook

        def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):  # type: ignore[no-untyped-def]
            n_rep = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(n_rep, dim=1)  # (B, KV, T, hd) -> (B, H, T, hd)
            v = value.repeat_interleave(n_rep, dim=1)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
            layer = module.layer_idx
            if layer in runner.var_layers:
                s = runner.settings
                w = rp.released_layer(w, runner.sinks[layer], runner.im, runner.pa, rho=s.rho, summ=s.summ, p=s.p, prefill=runner.prefill)
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        from transformers import AttentionInterface

        AttentionInterface.register("released_bench", attention)
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionMaskInterface.register("released_bench", eager_mask)
        old = cfg._attn_implementation
        cfg._attn_implementation = "released_bench"
        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(self.decoder.layers)]
        try:
            cache = DynamicCache(ddp_cache_data=list(present)) if present else DynamicCache(config=cfg)
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_kw: cache})
            logits = self.lm_head(out.last_hidden_state)
        finally:
            cfg._attn_implementation = old
            for h in handles:
                h.remove()
        present_out = [(layer.keys, layer.values) for layer in cache.layers]
        return _Out(logits, present_out, None)


@dataclasses.dataclass
class _Out:
    logits: Any
    present: Any
    present_sink_mask: Any


# --------------------------------------------------------------------------------------------
# The whole benchmark


@dataclasses.dataclass
class BenchConfig:
    sizes: tuple[str, ...] = ("tiny",)  # "tiny" (tiny-llava), "slice" (LLaMA-7B width), "slice-tiny"
    formulations: tuple[str, ...] = FORMULATIONS
    modes: tuple[str, ...] = MODES
    rounds: int = 3  # interleaved rounds per group
    decode_steps: int = 8  # decode tokens per round
    threads: int | None = None  # ORT intra-op threads (None: ORT default)
    group_size: int = 0  # VAR graphs loaded at once next to the baselines (0: all)
    torch_compare: bool = True  # released-code approach vs reference vs ORT, per token
    profile: bool = True  # per-node-type profile where a goal is missed
    slice_spec: SliceSpec = SliceSpec()
    provider: str = "cpu"  # ORT execution provider: cpu | cuda (onnxruntime-gpu)


def make_case(size: str, config: BenchConfig) -> Case:
    steps = config.decode_steps
    if size == "tiny":
        return tiny_llava_case(batch=1, seed=7, decode_steps=steps)
    if size == "slice":
        return slice_case(config.slice_spec, decode_steps=steps)
    if size == "slice-tiny":
        return slice_case(SliceSpec.tiny(), decode_steps=steps)
    raise ConfigError(f"unknown bench size {size!r}; expected tiny, slice or slice-tiny.")


def run_bench(config: BenchConfig, out_dir: Path, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the graphs, time them interleaved, write ``bench.json``, ``bench.png``, ``bench.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: log.info("%s", msg))
    result: dict[str, Any] = {"machine": machine_info(), "config": _config_dict(config), "cases": {}}
    for size in config.sizes:
        say(f"{size}: building the model and inputs")
        case = make_case(size, config)
        say(f"{size}: exporting baselines and writing VAR graphs")
        paths = build_graphs(case, out_dir / "graphs" / size, config.formulations, config.modes)
        result["cases"][size] = _bench_case(case, paths, config, say)
        del case
    write_report(result, out_dir)
    return result


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["slice_spec"] = dataclasses.asdict(config.slice_spec)
    return d


def is_var(name: str) -> bool:
    return name.split("#")[0] not in BASELINES


def _bench_case(case: Case, paths: dict[str, Path], config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    timed = time_graphs(
        paths, case, baselines=BASELINES, rounds=config.rounds, steps=config.decode_steps,
        group_size=config.group_size, threads=config.threads, provider=config.provider,
        say=lambda msg: say(f"{case.name}: {msg}"),
    )
    rows = timed["rows"]
    out: dict[str, Any] = {"info": {**case.info, "batch": case.batch, "prompt_tokens": case.prompt_len,
                                    "var_layers": case.settings.var_layers(case.num_layers), "heads": case.heads},
                           **timed}
    if config.torch_compare:
        say(f"{case.name}: PyTorch per token (released-code approach vs reference)")
        tp = torch_per_token(case, min(config.decode_steps, 4))
        best = min((r for n, r in rows.items() if is_var(n) and n.endswith("dynamic")), key=lambda r: r["median_s"]["decode"], default=None)
        if best is not None:
            tp["ort_var_dynamic_best"] = {"prefill_s": best["median_s"]["prefill"], "decode_s": best["median_s"]["decode"]}
            tp["speedup_vs_released"] = {ph: tp["released"][f"{ph}_s"] / best["median_s"][ph] for ph in ("prefill", "decode")}
        out["torch"] = tp
    if config.profile:
        missed = [n for n, r in rows.items() if is_var(n) and not n.startswith("naive")
                  and any(r["vs_fused"][ph] - 1 > GOALS[ph] for ph in GOALS)]
        if missed:
            say(f"{case.name}: profiling {', '.join(missed)} (goal missed)")
            out["profiles"] = {
                n: op_type_profile(paths[n], case, 2, threads=config.threads, var=is_var(n), provider=config.provider)
                for n in ["fused", *missed]
            }
    return out


def config_for(*, full: bool, threads: int | None = None, smoke: bool = False) -> BenchConfig:
    """full: tiny-llava + LLaMA-7B-width slice; default: tiny-llava + toy slice; smoke: minimal."""
    if smoke:
        return BenchConfig(sizes=("slice-tiny",), rounds=1, decode_steps=2, threads=threads,
                           modes=("dynamic", "hybrid"), torch_compare=True, profile=True)
    if full:
        return BenchConfig(sizes=("tiny", "slice"), rounds=5, decode_steps=16, threads=threads,
                           group_size=1, slice_spec=SliceSpec())
    return BenchConfig(sizes=("tiny", "slice-tiny"), rounds=2, decode_steps=8, threads=threads)
