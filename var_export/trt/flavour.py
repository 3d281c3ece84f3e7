"""Which TensorRT: datacenter ``tensorrt`` (10.x and later) or ``tensorrt_rtx`` (TensorRT-RTX).

Both expose the same builder / ONNX parser API; the differences this project meets are:

* TensorRT-RTX builds **ahead of time without a GPU**, for the compute capabilities it is
  given (``--trt-targets 80,86,89,120``); datacenter TensorRT builds for the GPU it runs on;
* both build strongly typed networks here: precision comes from the graph's dtypes (an fp16
  bundle, ``--dtype fp16``), never from ``BuilderFlag.FP16`` (RTX has no such flag).

``auto`` picks datacenter TensorRT when it is importable and a GPU is present, else
TensorRT-RTX when importable; otherwise :class:`TensorRTUnavailableError` says what to install.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import logging
from collections.abc import Sequence
from typing import Any

from var_export.core.errors import ConfigError, TensorRTUnavailableError

log = logging.getLogger(__name__)

FLAVOURS: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")
MODULES: dict[str, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# RTX targets used when no GPU is present and none are given: Ampere, Ada, Blackwell.
DEFAULT_RTX_TARGETS: tuple[str, ...] = ("80", "86", "89", "120")

INSTALL_HINT = (
    "install TensorRT-RTX (`pip install var-export[trt]`, i.e. tensorrt-rtx-cu12: it builds "
    "engines ahead of time, no GPU needed), or datacenter TensorRT >= 10 (`pip install "
    "tensorrt`) on a machine with an NVIDIA GPU, then run `var-export build-trt BUNDLE --out "
    "engine.plan`. Meanwhile the bundle runs with ONNX Runtime (`var-export run BUNDLE ...`)"
)


@dataclasses.dataclass(frozen=True)
class Flavour:
    """An importable TensorRT and what it can do on this machine."""

    name: str  # "tensorrt" | "tensorrt-rtx"
    trt: Any  # the imported module
    gpus: int  # CUDA devices visible through the driver

    @property
    def version(self) -> str:
        return str(getattr(self.trt, "__version__", "?"))

    @property
    def ahead_of_time(self) -> bool:
        """Builds (and parses) without a GPU."""
        return self.name == "tensorrt-rtx"

    @property
    def can_build(self) -> bool:
        return self.ahead_of_time or self.gpus > 0

    @property
    def label(self) -> str:
        return f"{MODULES[self.name]} {self.version}"


def cuda_device_count() -> int:
    """Number of CUDA devices through the driver API (0 without a driver or GPU)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        try:
            if cuda.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def _import(name: str) -> Any | None:
    """The module of a flavour, or None when missing or a stub (no ``Builder``)."""
    try:
        module = importlib.import_module(MODULES[name])
    except ImportError as exc:
        log.debug("flavour %s: import failed (%s)", name, exc)
        return None
    except Exception as exc:  # a broken install raises anything at import (OSError, RuntimeError)
        log.warning("flavour %s: `import %s` failed: %s", name, MODULES[name], exc)
        return None
    if not hasattr(module, "Builder") or not hasattr(module, "OnnxParser"):
        log.debug("flavour %s: %s has no Builder/OnnxParser (a stub wheel)", name, module)
        return None
    return module


def available_flavours() -> list[str]:
    """The flavours importable here (whether or not this machine can build with them)."""
    return [name for name in FLAVOURS if _import(name) is not None]


def resolve_flavour(requested: str = "auto", *, for_build: bool = True) -> Flavour:
    """The TensorRT to use. ``requested``: ``auto`` | ``tensorrt`` | ``tensorrt-rtx``.

    ``for_build``: also require that this machine can build with it (datacenter TensorRT
    needs a GPU; TensorRT-RTX does not). Raises TensorRTUnavailableError otherwise, and
    ConfigError for an unknown name.
    """
    if requested not in ("auto", *FLAVOURS):
        raise ConfigError(
            f"--trt-flavor must be one of {['auto', *FLAVOURS]}, found {requested!r}."
        )
    names = FLAVOURS if requested == "auto" else (requested,)
    gpus = cuda_device_count()
    found: list[Flavour] = []
    for name in names:
        module = _import(name)
        if module is not None:
            found.append(Flavour(name, module, gpus))
    usable = [f for f in found if f.can_build or not for_build]
    if usable:
        return usable[0]
    if found:  # datacenter TensorRT without a GPU
        raise TensorRTUnavailableError(
            f"expected a CUDA GPU for {found[0].label} (datacenter TensorRT builds for the GPU it "
            f"runs on); found no NVIDIA driver / GPU on this machine. To build an engine, "
            f"{INSTALL_HINT}."
        )
    wanted = " or ".join(MODULES[n] for n in names)
    raise TensorRTUnavailableError(
        f"expected the TensorRT Python package ({wanted}); none is importable here. To build "
        f"an engine, {INSTALL_HINT}."
    )


def compute_capabilities(flavour: Flavour, targets: Sequence[str] | str | None) -> list[Any]:
    """``--trt-targets`` as the flavour's ComputeCapability values (RTX only).

    ``targets``: e.g. ``"80,86,89,120"``, ``["86"]``, ``"current"`` (the GPU here), or None:
    the GPU here when there is one, else :data:`DEFAULT_RTX_TARGETS`. Datacenter TensorRT
    builds for its GPU: targets are refused there.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    if not flavour.ahead_of_time:
        if targets:
            raise ConfigError(
                f"--trt-targets applies to TensorRT-RTX; {flavour.label} builds for the GPU it "
                "runs on. Drop --trt-targets or use --trt-flavor tensorrt-rtx."
            )
        return []
    if not targets:
        targets = ["current"] if flavour.gpus > 0 else list(DEFAULT_RTX_TARGETS)
    enum = flavour.trt.ComputeCapability
    known = [m for m in enum.__members__ if m.startswith("SM")]
    out = []
    for t in targets:
        key = "CURRENT" if t.lower() == "current" else f"SM{t.upper().removeprefix('SM')}"
        if key not in enum.__members__ or key == "NONE":
            raise ConfigError(
                f"--trt-targets: unknown compute capability {t!r}; {flavour.label} knows "
                f"{[k[2:] for k in known]} (or 'current' with a GPU)."
            )
        if key == "CURRENT" and (flavour.gpus < 1 or len(targets) > 1):
            raise ConfigError(
                "--trt-targets current needs a GPU here and stands alone; give compute "
                f"capabilities instead, e.g. {','.join(DEFAULT_RTX_TARGETS)}."
            )
        out.append(getattr(enum, key))
    return out


def target_names(capabilities: Sequence[Any]) -> list[str]:
    """ComputeCapability values -> ``["SM80", ...]`` for the engine manifest."""
    return [str(c).rsplit(".", 1)[-1] for c in capabilities]
