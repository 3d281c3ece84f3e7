"""The benchmark configurations used by ``make bench`` and the CI smoke."""

from __future__ import annotations

from var_export.bench import BenchConfig, SliceSpec


def config_for(*, full: bool, threads: int | None = None, smoke: bool = False) -> BenchConfig:
    """full: tiny-llava + LLaMA-7B-width slice; default: tiny-llava + toy slice; smoke: minimal."""
    if smoke:
        return BenchConfig(sizes=("slice-tiny",), rounds=1, decode_steps=2, threads=threads,
                           torch_compare=True, profile=True)
    if full:
        return BenchConfig(sizes=("tiny", "slice"), rounds=5, decode_steps=16, threads=threads,
                           group_size=1, slice_spec=SliceSpec())
    return BenchConfig(sizes=("tiny", "slice-tiny"), rounds=2, decode_steps=8, threads=threads)
