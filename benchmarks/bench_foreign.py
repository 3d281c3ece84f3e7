"""The price of VAR against the fastest no-VAR graphs people run, in one interleaved CPU run.

    .venv/bin/python -m benchmarks.bench_foreign                       # hidden 1024 slice, 2 layers
    .venv/bin/python -m benchmarks.bench_foreign --hidden 4096 --rounds 3   # LLaMA-7B width (slow)
    .venv/bin/python -m benchmarks.bench_foreign --json docs/bench/foreign.json --md docs/bench/foreign.md

One random-weight LLaMA decoder slice (``LlamaForCausalLM``, head size 128 as LLaMA-2, vocab
32000, ``--layers`` layers), batch 1, a LLaVA-1.5-shaped prompt (5 text + 576 image + 52 text
tokens; ``visual_token_mask`` marks the image tokens) then ``--steps`` decode tokens. Graphs,
all over ``input_ids`` and from the same weights:

* baselines (no VAR): ``genai`` (onnxruntime-genai model builder, fp32 CPU:
  ``GroupQueryAttention`` + ``SkipSimplifiedLayerNormalization``), ``sdpa23`` (torch dynamo,
  opset 23: ONNX ``Attention``), ``eager`` (torch dynamo, eager attention, opset 18);
* VAR by ``var_export.rewrite.rewrite_decoder`` on each, ``dynamic`` and ``hybrid`` (2
  calibrated heads per layer): ``genai+var-*-naive`` (GQA unfused into eager ops on the VAR layers
  that change), ``genai+var-*-fused-qk`` / ``-kernel`` (GQA -> one ONNX ``Attention`` per VAR
  layer, then fused-qk or the ``var_export::VarAttention`` custom op),
  ``sdpa23+var-*-fused-qk`` / ``-kernel`` (its own Attention ops), ``eager+var-*`` (naive formulation);
* ``genai+attention-novar``: genai with every GQA normalised into one ONNX ``Attention``, no VAR
  (the price of the normalisation alone; not a baseline).

Protocol (as ``var_export.timing.interleaved``): all sessions loaded at once, plus a second session
of the first baseline (``genai#aa``: the A/A pair); each round runs every session (prefill +
``--steps`` decode steps), the order reversed on odd rounds and rotated every two; medians of
prefill time and of per-token decode time. Ratios are against the fastest baseline of the same
run per phase, printed beside the A/A ratio. Node counts: the graph as written and as ONNX
Runtime runs it (after its optimizer: ~ kernels per step), total and per VAR layer added.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

IMAGE_TOKENS, TEXT_BEFORE, TEXT_AFTER = 576, 5, 52
SINK_DIMS = (5, 17)


def make_model(hidden: int, layers: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11008 // 4096, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks: BOS and 1/64 of the image-token ids get massive sink dims
        emb = model.model.embed_tokens.weight
        for tok in [1, *range(100, 100 + IMAGE_TOKENS, 64)]:
            emb[tok, list(SINK_DIMS)] = 100.0
    return model


def prompt_ids() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = np.concatenate([[1], rng.integers(3, 100, TEXT_BEFORE - 1), np.arange(100, 100 + IMAGE_TOKENS),
                          rng.integers(3, 100, TEXT_AFTER)])[None].astype(np.int64)  # (1, S)
    visual = np.zeros(ids.shape, bool)
    visual[0, TEXT_BEFORE:TEXT_BEFORE + IMAGE_TOKENS] = True
    return ids, visual


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    n = model.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)],
                                 config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return Decoder().eval()


def export_torch(model, path: Path, *, opset: int, attn: str) -> Path:
    import torch
    from torch.export import Dim

    model.set_attn_implementation(attn)
    n, cfg = model.config.num_hidden_layers, model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    args = (torch.randint(3, 99, (2, 3)), torch.ones(2, 7, dtype=torch.int64), torch.arange(4, 7).expand(2, 3).clone(),
            *(torch.randn(2, kv, 4, hd) for _ in range(2 * n)))
    b, s, p = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    shapes = ({0: b, 1: s}, {0: b, 1: Dim.AUTO}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * n)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_wrapper(model), args, dynamo=True, opset_version=opset, input_names=inputs,
                                    output_names=outputs, dynamic_shapes=shapes, optimize=True)
    program.save(str(path), external_data=True)
    return path


def export_genai(model, out: Path) -> Path:
    """onnxruntime-genai's model builder, as a user runs it (fp32, CPU)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = out.parent / "hf"
    model.save_pretrained(hf)
    special = {0: "<pad>", 1: "<s>", 2: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(hf)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "model.onnx"


def build(work: Path, hidden: int, layers: int) -> dict[str, Path]:
    from var_export.core.settings import VarSettings
    from var_export.rewrite import rewrite_decoder

    model = make_model(hidden, layers)
    heads_n = hidden // 128
    paths = {"genai": export_genai(model, work / "genai"),
             "sdpa23": export_torch(model, work / "sdpa23" / "model.onnx", opset=23, attn="sdpa"),
             "eager": export_torch(model, work / "eager" / "model.onnx", opset=18, attn="eager")}
    hybrid_heads = [(la, h) for la in range(layers) for h in (0, heads_n // 2)]
    for base in ("genai", "sdpa23", "eager"):
        for mode in ("dynamic", "hybrid"):
            s = VarSettings(sink_dims=SINK_DIMS, layers="0:", heads=mode)
            formulations = {"genai": ["naive", "fused-qk", "kernel"], "sdpa23": ["fused-qk", "kernel"]}.get(base, ["auto"])
            for formulation in formulations:
                tag = f"-{formulation}" if len(formulations) > 1 else ""
                out = paths[base].parent / f"var-{mode}{tag}.onnx"
                rewrite_decoder(paths[base], out, s, heads=hybrid_heads if mode == "hybrid" else None,
                                formulation=formulation)
                paths[f"{base}+var-{mode}{tag}"] = out
    paths["genai+attention-novar"] = genai_as_attention(paths["genai"], layers)
    return paths


def genai_as_attention(path: Path, layers: int) -> Path:
    """The genai graph with every GroupQueryAttention as one ONNX Attention, no VAR (what the
    fused formulations start from: the price of the normalisation alone)."""
    import onnx_ir as ir

    from var_export.passes.unfuse_contrib import normalize_contrib

    model = ir.load(str(path))
    normalize_contrib(model, range(layers), target="attention")
    out = path.parent / "attention-novar.onnx"
    ir.save(model, str(out))  # external weights keep their location (same folder)
    return out


def session(path: Path, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    from var_export import kernels

    opts = kernels.session_options(path)  # VarAttention registered for the kernel formulation
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_once(sess, ids: np.ndarray, visual: np.ndarray, steps: int, num_layers: int) -> tuple[float, list[float]]:
    """Prefill + ``steps`` decode steps (fixed next token); feeds by the graph's own input names."""
    have = {i.name: i for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    kv = have["past_key_values.0.key"].shape
    kvh, hd = int(kv[1]), int(kv[3]) if isinstance(kv[3], int) else 128
    mask = np.ones(ids.shape, np.int64)
    pos = np.arange(ids.shape[1])[None]
    lv = num_layers
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "visual_token_mask": visual,
             "past_sink_mask": np.zeros((1, lv, 0), bool)}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros((1, kvh, 0, hd), np.float32)
                  for i in range(num_layers) for k in ("key", "value")})
    times = []
    for _ in range(steps + 1):
        feeds = {k: v for k, v in feeds.items() if k in have}
        t0 = time.perf_counter()
        res = dict(zip(names, sess.run(None, feeds)))
        times.append(time.perf_counter() - t0)
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        visual = np.concatenate([visual, np.zeros((1, 1), bool)], 1)
        pos = pos[:, -1:] + 1
        feeds = {"input_ids": np.array([[42]]), "attention_mask": mask, "position_ids": pos,
                 "visual_token_mask": visual, "past_sink_mask": res.get("present_sink_mask")}
        feeds.update({f"past_key_values.{i}.{k}": res[f"present.{i}.{k}"]
                      for i in range(num_layers) for k in ("key", "value")})
    return times[0], times[1:]


def node_counts(path: Path, optimized: Path) -> dict[str, int]:
    import onnx

    def count(p: Path) -> tuple[int, int]:
        g = onnx.load(str(p), load_external_data=False).graph
        return len(g.node), sum(1 for n in g.node if n.name.startswith(("var/", "unfused/")))

    total, var = count(path)
    opt_total, _ = count(optimized)
    return {"nodes": total, "var_nodes": var, "ort_nodes": opt_total}


def measure(paths: dict[str, Path], layers: int, rounds: int, steps: int, threads: int, work: Path) -> dict:
    ids, visual = prompt_ids()
    names = list(paths)
    sessions, counts = {}, {}
    for name in names:
        opt = work / "optimized" / f"{name}.onnx"
        opt.parent.mkdir(parents=True, exist_ok=True)
        sessions[name] = session(paths[name], threads, opt)
        counts[name] = node_counts(paths[name], opt)
    sessions["genai#aa"] = session(paths["genai"], threads)
    order = list(sessions)
    for name in order:  # warm-up
        run_once(sessions[name], ids, visual, 2, layers)
    pre: dict[str, list[float]] = {n: [] for n in order}
    dec: dict[str, list[float]] = {n: [] for n in order}
    for r in range(rounds):
        base = order if r % 2 == 0 else order[::-1]
        k = (r // 2) % len(order)
        for name in base[k:] + base[:k]:
            p, d = run_once(sessions[name], ids, visual, steps, layers)
            pre[name].append(p)
            dec[name].extend(d)
    med = {n: {"prefill_ms": 1e3 * statistics.median(pre[n]), "decode_ms": 1e3 * statistics.median(dec[n])}
           for n in order}
    baselines = ("genai", "sdpa23", "eager")
    fastest = {ph: min(baselines, key=lambda b: med[b][ph]) for ph in ("prefill_ms", "decode_ms")}
    aa = {ph: med["genai#aa"][ph] / med["genai"][ph] for ph in ("prefill_ms", "decode_ms")}
    rows = {}
    for n in names:
        own = n.split("+")[0]
        counts[n]["added_per_layer"] = (counts[n]["nodes"] - counts[own]["nodes"]) / layers
        counts[n]["ort_added_per_layer"] = (counts[n]["ort_nodes"] - counts[own]["ort_nodes"]) / layers
        rows[n] = {**med[n], **counts[n],
                   "vs_fastest": {ph: med[n][ph] / med[fastest[ph]][ph] for ph in fastest},
                   "vs_own_base": {ph: med[n][ph] / med[n.split("+")[0]][ph] for ph in fastest}}
    return {"rows": rows, "fastest": fastest, "aa": aa, "aa_ms": med["genai#aa"]}


def node_time(path: Path, layers: int, threads: int, runs: int = 3) -> dict[str, dict[str, float]]:
    """ONNX Runtime's profiler on ``path``: kernel time summed per op type (ms), per prefill and
    per decode step; medians over ``runs`` sessions, each profiling prefill + 4 decode steps after
    a warm-up of the same."""
    import collections

    import onnxruntime as ort

    from var_export import kernels

    ids, visual = prompt_ids()
    per_run: dict[str, list[collections.Counter[str]]] = {"prefill": [], "decode": []}
    for _ in range(runs):
        opts = kernels.session_options(path)
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "var_export_bench_foreign_profile")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        run_once(sess, ids, visual, 4, layers)  # warm-up: the profile's first 5 runs
        run_once(sess, ids, visual, 4, layers)
        profile = Path(sess.end_profiling())
        events = json.loads(profile.read_text())
        profile.unlink()
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("cat") == "Session" and e.get("name") == "model_run")[5:10]
        steps = [collections.Counter() for _ in spans]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                for i, (t0, t1) in enumerate(spans):
                    if t0 <= e["ts"] <= t1:
                        steps[i][e["args"]["op_name"]] += e["dur"] / 1e3
        per_run["prefill"].append(steps[0])
        decode: collections.Counter[str] = collections.Counter()
        for step in steps[1:]:
            decode.update({k: v / (len(steps) - 1) for k, v in step.items()})
        per_run["decode"].append(decode)
    return {phase: {op: statistics.median(r.get(op, 0.0) for r in rs) for op in sorted(set().union(*rs))}
            for phase, rs in per_run.items()}


def profile_markdown(result: dict) -> str:
    """Node time (ONNX Runtime's profiler) per graph: all nodes, MatMul, the rest, and the rest's
    change against the graph's own base as a share of that base's total."""
    nt = result["node_time"]
    lines = ["", "Node time (ONNX Runtime profiler, kernel time summed over nodes, median of 3 sessions; "
             "`other` = every node but MatMul: attention, VAR's ops, norms, rotary):", "",
             "| graph | prefill all ms | prefill MatMul | prefill other | other vs own base (% of its all) | "
             "decode all ms | decode MatMul | decode other | other vs own base (% of its all) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def split(t: dict[str, float]) -> tuple[float, float, float]:
        total = sum(t.values())
        return total, t.get("MatMul", 0.0), total - t.get("MatMul", 0.0)
    for name, phases in nt.items():
        base = nt[name.split("+")[0]]
        cells = []
        for ph in ("prefill", "decode"):
            total, mm, other = split(phases[ph])
            b_total, _, b_other = split(base[ph])
            cells += [f"{total:.2f}", f"{mm:.2f}", f"{other:.2f}", f"{(other - b_other) / b_total:+.1%}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    cfg = result["config"]
    aa = result["aa"]
    lines = [
        f"# VAR vs the fastest no-VAR graphs (CPU, {cfg['threads']} threads)",
        "",
        f"LLaMA slice: hidden {cfg['hidden']}, {cfg['layers']} layers, head size 128, vocab 32000; batch 1; "
        f"prompt {TEXT_BEFORE + IMAGE_TOKENS + TEXT_AFTER} tokens (576 image), {cfg['steps']} decode steps x "
        f"{cfg['rounds']} interleaved rounds; VAR on every layer. Made by `python -m benchmarks.bench_foreign` "
        f"on {result['machine']}.",
        "",
        f"A/A (genai, second session): prefill {aa['prefill_ms']:.3f}, decode {aa['decode_ms']:.3f}. "
        f"Fastest baseline: prefill `{result['fastest']['prefill_ms']}`, decode `{result['fastest']['decode_ms']}`.",
        "",
        "| graph | prefill ms | decode ms/token | prefill vs fastest | decode vs fastest | prefill vs own base | "
        "decode vs own base | nodes | nodes added per layer | ORT kernels (nodes after its optimizer) | "
        "kernels added per layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in result["rows"].items():
        vf, vo = r["vs_fastest"], r["vs_own_base"]
        lines.append(
            f"| {n} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {vf['prefill_ms'] - 1:+.1%} | "
            f"{vf['decode_ms'] - 1:+.1%} | {vo['prefill_ms'] - 1:+.1%} | {vo['decode_ms'] - 1:+.1%} | "
            f"{r['nodes']} | {r['added_per_layer']:+.0f} | {r['ort_nodes']} | {r['ort_added_per_layer']:+.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "var_export_bench_foreign")
    ap.add_argument("--only", help="comma-separated VAR graph names to measure (the baselines always are), "
                    "e.g. genai+var-dynamic-naive,genai+var-dynamic-fused-qk: shorter rounds on a busy machine")
    ap.add_argument("--reuse", action="store_true", help="reuse the graphs of an earlier run in --work")
    ap.add_argument("--profile", action="store_true", help="also ONNX Runtime's profiler per graph: node time by "
                    "op type per prefill and decode step (MatMul apart: what VAR adds besides the weights' noise)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    work = args.work / f"h{args.hidden}-L{args.layers}"
    t0 = time.perf_counter()
    saved = work / "paths.json"
    if args.reuse and saved.exists():
        paths = {k: Path(v) for k, v in json.loads(saved.read_text()).items()}
    else:
        paths = build(work, args.hidden, args.layers)
        saved.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    if args.only:
        keep = {"genai", "sdpa23", "eager", *args.only.split(",")}
        unknown = keep - set(paths)
        if unknown:
            ap.error(f"--only: unknown graphs {sorted(unknown)}; expected some of {sorted(paths)}")
        paths = {k: v for k, v in paths.items() if k in keep}
    build_s = time.perf_counter() - t0
    result = measure(paths, args.layers, args.rounds, args.steps, args.threads, work)
    import platform

    result["config"] = {k: getattr(args, k) for k in ("hidden", "layers", "rounds", "steps", "threads")}
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)"
    result["build_s"] = build_s
    if args.profile:
        result["node_time"] = {name: node_time(path, args.layers, args.threads) for name, path in paths.items()}
    md = markdown(result) + (profile_markdown(result) if args.profile else "")
    print(md)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
