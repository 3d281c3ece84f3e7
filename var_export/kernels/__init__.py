"""The kernel formulation's ONNX Runtime custom op, ``var_export::VarAttention``.

``var_attention.cc`` (attention + VAR in one pass over K and V, DESIGN.md §1) is compiled
against ONNX Runtime's C API headers shipped beside it (``include/``, MIT) into a shared
library, once per machine, on first use:

    path = library_path()              # builds it when missing (a C++17 compiler, ~2 s)
    options = ort.SessionOptions()
    register(options)                  # options.register_custom_ops_library(path)

The library is cached under ``$VAR_EXPORT_CACHE/kernels`` (default ``~/.cache/var-export``),
keyed by the source, the headers, the compiler and the CPU (it is built with
``-march=native``), and written atomically, so concurrent first uses are safe. Set
``VAR_EXPORT_KERNEL_LIB`` to use a library built elsewhere (``var-export kernel --out``).

Any ONNX Runtime >= 1.17 loads it (the kernel asks for C API version 17).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from var_export.core.contract import KERNEL_DOMAIN, KERNEL_OP, KERNEL_OPSET
from var_export.core.errors import ConfigError

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "KERNEL_DOMAIN",
    "KERNEL_OP",
    "KERNEL_OPSET",
    "KernelBuildError",
    "build_library",
    "graph_uses_kernel",
    "library_path",
    "register",
    "session_options",
]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "var_attention.cc"
INCLUDE = HERE / "include"
LIBRARY_NAME = "libvar_attention.so"
ENV_LIBRARY = "VAR_EXPORT_KERNEL_LIB"
ENV_CACHE = "VAR_EXPORT_CACHE"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
COMPILERS = ("c++", "g++", "clang++")


class KernelBuildError(ConfigError):
    """The VarAttention library could not be found or compiled."""


def _compiler() -> str:
    wanted = os.environ.get("CXX")
    for name in ([wanted] if wanted else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    raise KernelBuildError(
        "the kernel formulation compiles var_export/kernels/var_attention.cc on first use and needs a "
        f"C++17 compiler; none found ($CXX, {', '.join(COMPILERS)}). Install one (e.g. `apt-get install "
        f"g++`), or point {ENV_LIBRARY} at a library built elsewhere with `var-export kernel --out`, or "
        "use --formulation fused-qk (no custom op)."
    )


def _cpu_signature() -> str:
    """The CPU features -march=native compiles for (a library is only reused on the same kind)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "var-export"
    )
    return Path(root) / "kernels"


def _build_key(compiler: str, flags: list[str], native: bool) -> str:
    h = hashlib.sha256()
    for path in [SOURCE, *sorted(INCLUDE.glob("*.h"))]:
        h.update(path.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    h.update("\0".join([compiler, version, *flags]).encode())
    if native:
        h.update(_cpu_signature().encode())
    return h.hexdigest()[:16]


def build_library(out: str | os.PathLike[str], *, native: bool = True) -> Path:
    """Compile the kernel into ``out`` (atomically). ``native``: ``-march=native`` (this CPU's
    vector units; AVX-512 where present), else ``-march=x86-64-v3`` (AVX2, portable to x86 CPUs
    since ~2015) on x86-64 and the compiler's default elsewhere."""
    compiler = _compiler()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = ["-march=native"] if native else (["-march=x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else [])
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, *arch, f"-I{INCLUDE}", str(SOURCE), "-o", tmp]
    log.info("building the VarAttention kernel (once per machine): %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KernelBuildError(
                f"compiling {SOURCE.name} failed ({compiler}, exit {done.returncode}):\n{done.stderr.strip()[-3000:]}\n"
                "Use --formulation fused-qk (no custom op), or report this with the compiler's output."
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library_path(*, build: bool = True) -> Path:
    """The kernel library for this machine: ``$VAR_EXPORT_KERNEL_LIB``, else the cached build
    (compiled now when missing and ``build``)."""
    given = os.environ.get(ENV_LIBRARY)
    if given:
        if not Path(given).is_file():
            raise KernelBuildError(f"{ENV_LIBRARY}={given!r} is not a file; expected the library built by `var-export kernel --out`.")
        return Path(given)
    compiler = _compiler()
    path = _cache_dir() / _build_key(compiler, FLAGS, native=True) / LIBRARY_NAME
    if not path.is_file():
        if not build:
            raise KernelBuildError(f"the VarAttention kernel is not built yet (expected {path}).")
        build_library(path)
    return path


def register(options: ort.SessionOptions) -> Path:
    """Register VarAttention with ONNX Runtime session options; returns the library used."""
    path = library_path()
    options.register_custom_ops_library(str(path))
    return path


def graph_uses_kernel(model: Any) -> bool:  # noqa: ANN401 - a path, bytes, onnx.ModelProto or onnx_ir.Model
    """Whether a graph holds VarAttention nodes (its opset imports name the kernel's domain);
    a path is read without its external data."""
    if isinstance(model, (str, os.PathLike)):
        import onnx

        model = onnx.load(os.fspath(model), load_external_data=False)
    elif isinstance(model, bytes):
        import onnx

        model = onnx.load_from_string(model)
    imports = getattr(model, "opset_imports", None)  # onnx_ir.Model: a dict
    if imports is not None:
        return KERNEL_DOMAIN in imports
    return any(op.domain == KERNEL_DOMAIN for op in model.opset_import)


def session_options(model: Any, options: ort.SessionOptions | None = None) -> ort.SessionOptions:  # noqa: ANN401
    """``options`` (new ones when None) with VarAttention registered when ``model`` needs it."""
    import onnxruntime as ort

    options = options if options is not None else ort.SessionOptions()
    if graph_uses_kernel(model):
        register(options)
    return options
