"""``var-export bench``: the price of VAR, measured side by side in one interleaved run.

Graphs (one decoder each, same weights):

* ``unfused``  no VAR, eager export at opset 18 (MatMul -> Softmax -> MatMul);
* ``fused``    no VAR, SDPA export at opset 23 (ONNX ``Attention``), the fastest baseline;
* ``naive-<mode>``      VAR by ``passes.pipeline.apply_var`` on ``unfused`` (Softmax rewritten);
* ``fused-qk-<mode>``   VAR by ``passes.fused_var`` (class masses + Q/K augmented scores);
* ``fused-mask-<mode>`` VAR by ``passes.fused_var`` (class masses + per-head additive mask);

for mode in dynamic / static / hybrid. Timing protocol: the baselines are loaded once with an extra
session of ``fused`` (the A/A pair: same graph, two sessions); VAR graphs are loaded a few at a time
next to them. Each round runs every loaded graph (prefill + N decode steps), rotating which goes
first; prefill times and per-token decode times are pooled per graph over the rounds. A ratio is
``median(graph) / median(baseline)``, always printed beside the A/A ratio of the same group.

Also, per generated token, in PyTorch: the released code's approach (eager attention, Python
per-head loops: ``calibration.released_port``) vs the vectorised reference
(``calibration.reference``), beside the ORT graphs. Where a goal is missed, ORT's profiler gives
the per-node-type time of the VAR graph and its fused baseline.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import ConfigError

log = logging.getLogger(__name__)

FORMULATIONS: tuple[str, ...] = ("naive", "fused-qk", "fused-mask")
MODES: tuple[str, ...] = ("dynamic", "static", "hybrid")
GOALS = {"prefill": 0.03, "decode": 0.03}  # max overhead vs the fused baseline
RELEASED_SPEEDUP_GOAL = 10.0  # ORT VAR graph vs the released-code approach, per token


# --------------------------------------------------------------------------------------------
# Cases: a model and one batch of decoder inputs


@dataclasses.dataclass
class Case:
    """A torch model plus the decoder inputs every graph is fed (identical for all)."""

    name: str
    model: Any  # LlavaForConditionalGeneration (fp32, eval)
    inputs_embeds: np.ndarray  # (B, S, D) float32 prefill
    attention_mask: np.ndarray  # (B, S) int64, left padded
    visual: np.ndarray  # (B, S) bool
    decode_embeds: list[np.ndarray]  # per decode step (B, 1, D): fixed tokens, not sampled
    settings: Any  # VarSettings
    heads: list[tuple[int, int]]  # calibrated heads used by static / hybrid
    num_layers: int
    kv_heads: int
    head_dim: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.inputs_embeds.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.inputs_embeds.shape[1])

    def position_ids(self) -> np.ndarray:
        mask = self.attention_mask.astype(np.int64)
        pos = np.cumsum(mask, -1) - 1
        return np.where(mask == 0, 1, pos).astype(np.int64)  # (B, S), HF left-padding convention

    def valid_rows(self) -> np.ndarray:
        """(B, S) bool: prefill rows that are not padding (padding rows' logits are not compared)."""
        return self.attention_mask != 0

    def without_visual(self) -> Case:
        return dataclasses.replace(self, visual=np.zeros_like(self.visual))

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
                shift = form.split("-", 1)[1]
                model, _ = apply_fused_var(base, settings, heads, num_layers=case.num_layers, shift=shift, inplace=True)  # type: ignore[arg-type]
            path = paths[base_name].parent / f"{form}-{mode}.onnx"
            ir.save(model, str(path))  # external tensors keep pointing at the base's data file
            paths[f"{form}-{mode}"] = path
    return paths


# --------------------------------------------------------------------------------------------
# Running a decoder


PROVIDERS: dict[str, list[Any]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # CUDA with TF32 MatMul off: fp32 accuracy, to tell TF32 rounding from graph errors
    "cuda-fp32": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
}


def ort_session(
    model: Any, *, threads: int | None = None, profile_prefix: str | None = None, provider: str = "cpu"
) -> Any:
    """An ORT session (CPU, or CUDA with onnxruntime-gpu) from a path or an in-memory onnx-ir model."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"unknown provider {provider!r}; expected one of {sorted(PROVIDERS)}.")
    if provider.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError(
            "provider cuda: this onnxruntime has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu on a CUDA machine."
        )
    providers = PROVIDERS[provider]

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), opts, providers=providers)
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)


@dataclasses.dataclass
class DecodeRun:
    logits: list[np.ndarray]  # prefill (B, S, V), then (B, 1, V) per decode step
    prefill_s: float
    decode_s: list[float]  # per decode step (one token per sample)


def run_decode(session: Any, case: Case, steps: int, *, var: bool, keep_logits: bool = True) -> DecodeRun:
    """Prefill + ``steps`` decode steps with fixed next tokens; times ``session.run`` only."""
    names = {i.name for i in session.get_inputs()}
    has_var = "visual_token_mask" in names
    if var and not has_var:
        raise ConfigError("run_decode(var=True) on a graph without the VAR inputs.")
    b, s = case.attention_mask.shape
    lv = 0
    for i in session.get_inputs():
        if i.name == "past_sink_mask":
            lv = int(i.shape[1]) if isinstance(i.shape[1], int) else len(case.settings.var_layers(case.num_layers))
    out_names = [o.name for o in session.get_outputs()]
    mask, pos, visual = case.attention_mask, case.position_ids(), case.visual
    feeds: dict[str, np.ndarray] = {"inputs_embeds": case.inputs_embeds, "attention_mask": mask, "position_ids": pos}
    for i in range(case.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((b, case.kv_heads, 0, case.head_dim), np.float32)
    if has_var:
        feeds["visual_token_mask"] = visual
        feeds["past_sink_mask"] = np.zeros((b, lv, 0), dtype=bool)
    logits: list[np.ndarray] = []
    decode_s: list[float] = []
    prefill_s = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        outs = session.run(None, feeds)
        dt = time.perf_counter() - t0
        if step == 0:
            prefill_s = dt
        else:
            decode_s.append(dt)
        res = dict(zip(out_names, outs))
        if keep_logits:
            logits.append(res["logits"])
        if step == steps:
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        visual = np.concatenate([visual, np.zeros((b, 1), bool)], 1)
        pos = pos[:, -1:] + 1
        feeds = {"inputs_embeds": case.decode_embeds[step], "attention_mask": mask, "position_ids": pos}
        for i in range(case.num_layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = res[f"present.{i}.{kv}"]
        if has_var:
            feeds["visual_token_mask"] = visual
            feeds["past_sink_mask"] = res["present_sink_mask"]
    return DecodeRun(logits, prefill_s, decode_s)


# --------------------------------------------------------------------------------------------
# Interleaved timing


@dataclasses.dataclass
class Timings:
    prefill: list[float] = dataclasses.field(default_factory=list)  # seconds per prefill
    decode: list[float] = dataclasses.field(default_factory=list)  # seconds per decode token

    def median(self, phase: str) -> float:
        xs = getattr(self, phase)
        return statistics.median(xs) if xs else float("nan")


def interleaved(
    sessions: dict[str, Any], case: Case, *, rounds: int, steps: int, warmup: int = 1
) -> dict[str, Timings]:
    """Run every session ``rounds`` times; the order alternates (reversed on odd rounds, rotated)."""
    names = list(sessions)
    for name in names:  # warm-up: allocators, thread pools, prepacking
        for _ in range(warmup):
            run_decode(sessions[name], case, min(steps, 2), var=_is_var(name), keep_logits=False)
    out = {n: Timings() for n in names}
    for r in range(rounds):
        base = names if r % 2 == 0 else names[::-1]  # odd rounds: reversed order
        k = (r // 2) % len(names)
        order = base[k:] + base[:k]  # ... and rotated every two rounds
        for name in order:
            run = run_decode(sessions[name], case, steps, var=_is_var(name), keep_logits=False)
            out[name].prefill.append(run.prefill_s)
            out[name].decode.extend(run.decode_s)
    return out


def _is_var(name: str) -> bool:
    return name.split("#")[0] not in ("unfused", "fused")


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
        from var_export.calibration.reference import _repeat_kv

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
            k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
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
# Profiles


def op_type_profile(
    path: Path, case: Case, steps: int, *, threads: int | None, var: bool, provider: str = "cpu"
) -> dict[str, dict[str, float]]:
    """ORT profiler: ms per node type for one prefill and per decode step (after a warm-up run)."""
    warm = 1  # warm-up: prefill + 1 decode step -> 2 model runs, excluded
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads=threads, profile_prefix=str(Path(tmp) / "prof"), provider=provider)
        run_decode(session, case, warm, var=var, keep_logits=False)
        run_decode(session, case, steps, var=var, keep_logits=False)
        with open(session.end_profiling()) as f:
            data = json.load(f)
    events = data if isinstance(data, list) else data.get("traceEvents", [])
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warm + 1 :]
    out: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        for i, run in enumerate(runs):
            if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                phase = "prefill" if i == 0 else "decode"
                op = e.get("args", {}).get("op_name", "?")
                out[phase][op] = out[phase].get(op, 0.0) + e["dur"] / 1000.0
                break
    if steps:
        out["decode"] = {k: v / steps for k, v in out["decode"].items()}
    return out


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


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
                            "python": platform.python_version(), "platform": platform.platform()}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        import shutil
        import subprocess

        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False)
            info["gpu"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
    try:
        import psutil

        info["load_avg"] = [round(x, 2) for x in psutil.getloadavg()]
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


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
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(markdown_table(result))
    try:
        plot(result, out_dir / "bench.png")
    except ImportError:  # matplotlib is optional
        log.warning("matplotlib not installed: no bench.png")
    return result


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["slice_spec"] = dataclasses.asdict(config.slice_spec)
    return d


def _bench_case(case: Case, paths: dict[str, Path], config: BenchConfig, say: Callable[[str], None]) -> dict[str, Any]:
    threads = config.threads
    var_names = [n for n in paths if _is_var(n)]
    size = config.group_size or len(var_names)
    groups = [var_names[i : i + size] for i in range(0, len(var_names), size)] or [[]]
    def session(path: Path) -> Any:
        return ort_session(path, threads=threads, provider=config.provider)

    base = {"unfused": session(paths["unfused"]), "fused": session(paths["fused"]), "fused#aa": session(paths["fused"])}
    rows: dict[str, Any] = {}
    groups_out = []
    for g, names in enumerate(groups):
        say(f"{case.name}: group {g + 1}/{len(groups)}: {', '.join(names) or 'baselines'}")
        sessions = dict(base)
        sessions.update({n: session(paths[n]) for n in names})
        t = interleaved(sessions, case, rounds=config.rounds, steps=config.decode_steps)
        med = {n: {ph: t[n].median(ph) for ph in ("prefill", "decode")} for n in sessions}
        aa = {ph: med["fused#aa"][ph] / med["fused"][ph] for ph in ("prefill", "decode")}
        groups_out.append({"graphs": list(sessions), "median_s": med, "aa": aa,
                           "samples": {n: dataclasses.asdict(t[n]) for n in sessions}})
        for n in ["unfused", *names]:
            if n in rows and n == "unfused":
                continue
            rows[n] = {
                "median_s": med[n],
                "vs_fused": {ph: med[n][ph] / med["fused"][ph] for ph in ("prefill", "decode")},
                "vs_unfused": {ph: med[n][ph] / med["unfused"][ph] for ph in ("prefill", "decode")},
                "aa": aa,
                "group": g,
            }
        rows.setdefault("fused", {"median_s": med["fused"], "vs_fused": {"prefill": 1.0, "decode": 1.0},
                                  "vs_unfused": {ph: med["fused"][ph] / med["unfused"][ph] for ph in ("prefill", "decode")},
                                  "aa": aa, "group": g})
        for n in names:
            del sessions[n]
    del base
    out: dict[str, Any] = {"info": {**case.info, "batch": case.batch, "prompt_tokens": case.prompt_len,
                                    "var_layers": case.settings.var_layers(case.num_layers), "heads": case.heads},
                           "rows": rows, "groups": groups_out}
    if config.torch_compare:
        say(f"{case.name}: PyTorch per token (released-code approach vs reference)")
        tp = torch_per_token(case, min(config.decode_steps, 4))
        best = min((r for n, r in rows.items() if _is_var(n) and n.endswith("dynamic")), key=lambda r: r["median_s"]["decode"], default=None)
        if best is not None:
            tp["ort_var_dynamic_best"] = {"prefill_s": best["median_s"]["prefill"], "decode_s": best["median_s"]["decode"]}
            tp["speedup_vs_released"] = {ph: tp["released"][f"{ph}_s"] / best["median_s"][ph] for ph in ("prefill", "decode")}
        out["torch"] = tp
    if config.profile:
        missed = [n for n, r in rows.items() if _is_var(n) and not n.startswith("naive")
                  and any(r["vs_fused"][ph] - 1 > GOALS[ph] for ph in GOALS)]
        if missed:
            say(f"{case.name}: profiling {', '.join(missed)} (goal missed)")
            out["profiles"] = {
                n: op_type_profile(paths[n], case, 2, threads=threads, var=_is_var(n), provider=config.provider) for n in ["fused", *missed]
            }
    return out


# --------------------------------------------------------------------------------------------
# Reports


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f} %"


def markdown_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores{', ' + m['gpu'] if m.get('gpu') else ''}, "
        f"ONNX Runtime {m.get('onnxruntime')} ({result['config'].get('provider', 'cpu').upper()} EP), "
        f"load average at start {m.get('load_avg', '?')}.",
        "",
    ]
    for size, c in result["cases"].items():
        info = c["info"]
        lines += [
            f"### {size}: batch {info['batch']}, prompt {info['prompt_tokens']} tokens, VAR layers {info['var_layers']}",
            "",
            "| graph | prefill ms | decode ms/token | prefill vs fused | decode vs fused | prefill vs unfused | decode vs unfused | A/A (prefill / decode) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in c["rows"].items():
            ms = r["median_s"]
            lines.append(
                f"| {name} | {ms['prefill'] * 1e3:.1f} | {ms['decode'] * 1e3:.2f} | {_pct(r['vs_fused']['prefill'])} | "
                f"{_pct(r['vs_fused']['decode'])} | {_pct(r['vs_unfused']['prefill'])} | {_pct(r['vs_unfused']['decode'])} | "
                f"{_pct(r['aa']['prefill'])} / {_pct(r['aa']['decode'])} |"
            )
        tp = c.get("torch")
        if tp:
            lines += ["", "| per token (batch 1, dynamic heads) | prefill ms | decode ms/token |", "|---|---:|---:|"]
            for name in ("released", "reference", "ort_var_dynamic_best"):
                if name in tp:
                    lines.append(f"| {name} | {tp[name]['prefill_s'] * 1e3:.1f} | {tp[name]['decode_s'] * 1e3:.2f} |")
            if "speedup_vs_released" in tp:
                s = tp["speedup_vs_released"]
                lines.append(f"\nORT VAR graph vs released-code approach: {s['prefill']:.1f}x prefill, {s['decode']:.1f}x per decode token.")
        for name, prof in (c.get("profiles") or {}).items():
            for phase in ("prefill", "decode"):
                top = sorted(prof[phase].items(), key=lambda kv: -kv[1])[:8]
                lines.append(f"\nprofile {name} {phase} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.5 * len(cases)), squeeze=False)
    for row, (size, c) in enumerate(cases.items()):
        names = [n for n in c["rows"] if n != "fused"]
        for col, phase in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            vals = [(c["rows"][n]["vs_fused"][phase] - 1) * 100 for n in names]
            aa = [abs(c["rows"][n]["aa"][phase] - 1) * 100 for n in names]
            ax.barh(names, vals, xerr=aa, color=["grey" if not _is_var(n) else "tab:blue" for n in names])
            ax.axvline(GOALS[phase] * 100, color="red", linestyle="--", linewidth=1)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(f"{size}: {phase} vs fused no-VAR (%), error bar = |A/A|")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
