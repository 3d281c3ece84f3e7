"""Export a Qwen2.5-VL-7B-shaped model with random weights end to end in fp16 (issue 14).

    .venv/bin/python -m benchmarks.export_7b_qwen --work /big/qwen7b           # full 7B shape
    .venv/bin/python -m benchmarks.export_7b_qwen --work /tmp/q --layers 2      # quick look

**The model.** Qwen2.5-VL-7B-Instruct's shapes (text: hidden 3584, 28 layers, 28 query / 4 KV
heads, intermediate 18944, vocab 152064, M-RoPE sections 16/24/24; vision: 32 blocks of width
1280, 16 heads, window 112, full-attention blocks 7/15/23/31, merger to 3584) with random fp16
weights, built by ``transformers`` from the tiny Qwen2.5-VL's config with the sizes replaced,
saved with ``save_pretrained`` next to the tiny variant's processor (its small vocabulary only
uses ids below 152064). Nothing is downloaded.

**The measurement.** The tool's own one command runs in a fresh process, exactly as a user
runs it on a local HF directory::

    var-export --model DIR --out BUNDLE --dtype fp16 --heads dynamic --sink-dims 458,2570

Dynamic heads and given sink dims: calibrating random weights would find nothing meaningful
(the hub presets of the families leave sink dims to calibration). Reported: wall time of the
command, its peak RSS (the summed RSS of the command's process tree, polled every 0.5 s),
the bundle's size, and the command's own progress output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
}
QWEN25_VL_7B_VISION = {
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "depth": 32,
    "num_heads": 16,
    "window_size": 112,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "out_hidden_size": 3584,
}
SINK_DIMS = "458,2570"


def _config(layers: int | None, *, tiny_vocab: bool = False):
    """Qwen2.5-VL-7B's config (``layers`` text layers and 2 vision blocks when given)."""
    from transformers import Qwen2_5_VLConfig

    from var_export.calibration import tiny_qwen as tq

    tiny = tq._config("qwen2_5_vl")
    text = {**tq._text_kwargs(tq._vocab()), **QWEN25_VL_7B_TEXT}
    vision = {**tiny.vision_config.to_dict(), **QWEN25_VL_7B_VISION}
    if layers is not None:
        text["num_hidden_layers"] = layers
        vision.update(depth=2, fullatt_block_indexes=[1])
    if tiny_vocab:  # only for the buffers (rotary tables), which do not depend on sizes below
        text.update(num_hidden_layers=1, vocab_size=len(tq._vocab()), intermediate_size=8)
        vision.update(depth=1, fullatt_block_indexes=[0], intermediate_size=8)
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


_BLOCK = 1 << 24


def _fill(flat, block, shift: int) -> None:
    """Fill ``flat`` with N(0, 0.02) values: one random block of 16 M values, copied at a shift that
    differs per parameter (memcpy speed; ``normal_`` on 8 B fp16 values takes minutes here)."""
    shift %= 4099
    for start in range(0, flat.numel(), _BLOCK):
        n = min(_BLOCK, flat.numel() - start)
        flat[start:start + n].copy_(block[shift:shift + n])


def build_model_dir(out: Path, layers: int | None) -> Path:
    """Random fp16 Qwen2.5-VL-7B-shaped model + the tiny variant's processor, saved to ``out``.

    Built on the meta device and materialised from one block of normal values (:func:`_fill`; the
    per-module initialisers of transformers take minutes at this size); the buffers (rotary tables) come
    from a small instance of the same class, built normally."""
    import torch

    from var_export.calibration import tiny_qwen as tq

    if (out / "config.json").exists():
        return out
    t = time.perf_counter()
    cls = tq.model_class("qwen2_5_vl")
    with torch.device("meta"):
        model = cls(_config(layers)).eval()
    model.to_empty(device="cpu")
    model.to(torch.float16)
    small = dict(cls(_config(layers, tiny_vocab=True)).named_buffers())
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(_BLOCK + 4099, generator=gen) * 0.02).to(torch.float16)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "norm" in name or "ln_q" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                _fill(p.view(-1), block, shift=i * 7919)
        for name, b in model.named_buffers():
            b.copy_(small[name].to(b.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.2f} B parameters (fp16) in {time.perf_counter() - t:.0f} s", flush=True)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    processor = tq.build_processor("qwen2_5_vl")
    processor.image_processor.patch_size = QWEN25_VL_7B_VISION["patch_size"]
    processor.save_pretrained(tmp)
    tmp.rename(out)
    print(f"saved to {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _peak_rss_of_tree(pid: int, stop: threading.Event, peak: list[float]) -> None:
    """Poll the summed RSS of ``pid`` and its children (GB) until ``stop``."""
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs) / 2**30)
        except psutil.Error:
            pass
        stop.wait(0.5)


def export(model_dir: Path, bundle: Path, layers: int) -> dict:
    cmd = [sys.executable, "-m", "var_export.cli", "--model", str(model_dir), "--out", str(bundle),
           "--dtype", "fp16", "--heads", "dynamic", "--sink-dims", SINK_DIMS, "--layers", "2:" if layers > 2 else "1:", "-v"]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), [0.0]
    poller = threading.Thread(target=_peak_rss_of_tree, args=(proc.pid, stop, peak), daemon=True)
    poller.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print("  " + line, end="", flush=True)
    rc = proc.wait()
    stop.set()
    poller.join()
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) if bundle.exists() else 0
    return {"rc": rc, "seconds": round(seconds, 1), "peak_rss_gb": round(peak[0], 2),
            "bundle_gb": round(size / 2**30, 2),
            "files": sorted(f.name for f in bundle.iterdir()) if bundle.exists() else []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the model dir and the bundle")
    ap.add_argument("--layers", type=int, help="text layers (default: 28, the 7B shape); vision 2 when set")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--build-only", action="store_true", help="only write the random-weight model dir")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "model"
    if args.build_only:
        build_model_dir(model_dir, args.layers)
        return 0
    if not (model_dir / "config.json").exists():  # its own process: its memory is gone before the export
        cmd = [sys.executable, "-m", "benchmarks.export_7b_qwen", "--work", str(args.work), "--build-only"]
        subprocess.run(cmd + (["--layers", str(args.layers)] if args.layers else []), check=True)
    bundle = args.work / "bundle"
    result = {"layers": args.layers or QWEN25_VL_7B_TEXT["num_hidden_layers"], **export(model_dir, bundle, args.layers or QWEN25_VL_7B_TEXT["num_hidden_layers"])}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
