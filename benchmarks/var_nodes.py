"""What VAR adds per decoder layer: node counts of each formulation on tiny-llava's prefill graph.

    python benchmarks/var_nodes.py [--out DIR]

Exports tiny-llava's decoder (eager fp32, eager fp16, SDPA/opset-23 fp32), applies VAR
(naive on the eager graphs, fused qk/mask and kernel on the SDPA graph, dynamic and hybrid heads) and
prints, per formulation: nodes added per VAR layer, per graph, the per-layer nodes whose
output is (B, H, S, T)-shaped (symbolic last two dims after shape inference: full passes over
the attention matrix), and what onnx-ir's CSE would still remove from the VAR graph beyond
the exporter's own duplicates (0 = no duplicate subexpression).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from var_export.core.settings import VarSettings


def export_graphs(out: Path) -> dict[str, Path]:
    from transformers import LlavaForConditionalGeneration

    from var_export.calibration import tiny_llava as tl
    from var_export.export import export_decoder

    model = LlavaForConditionalGeneration.from_pretrained(tl.tiny_llava_dir(), attn_implementation="eager").eval()
    paths = {"eager": out / "eager.onnx", "eager16": out / "eager16.onnx", "sdpa": out / "sdpa.onnx"}
    for name, options in (("eager", {}), ("eager16", {"dtype": "fp16"}), ("sdpa", {"fused": True})):
        if not paths[name].exists():  # an --out folder from an earlier run is reused
            export_decoder(model, paths[name], **options)
    return paths


def _cse_removed(model: ir.Model) -> int:
    model = model.clone()
    n = model.graph.num_nodes()
    CommonSubexpressionEliminationPass()(model)
    return n - model.graph.num_nodes()


def layer_counts(base: ir.Model, model: ir.Model) -> dict[str, object]:
    per: collections.Counter[str] = collections.Counter()
    bhst: collections.Counter[str] = collections.Counter()
    for node in model.graph:
        if not node.name.startswith("var/"):
            continue
        m = re.match(r"var/L(\d+)/", node.name)
        key = m.group(1) if m else "graph"
        per[key] += 1
        shape = node.outputs[0].shape
        if shape is not None and len(shape) == 4 and not any(isinstance(d, int) for d in shape[2:]):
            bhst[key] += 1
    layers = sorted(k for k in per if k != "graph")
    return {
        "per_layer": per[layers[0]] if layers else 0,
        "per_graph": per["graph"],
        "bhst_per_layer": bhst[layers[0]] if layers else 0,
        "added": model.graph.num_nodes() - base.graph.num_nodes(),
        "duplicates": _cse_removed(model) - _cse_removed(base),
    }


def main() -> None:
    from var_export.calibration import tiny_llava as tl
    from var_export.passes.fused_var import apply_fused_var
    from var_export.passes.pipeline import apply_var

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the exported graphs, reused when they are there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_graphs(args.out or Path(tmp))
        heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
        print("| formulation | heads | nodes / VAR layer | (B,H,S,T) nodes / layer | nodes / graph | added | duplicates |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("dynamic", "hybrid"):
            settings = VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads=mode, layers="2:")
            runs = [("naive fp32", "eager", None), ("naive fp16", "eager16", None),
                    ("fused-qk", "sdpa", "qk"), ("fused-mask", "sdpa", "mask"), ("kernel", "sdpa", "kernel")]  # fmt: skip
            for name, graph, shift in runs:
                base = ir.load(str(paths[graph]))
                if shift is None:
                    model, _ = apply_var(base, settings, heads)
                else:
                    model, _ = apply_fused_var(base, settings, heads, shift=shift)
                c = layer_counts(base, model)
                print(f"| {name} | {mode} | {c['per_layer']} | {c['bhst_per_layer']} | {c['per_graph']} "
                      f"| {c['added']} | {c['duplicates']} |")  # fmt: skip


if __name__ == "__main__":
    main()
