"""``python -m benchmarks.bench_trt --out DIR``: parse and build every graph with each TensorRT here.

Per graph: the real parser's verdict (and the hand lint's), build seconds and engine size, for
every flavour importable on this machine (TensorRT-RTX builds without a GPU; datacenter
TensorRT only with one). Graphs: tiny-llava's vision encoder and embedding, its decoder naive
VAR / no-VAR, fused no-VAR / fused VAR (``qk`` and ``mask`` shift), in fp32 and fp16; with
``--slice`` (or ``--slice-only``), a LLaMA-7B-width 2-layer decoder slice (hidden 4096, 32 heads,
fp16 to keep it small): naive and fused, VAR and no-VAR. ``--opt-levels default,0`` builds each graph at each builder
optimization level. Profiles: batch 1..2, 128 new tokens, 1024 cached (the slice), 64 / 64
(tiny-llava). Prints a markdown table; writes DIR/trt_table.md and DIR/trt.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from var_export import trt
from var_export.core.errors import VarExportError

log = logging.getLogger("bench_trt")


def tiny_llava_graphs(out: Path) -> dict[str, Path]:
    """tiny-llava exported with `var-export`'s own library calls (dynamic heads for VAR)."""
    from var_export.calibration import tiny_llava as tl
    from var_export.core.settings import VarSettings
    from var_export.export import export_decoder, export_embed_tokens, export_vision_encoder
    from var_export.models import load_llava, resolve_model
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var, save_model

    model = load_llava(resolve_model("tiny-llava")).model
    paths = {"tiny vision_encoder": out / "vision_encoder.onnx", "tiny embed_tokens": out / "embed_tokens.onnx"}
    export_vision_encoder(model, paths["tiny vision_encoder"])
    export_embed_tokens(model, paths["tiny embed_tokens"])
    settings = VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads="dynamic", layers="2:")
    forms = {"naive": ({}, [None]), "fused": ({"fused": True}, ["qk", "mask"]),
             "fp16": ({"dtype": "fp16"}, [None]), "fused fp16": ({"fused": True, "dtype": "fp16"}, ["qk", "mask"])}
    for form, (kw, shifts) in forms.items():
        folder = form.replace(" ", "-")
        base = out / f"{folder}-novar" / "decoder_model_merged.onnx"
        base.parent.mkdir(parents=True, exist_ok=True)
        export_decoder(model, base, **kw)
        paths[f"tiny decoder {form} no-VAR"] = base
        for shift in shifts:
            if shift is None:
                var, _ = apply_var(ir.load(str(base)), settings, None, num_layers=4)
            else:
                var, _ = apply_fused_var(ir.load(str(base)), settings, None, num_layers=4, shift=shift)
            label = "VAR" if shift is None else f"VAR ({shift} shift)"
            path = out / f"{folder}-{shift or 'var'}" / "decoder_model_merged.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(var, path)
            paths[f"tiny decoder {form} {label}"] = path
    return paths


def slice_graphs(out: Path) -> dict[str, Path]:
    """The LLaMA-7B-width 2-layer slice of the VAR benchmark, exported in fp16: naive no-VAR / VAR,
    fused (SDPA export, ONNX ``Attention``) no-VAR / VAR with the ``qk`` and ``mask`` shifts."""
    from benchmarks.bench_var import SliceSpec, slice_case
    from var_export.export import export_decoder
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var, save_model

    case = slice_case(SliceSpec(), decode_steps=1)
    settings = case.settings.replace(heads="dynamic")
    paths: dict[str, Path] = {}
    for form, kw, shifts in (("", {}, [None]), (" fused", {"fused": True}, ["qk", "mask"])):
        folder = "slice" + form.replace(" ", "-")
        base = out / f"{folder}-novar" / "decoder_model_merged.onnx"
        base.parent.mkdir(parents=True, exist_ok=True)
        export_decoder(case.model, base, dtype="fp16", external_data=True, **kw)
        paths[f"7B-width slice fp16{form} no-VAR"] = base
        for shift in shifts:
            if shift is None:
                var, _ = apply_var(ir.load(str(base)), settings, None, num_layers=case.num_layers)
            else:
                var, _ = apply_fused_var(ir.load(str(base)), settings, None, num_layers=case.num_layers,
                                         shift=shift)
            path = out / f"{folder}-{shift or 'var'}" / "decoder_model_merged.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(var, path)
            paths[f"7B-width slice fp16{form} VAR" + (f" ({shift} shift)" if shift else "")] = path
    return paths


def measure(name: str, graph: Path, flavour: str, out: Path, config: trt.BuildConfig) -> dict[str, Any]:
    chosen = trt.resolve_flavour(flavour)
    t = time.perf_counter()
    real = trt.parser_lint(chosen, graph)
    parse_s = time.perf_counter() - t
    hand = trt.lint_for_tensorrt(graph)
    row: dict[str, Any] = {
        "graph": name, "flavour": chosen.label, "nodes": sum(hand.op_counts.values()),
        "parser_ok": real.ok, "hand_ok": hand.ok, "parse_s": round(parse_s, 2),
        "errors": [f.message[:160] for f in real.errors][:1],
    }
    row["opt_level"] = "default" if config.opt_level is None else config.opt_level
    plan = out / "engines" / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".plan")
    try:
        engines = trt.build_engines(graph, plan, config)
        entry = next(iter(engines.manifest["engines"].values()))
        row.update(build_s=entry["build_seconds"], engine_mb=round(entry["bytes"] / 1e6, 1),
                   decomposable=entry["attention_decomposable"])
    except VarExportError as exc:
        row.update(build_s=None, engine_mb=None, build_error=str(exc)[:200])
    log.info("%s", row)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| graph | flavour | nodes | parser | hand lint | parse s | opt level | build s | engine MB |",
             "|---|---|---:|---|---|---:|---|---:|---:|"]
    for r in rows:
        verdict = "ok" if r["parser_ok"] else "rejected: " + (r["errors"][0] if r["errors"] else "?")
        build = f"{r['build_s']:.1f}" if r.get("build_s") is not None else "failed: " + r.get("build_error", "?")
        size = f"{r['engine_mb']:.1f}" if r.get("engine_mb") is not None else "-"
        lines.append(f"| {r['graph']} | {r['flavour']} | {r['nodes']} | {verdict} | "
                     f"{'ok' if r['hand_ok'] else 'rejected'} | {r['parse_s']:.2f} | {r['opt_level']} | {build} | {size} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_trt", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("build/bench_trt"))
    p.add_argument("--slice", action="store_true", help="also the LLaMA-7B-width slice (fp16, minutes, ~6 GB RAM)")
    p.add_argument("--slice-only", action="store_true", help="only the slice's graphs")
    p.add_argument("--targets", default="86", help="TensorRT-RTX targets (default 86)")
    p.add_argument("--opt-levels", default="default", help="builder optimization levels, e.g. default,0 (default: TensorRT's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    graphs = {} if args.slice_only else tiny_llava_graphs(args.out / "tiny")
    if args.slice or args.slice_only:
        graphs.update(slice_graphs(args.out / "slice"))
    levels = [None if v == "default" else int(v) for v in args.opt_levels.split(",")]
    rows = []
    for flavour in trt.available_flavours():
        for name, graph in graphs.items():
            small = "slice" not in name
            for level in levels:
                config = trt.BuildConfig(
                    flavour=flavour, targets=args.targets if flavour == "tensorrt-rtx" else None,
                    max_batch=2, max_seq=64 if small else 128, max_past=64 if small else 1024, opt_level=level,
                )
                rows.append(measure(name, graph, flavour, args.out, config))
    text = table(rows)
    print(text)
    (args.out / "trt_table.md").write_text(text + "\n")
    (args.out / "trt.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
