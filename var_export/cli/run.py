"""``var-export run BUNDLE --image PATH --prompt TEXT``: greedy generation with ONNX Runtime."""

from __future__ import annotations

import argparse
import sys

from var_export.cli import common

HELP = "generate text with ONNX Runtime from a bundle, an image and a prompt"

DESCRIPTION = """\
Greedy generation from a bundle alone (its graphs and processor files): vision encoder ->
token embeddings -> image features merged at the image tokens -> the decoder loop with the
KV cache and the sink-mask cache. The text is streamed to stdout as it is generated.

The prompt may contain the image token (<image> for LLaVA); then it is used verbatim.
Without it the prompt is formatted with the processor's chat template (image first).

--no-var runs the same VAR bundle with VAR switched off: the decoder gets no visual token,
so no attention row is eligible and it computes exactly the plain decoder. Compare the two
outputs to see what VAR changes.
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", metavar="BUNDLE", nargs="?", help="a bundle directory (var-export export / --out DIR); with --engine, default: the bundle the engines were built from")
    p.add_argument("--engine", metavar="X.plan", help="run TensorRT engines (X.plan and the engines beside it, from build-trt / --out X.plan) instead of ONNX Runtime; needs an NVIDIA GPU")
    p.add_argument("--image", required=True, help="the image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider (default cpu; cuda needs onnxruntime-gpu)")
    p.add_argument("--no-var", action="store_true", help="switch VAR off (feed no visual token) to compare with the baseline")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the bundle files (sizes are still checked)")
    return p


def run(args: argparse.Namespace) -> int:
    from var_export.core.errors import ConfigError
    from var_export.runtime import VarRuntime

    if args.engine:
        from var_export.trt.runtime import TrtRuntime

        runtime = TrtRuntime(args.engine, var=not args.no_var, bundle=args.bundle, verify=not args.no_verify)
    elif args.bundle is None:
        raise ConfigError("run needs a BUNDLE directory (or --engine X.plan).")
    else:
        runtime = VarRuntime(args.bundle, provider=args.provider, var=not args.no_var, verify=not args.no_verify)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = runtime.generate(args.image, args.prompt, max_new_tokens=args.max_new_tokens, stream=stream)
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = result.timings
    common.console.print(
        f"[dim]{len(result.token_ids)} tokens, VAR {'on' if result.var else 'off'}, prompt "
        f"{result.prompt_tokens} tokens; prefill {t['prefill']:.3f} s, decode {t['decode']:.3f} s "
        f"({t['tokens_per_s']:.1f} tok/s), total {t['total']:.2f} s[/]",
        highlight=False,
    )
    return 0
