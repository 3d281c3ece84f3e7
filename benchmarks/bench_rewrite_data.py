"""Time ``var-export rewrite`` into another folder with a DENSE external-data file: the default
(reflink, else hard link, else copy) against ``--data copy`` (issue 15 item 4).

    .venv/bin/python -m benchmarks.bench_rewrite_data --layers 12     # 5.1 GB dense fp16
    .venv/bin/python -m benchmarks.bench_rewrite_data --layers 32     # the 13.5 GB of LLaMA-2-7B
    .venv/bin/python -m benchmarks.bench_rewrite_data --json out.json --keep

The graph is ``benchmarks.bench_rewrite_7b``'s LLaMA-2-7B-shaped decoder (meta-device export,
hidden 4096, 32 heads, intermediate 11008, vocab 32000) with ``--layers`` layers and its data
file written for real (random bytes, every block allocated: a sparse file hides a copy's cost).
Each mode runs the real CLI (``python -m var_export.cli rewrite ... --out <work>/other-<mode>/``)
in a fresh process; its wall time (process start and imports included; ``startup_s`` is an
import-only run for scale) and its peak RSS (``wait4``'s ``ru_maxrss`` of exactly that process;
it starts from the launcher's resident set at fork, so the torch build runs in a process of its
own and the launcher stays at ~15 MB) are measured, with the input's data file evicted from the
page cache first (``cold``: ``posix_fadvise(DONTNEED)`` on that file only) and/or just written
(``warm``). The printed plan says how the data file got there; the bench checks it against the
files (same inode for a hard link, a different one with the same size and sampled bytes for a
copy) and that the input's data file kept its size, mode and mtime. Outputs are deleted after
each mode, the built graph and its data file at the end (``--keep`` keeps them).

Goal (issue 15 item 4): < 10 s and < 300 MB for the default, whatever the size. ``--data copy``
is bound by the disk (ext4 here: no reflink, so a real copy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_rewrite_7b import DATA, GRAPH, SINK_DIMS

GOAL_SECONDS = 10.0
GOAL_RSS_MB = 300.0
ROOT = Path(__file__).resolve().parents[1]


_BUILD = ("import sys; from pathlib import Path; from benchmarks.bench_rewrite_7b import build_graph; "
          "build_graph(Path(sys.argv[1]), layers=int(sys.argv[2]), dense=True)")


def _rss_mb() -> float:
    """This process's resident set (MB): a floor of every child's measured peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))


def _run(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` to completion: (wall seconds, peak RSS MB of exactly that process, stdout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, stdout


def _same_samples(a: Path, b: Path, count: int = 64, size: int = 4096) -> bool:
    """Equal sizes and equal bytes at ``count`` random offsets (hashing GBs would dominate)."""
    n = a.stat().st_size
    if b.stat().st_size != n:
        return False
    rng = random.Random(0)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off in [0, max(0, n - size)] + [rng.randrange(0, max(1, n - size)) for _ in range(count)]:
            fa.seek(off)
            fb.seek(off)
            if fa.read(size) != fb.read(size):
                return False
    return True


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (only this file's, nothing system-wide): the
    next read comes from the disk, as for weights that were not just written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(graph: Path, mode: str, work: Path, layers: int, cold: bool = True) -> dict:
    """One CLI rewrite of ``graph`` into ``work/other-<mode>/`` with ``--data mode`` (``cold``:
    the input's data file evicted from the page cache first)."""
    out_dir = work / f"other-{mode}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out = out_dir / "decoder_var.onnx"
    data = graph.parent / DATA
    if cold:
        evict(data)
    st = data.stat()
    before = (st.st_size, st.st_mode, st.st_mtime_ns, st.st_ino)
    wall, rss, stdout = _run([sys.executable, "-m", "var_export.cli", "rewrite", str(graph), "--out", str(out),
                              "--data", mode, "--sink-dims", SINK_DIMS, "--heads", "dynamic",
                              "--layers", f"{min(2, layers - 1)}:"])  # DESIGN default 2:
    plan = [line for line in stdout.splitlines() if line.startswith("weights ")]
    out_data = out_dir / f"{out.name}.data"
    same_inode = os.stat(out_data).st_ino == st.st_ino
    after = data.stat()
    numbers = {
        "mode": mode, "cache": "cold" if cold else "warm", "cli_s": wall, "peak_rss_mb": rss, "plan": plan,
        "how": plan[0].split(": ", 1)[1].split(" (")[0] if plan else None,
        "same_inode_as_input": same_inode,
        "bytes_match": same_inode or _same_samples(data, out_data),
        "out_allocated_gb": os.stat(out_data).st_blocks * 512 / 1e9,
        "input_nlink_after": after.st_nlink,
        "input_data_unchanged": before == (after.st_size, after.st_mode, after.st_mtime_ns, after.st_ino),
    }
    shutil.rmtree(out_dir)  # the link / copy goes; the input keeps one link again
    return numbers


def run(work: Path, *, layers: int, modes: tuple[str, ...] = ("auto", "copy"), keep: bool = False,
        caches: tuple[str, ...] = ("cold",)) -> dict:
    t0 = time.perf_counter()
    # The build (torch) runs in its own process: a child's ru_maxrss starts from its parent's
    # resident set at fork, so this process stays small (launcher_rss_mb) for the runs below.
    _run([sys.executable, "-c", _BUILD, str(work), str(layers)])
    graph = work / GRAPH
    st = (work / DATA).stat()
    result = {
        "layers": layers, "graph_build_s": time.perf_counter() - t0,
        "data_gb": st.st_size / 1e9, "data_allocated_gb": st.st_blocks * 512 / 1e9,
        "dense": st.st_blocks * 512 >= st.st_size,
        "launcher_rss_mb": _rss_mb(),
        "startup_s": _run([sys.executable, "-c", "import var_export.cli.rewrite, var_export.rewrite"])[0],
        "runs": [],
    }
    try:
        for cache in caches:
            for mode in modes:
                result["runs"].append(measure(graph, mode, work, layers, cold=cache == "cold"))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    defaults = [r for r in result["runs"] if r["mode"] == "auto"]
    result["goal"] = {"seconds": GOAL_SECONDS, "rss_mb": GOAL_RSS_MB}
    result["default_meets_goal"] = bool(defaults) and all(
        r["cli_s"] < GOAL_SECONDS and r["peak_rss_mb"] < GOAL_RSS_MB for r in defaults)
    return result


def table(result: dict) -> str:
    lines = [
        f"LLaMA-2-7B-shaped decoder, {result['layers']} layers fp16: data file {result['data_gb']:.2f} GB "
        f"({result['data_allocated_gb']:.2f} GB allocated: {'dense' if result['dense'] else 'SPARSE'}); "
        f"CLI startup + imports alone {result['startup_s']:.2f} s; peak RSS includes the launcher's "
        f"{result['launcher_rss_mb']:.0f} MB at fork",
        "",
        "| --data | page cache | how (printed plan) | CLI wall s | peak RSS MB | same inode | bytes match "
        "| input unchanged |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['mode']} | {r['cache']} | {r['how']} | {r['cli_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['same_inode_as_input']} | {r['bytes_match']} | {r['input_data_unchanged']} |")
    lines.append("")
    lines.append(f"default: goal < {GOAL_SECONDS:.0f} s and < {GOAL_RSS_MB:.0f} MB "
                 f"{'met' if result['default_meets_goal'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12, help="decoder layers (12: 5.1 GB, 32: 13.5 GB)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "var_export_bench_data")
    ap.add_argument("--modes", default="auto,copy", help="comma-separated --data modes (default auto,copy)")
    ap.add_argument("--keep", action="store_true", help="keep the built graph and its data file")
    ap.add_argument("--caches", default="cold,warm",
                    help="cold (the input's data file evicted from the page cache first, as after a "
                    "reboot) and/or warm (just written); default cold,warm")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    result = run(args.work / f"L{args.layers}_dense", layers=args.layers,
                 modes=tuple(args.modes.split(",")), keep=args.keep, caches=tuple(args.caches.split(",")))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = all(r["bytes_match"] and r["input_data_unchanged"] for r in result["runs"])
    return 0 if ok and result["default_meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
