"""``var-export kernel``: build (or locate) the kernel formulation's ONNX Runtime custom op."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
The kernel formulation (--formulation kernel) replaces each VAR layer's attention by
var_export::VarAttention, an ONNX Runtime CPU custom op compiled from
var_export/kernels/var_attention.cc. var-export builds it on first use into its cache
(~/.cache/var-export/kernels, or $VAR_EXPORT_CACHE) for this machine's CPU (-march=native).

  var-export kernel                      build it now if needed and print the library's path
  var-export kernel --out lib.so         write a copy for a serving image; --portable builds it for
                                         any x86-64-v3 CPU (AVX2) instead of this one
  VAR_EXPORT_KERNEL_LIB=lib.so var-export run BUNDLE ...    use a library built elsewhere

Any ONNX Runtime >= 1.17 loads it: session_options.register_custom_ops_library(path).
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="build the kernel formulation's ONNX Runtime custom op (VarAttention) and print its path",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, help="write the library here instead of (only) the cache")
    p.add_argument("--portable", action="store_true", help="with --out: build for x86-64-v3 (AVX2) rather than this CPU")


def run(args: argparse.Namespace) -> int:
    from var_export import kernels
    from var_export.core.errors import ConfigError
    from var_export.outputs import check_target, claim

    if args.portable and args.out is None:
        raise ConfigError("--portable needs --out FILE (the cache holds the build for this CPU).")
    if args.out is None:
        print(kernels.library_path())
        return 0
    check_target(args.out, "file", what="kernel library")  # never replaces a file var-export did not write
    path = kernels.build_library(args.out, native=not args.portable)  # atomic
    claim([path])
    print(path)
    return 0
