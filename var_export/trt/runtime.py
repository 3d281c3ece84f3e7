"""Generation with TensorRT engines: the ONNX Runtime loop of :mod:`var_export.runtime`, with
each of the three graphs served by its engine.

    rt = TrtRuntime("engine.plan")            # engines + the bundle named by engine.engines.json
    rt.generate("cat.png", "What is in the picture?", max_new_tokens=32).text

:class:`EngineSession` gives a TensorRT engine the small part of ONNX Runtime's
``InferenceSession`` interface that the generation loop uses (``get_inputs``, ``get_outputs``,
``run(names, feeds)``), so prefill, the KV cache, the sink-mask cache (``present_sink_mask``
fed back as ``past_sink_mask``), greedy decoding, EOS and streaming are the very code of
:class:`var_export.runtime.VarRuntime` (:func:`~var_export.runtime.greedy_decode_numpy`).

Its I/O comes from the engine manifest (written at build time from the parsed network), so
feeds are built and checked against the engine's optimization profile without a GPU; running
needs an NVIDIA GPU with CUDA (buffers through torch.cuda) and the flavour that built the
engine. TensorRT-RTX engines run on the compute capabilities they were built for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from var_export.core.errors import (
    BundleError,
    ConfigError,
    TensorRTBuildError,
    TensorRTUnavailableError,
)
from var_export.runtime import VarRuntime
from var_export.trt.build import engine_manifest_path, read_engine_manifest
from var_export.trt.flavour import Flavour, cuda_device_count, resolve_flavour
from var_export.trt.profiles import Profile, check_shapes

log = logging.getLogger(__name__)

# numpy dtype name -> ONNX Runtime's type string (what the generation loop reads)
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)", "bfloat16": "tensor(bfloat16)"}


@dataclasses.dataclass(frozen=True)
class IOMeta:
    """ONNX Runtime's NodeArg look-alike: name, shape (int static, str dynamic), type string."""

    name: str
    shape: list[int | str]
    type: str
    dtype: np.dtype


def _meta(spec: Mapping[str, Any]) -> IOMeta:
    shape = [int(d) if int(d) >= 0 else f"dyn{axis}" for axis, d in enumerate(spec["shape"])]
    dtype = np.dtype(spec["dtype"]) if spec["dtype"] != "bfloat16" else np.dtype(np.float32)
    return IOMeta(spec["name"], shape, _ORT_TYPES.get(spec["dtype"], "tensor(float)"), dtype)


class EngineSession:
    """One engine behind ONNX Runtime's session interface (module doc).

    ``entry``: the engine's record in the engine manifest (io, profiles). ``device``: a
    :class:`CudaDevice`; None builds feeds only (:meth:`feeds`), ``run`` then refuses.
    """

    def __init__(self, path: Path, entry: Mapping[str, Any], flavour: Flavour | None = None,
                 device: CudaDevice | None = None) -> None:
        self.path = Path(path)
        self.inputs = [_meta(s) for s in entry["io"]["inputs"]]
        self.outputs = [_meta(s) for s in entry["io"]["outputs"]]
        self.profile: Profile = {
            name: tuple(tuple(int(d) for d in r) for r in ranges)  # type: ignore[misc]
            for name, ranges in entry["profiles"][0].items()
        }
        self.flavour, self.device = flavour, device
        self._engine: Any = None
        self._context: Any = None

    def get_inputs(self) -> list[IOMeta]:
        return list(self.inputs)

    def get_outputs(self) -> list[IOMeta]:
        return list(self.outputs)

    def feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The engine's inputs from ``feeds``: every input present, cast to the engine's dtype,
        C-contiguous, inside the optimization profile (ConfigError otherwise)."""
        missing = [m.name for m in self.inputs if m.name not in feeds]
        if missing:
            raise BundleError(f"{self.path.name}: no value for engine input(s) {missing}.")
        out = {m.name: np.ascontiguousarray(feeds[m.name], dtype=m.dtype) for m in self.inputs}
        for m in self.inputs:
            static = [(a, d) for a, d in enumerate(m.shape) if isinstance(d, int)]
            got = out[m.name].shape
            if len(got) != len(m.shape) or any(got[a] != d for a, d in static):
                raise ConfigError(
                    f"{self.path.name}: input {m.name} has shape {list(got)}; the engine "
                    f"expects {m.shape}. Rebuild the engines from this bundle."
                )
        check_shapes(self.profile, {k: v.shape for k, v in out.items()}, self.path.name)
        return out

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = self.feeds(feeds)
        if self.device is None or self.flavour is None:
            raise TensorRTUnavailableError(
                f"{self.path.name}: this session has no GPU to run on (built for feeds only)."
            )
        if self._context is None:
            self._engine, self._context = self.device.load(self.flavour, self.path)
        names = list(output_names) if output_names else [m.name for m in self.outputs]
        dtypes = {m.name: m.dtype for m in self.outputs}
        return self.device.execute(self._context, arrays, names, dtypes)


class CudaDevice:
    """CUDA buffers and a stream for executing engines (through torch.cuda).

    Raises TensorRTUnavailableError, saying what is missing, on a machine without an NVIDIA
    GPU or without a CUDA build of torch.
    """

    def __init__(self) -> None:
        if cuda_device_count() < 1:
            raise TensorRTUnavailableError(
                "expected an NVIDIA GPU and driver to run TensorRT engines; found none on this "
                "machine. Engines build here ahead of time (TensorRT-RTX), but running them needs "
                "a GPU: copy X.plan, its .engines.json and the bundle to one, or run the bundle "
                "with ONNX Runtime (`var-export run BUNDLE`)."
            )
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError(
                f"expected a CUDA build of torch to hold the engines' buffers; torch "
                f"{torch.__version__} has no CUDA. Install a CUDA torch on this GPU machine."
            )
        self.torch = torch
        self.stream = torch.cuda.Stream()

    def load(self, flavour: Flavour, path: Path) -> tuple[Any, Any]:
        trt = flavour.trt
        from var_export.trt.parser import make_logger

        logger = make_logger(flavour)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise TensorRTBuildError(
                f"{flavour.label} could not load {path} on this GPU: "
                f"{' | '.join(logger.errors[-3:]) or 'no detail'}. TensorRT-RTX engines run only "
                "on the compute capabilities they were built for (--trt-targets)."
            )
        context = engine.create_execution_context()
        self._keep = (runtime, logger)
        return engine, context

    def _buffer(self, shape: Sequence[int], dtype: np.dtype) -> Any:
        torch = self.torch
        tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        n = int(np.prod(shape)) if len(shape) else 1
        return torch.empty(max(n, 1), dtype=tdtype, device="cuda")  # never a null address

    def execute(self, context: Any, feeds: Mapping[str, np.ndarray], outputs: Sequence[str],
                dtypes: Mapping[str, np.dtype]) -> list[np.ndarray]:
        torch = self.torch
        keep = []
        for name, array in feeds.items():
            buf = self._buffer(array.shape, array.dtype)
            if array.size:
                buf[: array.size].copy_(torch.from_numpy(array.reshape(-1)))
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, buf.data_ptr())
            keep.append(buf)
        results: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for name in [*outputs, *[n for n in dtypes if n not in outputs]]:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            buf = self._buffer(shape, dtypes[name])
            context.set_tensor_address(name, buf.data_ptr())
            results[name] = (buf, shape)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTBuildError("TensorRT failed to execute the engine (see the log).")
        self.stream.synchronize()
        return [
            results[n][0][: int(np.prod(results[n][1]))].cpu().numpy().reshape(results[n][1])
            for n in outputs
        ]


def engine_sessions(plan: Path, manifest: Mapping[str, Any], device: CudaDevice | None,
                    *, verify: bool = True) -> dict[str, EngineSession]:
    """One :class:`EngineSession` per engine of the manifest (sha256 checked when ``verify``)."""
    from var_export.bundle import sha256_file

    flavour = resolve_flavour(manifest["flavour"], for_build=False) if device else None
    sessions = {}
    for name, entry in manifest["engines"].items():
        path = Path(plan).parent / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or (
            verify and sha256_file(path) != entry["sha256"]
        ):
            raise BundleError(
                f"engine {path} is missing or differs from {engine_manifest_path(plan).name}; "
                "rebuild the engines (`var-export build-trt BUNDLE --out X.plan`)."
            )
        sessions[name] = EngineSession(path, entry, flavour, device)
    return sessions


class TrtRuntime(VarRuntime):
    """:class:`var_export.runtime.VarRuntime` with its three sessions served by TensorRT
    engines. ``plan``: the decoder engine (``X.plan``); the other engines, the engine manifest
    and the bundle (for the processor files) are found from it; ``bundle`` overrides the last."""

    def __init__(self, plan: str | os.PathLike[str], var: bool = True, *,
                 bundle: str | os.PathLike[str] | None = None, verify: bool = True) -> None:
        self.plan = Path(plan)
        self.engine_manifest = read_engine_manifest(self.plan)
        if bundle is None:
            if not self.engine_manifest.get("bundle"):
                raise BundleError(
                    f"{engine_manifest_path(self.plan)} names no bundle (engines built from a "
                    "lone .onnx); pass the bundle directory for the processor files."
                )
            bundle = self.plan.parent / self.engine_manifest["bundle"]
        self._verify_engines = verify
        super().__init__(bundle, provider="tensorrt", var=var, verify=verify)

    def _open_sessions(self, provider: str) -> dict[str, Any]:
        device = CudaDevice()  # a clear TensorRTUnavailableError without a GPU
        return engine_sessions(self.plan, self.engine_manifest, device, verify=self._verify_engines)
