"""Interleaved timing of decoder graphs with ONNX Runtime (no torch): the core of ``var-export bench``.

    feeds = DecoderFeeds.synthetic(session, prompt_tokens=633, image_tokens=576, decode_steps=8)
    result = time_graphs({"base": "plain.onnx", "var": "var.onnx"}, feeds, baselines=("base",))
    print(markdown_table({"machine": machine_info(), "config": {...}, "cases": {"mine": result}}))

Protocol: the baselines are loaded once, with a second session of the first baseline (the A/A
pair: same graph, two sessions); the other graphs are loaded a few at a time next to them. Each
round runs every loaded graph (prefill + N decode steps with fixed inputs), rotating which goes
first; prefill times and per-token decode times are pooled per graph over the rounds. A ratio is
``median(graph) / median(baseline)``, always reported beside the A/A ratio of the same group: a
ratio inside the A/A noise says nothing.

The model-building harness (tiny-llava and LLaMA-width slices, the PyTorch comparison) lives
outside the package, in ``benchmarks/bench_var.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.contract import DECODER, PAST_SINK_MASK, PRESENT_SINK_MASK, VISUAL_MASK
from var_export.core.errors import ConfigError

log = logging.getLogger(__name__)

GOALS = {"prefill": 0.03, "decode": 0.03}  # max overhead of VAR vs the reference baseline
PHASES = ("prefill", "decode")
AA_SUFFIX = "#aa"  # the second session of the reference baseline

PROVIDERS: dict[str, list[Any]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # CUDA with TF32 MatMul off: fp32 accuracy, to tell TF32 rounding from graph errors
    "cuda-fp32": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
}


# --------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class DecoderFeeds:
    """One batch of decoder inputs, identical for every graph timed (DESIGN.md §3 names). A
    decoder that takes token ids (Optimum, onnxruntime-genai) is fed ``input_ids`` /
    ``decode_ids`` instead of the embeddings; each graph gets the inputs it declares (genai
    graphs have no ``position_ids``)."""

    inputs_embeds: np.ndarray | None  # (B, S, D) float32 prefill; None for token-id decoders
    attention_mask: np.ndarray  # (B, S) int64, left padded
    visual: np.ndarray  # (B, S) bool
    decode_embeds: list[np.ndarray]  # per decode step (B, 1, D): fixed tokens, not sampled
    num_layers: int
    kv_heads: int
    head_dim: int
    var_layer_count: int  # Lv of past_sink_mask when the graph leaves it symbolic
    input_ids: np.ndarray | None = None  # (B, S) int64: token-id decoders
    decode_ids: list[np.ndarray] | None = None  # per decode step (B, 1) int64

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.attention_mask.shape[1])

    def tokens(self, session_inputs: set[str], step: int | None) -> dict[str, np.ndarray]:
        """The token input ``session_inputs`` declares, for the prefill (``step`` None) or a decode
        step; a clear error when these feeds do not have that kind (ids vs embeddings)."""
        if "inputs_embeds" in session_inputs and self.inputs_embeds is not None:
            return {"inputs_embeds": self.inputs_embeds if step is None else self.decode_embeds[step]}
        if "input_ids" in session_inputs and self.input_ids is not None and self.decode_ids is not None:
            return {"input_ids": self.input_ids if step is None else self.decode_ids[step]}
        have = "inputs_embeds" if self.inputs_embeds is not None else "input_ids"
        raise ConfigError(
            f"expected every graph timed together to take the same token input ({have}); found one with "
            f"inputs {sorted(session_inputs)}. Compare token-id decoders with token-id decoders."
        )

    def position_ids(self) -> np.ndarray:
        mask = self.attention_mask.astype(np.int64)
        pos = np.cumsum(mask, -1) - 1
        return np.where(mask == 0, 1, pos).astype(np.int64)  # (B, S), HF left-padding convention

    def valid_rows(self) -> np.ndarray:
        """(B, S) bool: prefill rows that are not padding (padding rows' logits are not compared)."""
        return self.attention_mask != 0

    def without_visual(self) -> DecoderFeeds:
        return dataclasses.replace(self, visual=np.zeros_like(self.visual))

    @classmethod
    def synthetic(
        cls,
        session: Any,
        *,
        prompt_tokens: int,
        image_tokens: int,
        decode_steps: int,
        text_before: int = 5,
        seed: int = 0,
        head_dim: int | None = None,
    ) -> DecoderFeeds:
        """Random embeddings shaped for ``session``'s decoder (batch 1): ``image_tokens`` visual
        positions after ``text_before`` text tokens. Values do not change the cost of a graph
        whose ops all have static, data-independent shapes (DESIGN.md §3)."""
        inputs = {i.name: i for i in session.get_inputs()}
        past = sorted(n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        embeds = inputs.get("inputs_embeds")
        if (embeds is None and "input_ids" not in inputs) or not past:
            raise ConfigError(
                f"expected a decoder with inputs_embeds (or input_ids) and past_key_values.* inputs "
                f"(DESIGN.md §3); found inputs {sorted(inputs)}. Time the bundle's decoder_model_merged.onnx."
            )
        hidden = embeds.shape[-1] if embeds is not None else 0  # token ids: no hidden size needed
        kv, hd = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
        hd = hd if isinstance(hd, int) else head_dim  # genai graphs name it (kv_cache_dim)
        if not all(isinstance(x, int) for x in (hidden, kv, hd)):
            raise ConfigError(f"expected static hidden / KV-head / head dims in {past[0]}; found {hidden}, {kv}, "
                              f"{inputs[past[0]].shape[3]}. Give the head size (var-export bench --head-dim).")
        if text_before + image_tokens > prompt_tokens:
            raise ConfigError(
                f"--image-tokens {image_tokens} + {text_before} text tokens before the image exceed "
                f"--prompt-tokens {prompt_tokens}; raise --prompt-tokens."
            )
        rng = np.random.default_rng(seed)
        visual = np.zeros((1, prompt_tokens), dtype=bool)
        visual[0, text_before : text_before + image_tokens] = True
        sink = inputs.get(PAST_SINK_MASK)
        lv = sink.shape[1] if sink is not None and isinstance(sink.shape[1], int) else len(past)
        ids = embeds is None  # token ids in [1, min(100, vocab)): present in the vocabulary
        logits = next((o.shape for o in session.get_outputs() if o.name == "logits"), None)
        top = min(100, logits[-1]) if logits and isinstance(logits[-1], int) else 100
        return cls(
            inputs_embeds=None if ids else rng.standard_normal((1, prompt_tokens, hidden), dtype=np.float32),
            attention_mask=np.ones((1, prompt_tokens), dtype=np.int64),
            visual=visual,
            decode_embeds=[] if ids else [rng.standard_normal((1, 1, hidden), dtype=np.float32)
                                          for _ in range(decode_steps)],
            num_layers=len(past),
            kv_heads=int(kv),
            head_dim=int(hd),
            var_layer_count=int(lv),
            input_ids=rng.integers(1, top, (1, prompt_tokens), dtype=np.int64) if ids else None,
            decode_ids=[rng.integers(1, top, (1, 1), dtype=np.int64) for _ in range(decode_steps)] if ids else None,
        )


# --------------------------------------------------------------------------------------------
# Running a decoder


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
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    from var_export import kernels

    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), kernels.session_options(model, opts), providers=PROVIDERS[provider])
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), kernels.session_options(proto, opts),
                                providers=PROVIDERS[provider])


@dataclasses.dataclass
class DecodeRun:
    logits: list[np.ndarray]  # prefill (B, S, V), then (B, 1, V) per decode step
    prefill_s: float
    decode_s: list[float]  # per decode step (one token per sample)


def _prefill_feeds(session: Any, feeds: DecoderFeeds) -> dict[str, np.ndarray]:
    b = feeds.batch
    names = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {
        **feeds.tokens(names, None), "attention_mask": feeds.attention_mask, "position_ids": feeds.position_ids(),
    }
    for i in range(feeds.num_layers):
        for kv in ("key", "value"):
            out[f"past_key_values.{i}.{kv}"] = np.zeros((b, feeds.kv_heads, 0, feeds.head_dim), np.float32)
    sink = {i.name: i for i in session.get_inputs()}.get(PAST_SINK_MASK)
    if sink is not None:
        lv = int(sink.shape[1]) if isinstance(sink.shape[1], int) else feeds.var_layer_count
        out[VISUAL_MASK] = feeds.visual
        out[PAST_SINK_MASK] = np.zeros((b, lv, 0), dtype=bool)
    return {k: v for k, v in out.items() if k in names}


def run_decode(session: Any, feeds: DecoderFeeds, steps: int, *, var: bool, keep_logits: bool = True) -> DecodeRun:
    """Prefill + ``steps`` decode steps with fixed next tokens; times ``session.run`` only."""
    names = {i.name for i in session.get_inputs()}
    has_var = VISUAL_MASK in names
    if var and not has_var:
        raise ConfigError("run_decode(var=True) on a graph without the VAR inputs.")
    b = feeds.batch
    out_names = [o.name for o in session.get_outputs()]
    mask, pos, visual = feeds.attention_mask, feeds.position_ids(), feeds.visual
    inputs = _prefill_feeds(session, feeds)
    logits: list[np.ndarray] = []
    times: list[float] = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        outs = session.run(None, inputs)
        times.append(time.perf_counter() - t0)
        res = dict(zip(out_names, outs))
        if keep_logits:
            logits.append(res["logits"])
        if step == steps:
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)  # (B, T + 1)
        visual = np.concatenate([visual, np.zeros((b, 1), bool)], 1)  # (B, T + 1)
        pos = pos[:, -1:] + 1  # (B, 1)
        inputs = {**feeds.tokens(names, step), "attention_mask": mask, "position_ids": pos}
        for i in range(feeds.num_layers):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{i}.{kv}"] = res[f"present.{i}.{kv}"]
        if has_var:
            inputs[VISUAL_MASK] = visual
            inputs[PAST_SINK_MASK] = res[PRESENT_SINK_MASK]
        inputs = {k: v for k, v in inputs.items() if k in names}
    return DecodeRun(logits, times[0], times[1:])


# --------------------------------------------------------------------------------------------
# Interleaved timing


@dataclasses.dataclass
class Timings:
    prefill: list[float] = dataclasses.field(default_factory=list)  # seconds per prefill
    decode: list[float] = dataclasses.field(default_factory=list)  # seconds per decode token

    def median(self, phase: str) -> float:
        xs = getattr(self, phase)
        return statistics.median(xs) if xs else float("nan")


def has_var_inputs(session: Any) -> bool:
    return VISUAL_MASK in {i.name for i in session.get_inputs()}


def interleaved(
    sessions: dict[str, Any], feeds: DecoderFeeds, *, rounds: int, steps: int, warmup: int = 1
) -> dict[str, Timings]:
    """Run every session ``rounds`` times; the order alternates (reversed on odd rounds, rotated).
    A session with the VAR inputs is fed the visual mask (VAR on)."""
    names = list(sessions)
    var = {n: has_var_inputs(sessions[n]) for n in names}
    for name in names:  # warm-up: allocators, thread pools, prepacking
        for _ in range(warmup):
            run_decode(sessions[name], feeds, min(steps, 2), var=var[name], keep_logits=False)
    out = {n: Timings() for n in names}
    for r in range(rounds):
        base = names if r % 2 == 0 else names[::-1]  # odd rounds: reversed order
        k = (r // 2) % len(names)
        order = base[k:] + base[:k]  # ... and rotated every two rounds
        for name in order:
            run = run_decode(sessions[name], feeds, steps, var=var[name], keep_logits=False)
            out[name].prefill.append(run.prefill_s)
            out[name].decode.extend(run.decode_s)
    return out


def _ratios(med: dict[str, dict[str, float]], name: str, base: str) -> dict[str, float]:
    return {ph: med[name][ph] / med[base][ph] for ph in PHASES}


def time_graphs(
    paths: dict[str, Path],
    feeds: DecoderFeeds,
    *,
    baselines: Sequence[str],
    rounds: int = 3,
    steps: int = 8,
    group_size: int = 0,
    threads: int | None = None,
    provider: str = "cpu",
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Time every graph of ``paths`` against ``baselines`` (names in ``paths``; the first is the
    reference of the goals and of the A/A pair), ``group_size`` graphs at a time (0: all).

    Returns ``{"rows": {name: {median_s, vs_<baseline>..., aa, group}}, "groups": [...]}``."""
    ref = baselines[0]
    others = [n for n in paths if n not in baselines]
    size = group_size or len(others) or 1
    groups = [others[i : i + size] for i in range(0, len(others), size)] or [[]]

    def session(name: str) -> Any:
        return ort_session(paths[name], threads=threads, provider=provider)

    base = {n: session(n) for n in baselines}
    base[ref + AA_SUFFIX] = session(ref)
    rows: dict[str, Any] = {}
    groups_out = []
    for g, names in enumerate(groups):
        say(f"group {g + 1}/{len(groups)}: {', '.join(names) or 'baselines'}")
        sessions = {**base, **{n: session(n) for n in names}}
        t = interleaved(sessions, feeds, rounds=rounds, steps=steps)
        med = {n: {ph: t[n].median(ph) for ph in PHASES} for n in sessions}
        aa = _ratios(med, ref + AA_SUFFIX, ref)
        groups_out.append({"graphs": list(sessions), "median_s": med, "aa": aa,
                           "samples": {n: dataclasses.asdict(t[n]) for n in sessions}})
        for n in [*baselines, *names]:
            if n in baselines and n in rows:
                continue  # a baseline's row comes from the first group
            rows[n] = {"median_s": med[n], **{f"vs_{b}": _ratios(med, n, b) for b in baselines},
                       "aa": aa, "group": g}
    return {"rows": rows, "groups": groups_out, "baselines": list(baselines)}


def decoder_path(path: Path) -> Path:
    """A bundle dir -> its decoder graph; an ``.onnx`` file as it is."""
    path = Path(path)
    if path.is_dir():
        path = path / DECODER
    if not path.is_file():
        raise ConfigError(f"expected a bundle dir or a decoder .onnx file; found no file at {path}.")
    return path


def _unique_names(paths: Sequence[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in paths:
        name = path.name if path.is_dir() else path.parent.name if path.name == DECODER else path.stem
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = decoder_path(path)
    return out


def _static_head_dim(paths: Iterable[Path]) -> int | None:
    """The head size some graph's ``past_key_values.0.key`` declares (read without weights)."""
    import onnx

    for path in paths:
        graph = onnx.load(str(decoder_path(Path(path))), load_external_data=False).graph
        for value in graph.input:
            if value.name.startswith("past_key_values.") and value.name.endswith(".key"):
                dims = value.type.tensor_type.shape.dim
                if len(dims) == 4 and dims[3].HasField("dim_value"):
                    return int(dims[3].dim_value)
    return None


def bench_graphs(
    graphs: Sequence[Path],
    baselines: Sequence[Path],
    out_dir: Path,
    *,
    prompt_tokens: int = 633,
    image_tokens: int = 576,
    rounds: int = 3,
    steps: int = 8,
    threads: int | None = None,
    group_size: int = 0,
    provider: str = "cpu",
    head_dim: int | None = None,
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """``var-export bench``: time ``graphs`` against ``baselines`` on one synthetic batch and write
    ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``. Returns the result dict.
    ``head_dim``: the KV cache's head size where no graph's ``past_key_values.*`` declares it."""
    if rounds < 1 or steps < 1:
        raise ConfigError(f"expected --rounds >= 1 and --decode-steps >= 1; found {rounds} and {steps}.")
    named = _unique_names([*baselines, *graphs])
    base_names = list(named)[: len(baselines)]
    probe = next((n for n in named if n not in base_names), base_names[0])
    feeds = DecoderFeeds.synthetic(ort_session(named[probe], provider="cpu"), prompt_tokens=prompt_tokens,
                                   image_tokens=image_tokens, decode_steps=steps,
                                   head_dim=head_dim or _static_head_dim(named.values()))
    timed = time_graphs(named, feeds, baselines=base_names, rounds=rounds, steps=steps,
                        group_size=group_size, threads=threads, provider=provider, say=say)
    info = {"batch": feeds.batch, "prompt_tokens": feeds.prompt_len, "image_tokens": image_tokens,
            "graphs": {n: str(p) for n, p in named.items()}}
    config = {"provider": provider, "rounds": rounds, "decode_steps": steps, "threads": threads}
    result = {"machine": machine_info(), "config": config, "cases": {"graphs": {"info": info, **timed}}}
    write_report(result, out_dir)
    return result


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    """``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench.md").write_text(markdown_table(result))
    try:
        plot(result, out_dir / "bench.png")
    except ImportError:  # matplotlib is optional
        log.warning("matplotlib not installed: no bench.png")


# --------------------------------------------------------------------------------------------
# Profiles


def op_type_profile(
    path: Path, feeds: DecoderFeeds, steps: int, *, threads: int | None, var: bool, provider: str = "cpu"
) -> dict[str, dict[str, float]]:
    """ORT profiler: ms per node type for one prefill and per decode step (after a warm-up run)."""
    warm = 1  # warm-up: prefill + 1 decode step -> 2 model runs, excluded
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads=threads, profile_prefix=str(Path(tmp) / "prof"), provider=provider)
        run_decode(session, feeds, warm, var=var, keep_logits=False)
        run_decode(session, feeds, steps, var=var, keep_logits=False)
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
# Reports


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


def machine_line(result: dict[str, Any]) -> str:
    """``Intel Xeon, 2 cores, ONNX Runtime 1.22 (CPU EP)``: who measured, on what."""
    m = result["machine"]
    provider = str(result.get("config", {}).get("provider", "cpu")).upper()
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu')}, {m.get('cores')} cores{gpu}, ONNX Runtime {m.get('onnxruntime')} ({provider} EP)"


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f} %"


def noise_dominated(row: dict[str, Any], phase: str, baseline: str) -> bool:
    """True when the graph's distance from ``baseline`` is within the A/A noise of its group."""
    return abs(row[f"vs_{baseline}"][phase] - 1) <= abs(row["aa"][phase] - 1)


def _case_table(case: dict[str, Any]) -> list[str]:
    bases = case.get("baselines", ["fused", "unfused"])
    head = " | ".join(f"{ph} vs {b}" for b in bases for ph in PHASES)
    lines = [
        f"| graph | prefill ms | decode ms/token | {head} | A/A (prefill / decode) |",
        "|---|---:|---:|" + "---:|" * (2 * len(bases)) + "---:|",
    ]
    for name, r in case["rows"].items():
        ms = r["median_s"]
        ratios = " | ".join(_pct(r[f"vs_{b}"][ph]) for b in bases for ph in PHASES)
        lines.append(
            f"| {name} | {ms['prefill'] * 1e3:.1f} | {ms['decode'] * 1e3:.2f} | {ratios} | "
            f"{_pct(r['aa']['prefill'])} / {_pct(r['aa']['decode'])} |"
        )
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """The report: one table per case, ratios beside the A/A noise of the same group."""
    m = result["machine"]
    lines = [f"Machine: {machine_line(result)}, load average at start {m.get('load_avg', '?')}.", ""]
    for size, c in result["cases"].items():
        info = c["info"]
        lines += [
            f"### {size}: batch {info['batch']}, prompt {info['prompt_tokens']} tokens, "
            f"VAR layers {info.get('var_layers', '?')}",
            "",
            *_case_table(c),
        ]
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
            for phase in PHASES:
                top = sorted(prof[phase].items(), key=lambda kv: -kv[1])[:8]
                lines.append(f"\nprofile {name} {phase} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars: each graph's extra time vs the reference baseline (%), error bar = |A/A| of its group.
    Rows whose difference is within the A/A noise are drawn apart (below the line, hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 0.9 + 0.42 * max(len(c["rows"]) for c in cases.values()) * len(cases) + 1.2 * len(cases)), squeeze=False)
    for row, (size, c) in enumerate(cases.items()):
        ref = c.get("baselines", ["fused"])[0]
        for col, phase in enumerate(PHASES):
            _plot_phase(axes[row][col], c, ref, phase, f"{size}: {phase}")
    fig.suptitle(f"Price of VAR vs the {ref} no-VAR baseline — {machine_line(result)}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_phase(ax: Any, case: dict[str, Any], ref: str, phase: str, title: str) -> None:
    rows = {n: r for n, r in case["rows"].items() if n != ref}
    clear = [n for n, r in rows.items() if not noise_dominated(r, phase, ref)]
    noisy = [n for n in rows if n not in clear]
    names = clear + noisy  # barh draws bottom-up: reversed below so the clear rows come first
    y = list(range(len(names)))[::-1]
    vals = [(rows[n][f"vs_{ref}"][phase] - 1) * 100 for n in names]
    aa = [abs(rows[n]["aa"][phase] - 1) * 100 for n in names]
    baselines = set(case.get("baselines", ["fused", "unfused"]))
    colors = ["grey" if n in baselines else "tab:blue" for n in names]
    bars = ax.barh(y, vals, xerr=aa, color=colors, capsize=2)
    for bar, n in zip(bars, names):
        if n in noisy:
            bar.set_hatch("//")
            bar.set_alpha(0.45)
    ax.set_yticks(y, names, fontsize=8)
    if clear and noisy:
        ax.axhline(len(noisy) - 0.5, color="black", linewidth=0.6, linestyle=":")
        ax.text(1.0, len(noisy) - 0.45, "below: within A/A noise ", transform=ax.get_yaxis_transform(),
                ha="right", va="bottom", fontsize=7)
    ax.axvline(GOALS[phase] * 100, color="red", linestyle="--", linewidth=1, label=f"goal: +{GOALS[phase]:.0%}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"{phase} time vs {ref} (%)" + (" per decode token" if phase == "decode" else ""))
    ax.set_ylabel("graph")
    ax.set_title(f"{title} (error bar: |A/A| noise)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
