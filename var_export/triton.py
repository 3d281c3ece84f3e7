"""Write a bundle as a Triton Inference Server model repository (ONNX Runtime backend).

Layout (one Triton model per graph of DESIGN.md §3)::

    OUT/
      vision_encoder/config.pbtxt   vision_encoder/1/model.onnx
      embed_tokens/config.pbtxt     embed_tokens/1/model.onnx
      decoder/config.pbtxt          decoder/1/model.onnx  [+ external data, same file name]
      manifest.json                 (copied from the bundle, for reference)

Every config lists every graph input and output with its ONNX data type (``TYPE_FP32``,
``TYPE_INT64``, ``TYPE_BOOL`` ...) and its dims, ``-1`` for a dynamic axis.
``max_batch_size: 0``: the batch axis is part of ``dims`` (the decoder's KV cache and
sink-mask cache are explicit inputs, so the client keeps the state and Triton must not
batch requests together). The caller drives the loop exactly as ``var_export.runtime`` does.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
from var_export.core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

# bundle graph file -> Triton model name
MODEL_NAMES: dict[str, str] = {
    VISION_ENCODER: "vision_encoder",
    EMBED_TOKENS: "embed_tokens",
    DECODER: "decoder",
}

ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


def _io(vi: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
    """(name, Triton data type, dims with -1 for dynamic axes)."""
    tt = vi.type.tensor_type
    dtype = ONNX_TO_TRITON.get(int(tt.elem_type))
    if dtype is None:
        raise BundleError(
            f"graph I/O {vi.name} has ONNX type {onnx.TensorProto.DataType.Name(tt.elem_type)}, "
            "which Triton has no TYPE_ for; expected a numeric or bool tensor. Re-export it."
        )
    if not tt.HasField("shape"):
        raise BundleError(
            f"graph I/O {vi.name} has no shape; Triton needs the rank. Re-export the graph."
        )
    dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return vi.name, dtype, dims


def graph_io(model: onnx.ModelProto) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """Inputs (initializers excluded) and outputs of a graph as (name, Triton type, dims)."""
    init = {t.name for t in model.graph.initializer}
    inputs = [_io(vi) for vi in model.graph.input if vi.name not in init]
    outputs = [_io(vi) for vi in model.graph.output]
    return inputs, outputs


def config_pbtxt(
    name: str,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    *,
    instance_kind: str | None = None,
) -> str:
    """The text of a Triton ``config.pbtxt`` for an ONNX Runtime model."""

    def block(items: list[tuple[str, str, list[int]]]) -> str:
        entries = []
        for io_name, dtype, dims in items:
            entries.append(
                "  {\n"
                f'    name: "{io_name}"\n'
                f"    data_type: {dtype}\n"
                f"    dims: [ {', '.join(str(d) for d in dims)} ]\n"
                "  }"
            )
        return ",\n".join(entries)

    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        "max_batch_size: 0",
        'default_model_filename: "model.onnx"',
        f"input [\n{block(inputs)}\n]",
        f"output [\n{block(outputs)}\n]",
    ]
    if instance_kind is not None:
        lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {instance_kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _bundle_graphs(bundle: Any) -> tuple[Path, dict[str, Path]]:
    """(bundle dir, graph file name -> path) from a Bundle object or a directory."""
    if isinstance(bundle, (str, os.PathLike)):
        try:
            from var_export.bundle import load_bundle
        except ImportError:  # pragma: no cover - bundle module always ships
            load_bundle = None
        if load_bundle is not None:
            bundle = load_bundle(Path(bundle))
        else:
            root = Path(bundle)
            return root, {f: root / f for f in MODEL_NAMES}
    root = Path(bundle.path)
    paths = getattr(bundle, "graphs", None) or getattr(bundle, "paths", None)
    if not isinstance(paths, Mapping):
        paths = {f: root / f for f in MODEL_NAMES}
    return root, {str(k): Path(v) for k, v in paths.items()}


def _external_files(model: onnx.ModelProto) -> list[str]:
    return sorted(
        {
            e.value
            for t in model.graph.initializer
            for e in t.external_data
            if t.data_location == onnx.TensorProto.EXTERNAL and e.key == "location"
        }
    )


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_triton_repository(
    bundle: Any,
    out_dir: str | os.PathLike[str],
    *,
    instance_kind: str | None = None,
    link: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the bundle's three graphs as a Triton model repository in ``out_dir``.

    ``bundle``: a ``var_export.bundle.Bundle`` or a bundle directory (checked by load_bundle).
    ``instance_kind``: None (Triton's default), ``"KIND_GPU"`` or ``"KIND_CPU"``.
    ``link``: hard-link the graph and weight files instead of copying (same filesystem).
    Returns ``out_dir``. Writes into a temporary sibling and renames it into place.
    """
    if instance_kind not in (None, "KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"instance_kind must be None, KIND_GPU or KIND_CPU; found {instance_kind!r}.")
    root, graphs = _bundle_graphs(bundle)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"expected an empty or new directory for the Triton repository; {out} has files. "
            "Choose another --out or remove it."
        )
    from var_export.outputs import Outputs, check_target

    check_target(out, "dir", what="Triton repository")  # replaced only when var-export wrote it
    with Outputs() as tx:
        tmp = tx.stage_dir(out, what="Triton repository")
        for file_name, model_name in MODEL_NAMES.items():
            src = graphs.get(file_name, root / file_name)
            if not src.is_file():
                raise BundleError(
                    f"expected {file_name} in the bundle {root}; found nothing at {src}. "
                    "Re-run `var-export export`."
                )
            model = onnx.load(str(src), load_external_data=False)
            inputs, outputs = graph_io(model)
            version = tmp / model_name / "1"
            version.mkdir(parents=True)
            (tmp / model_name / "config.pbtxt").write_text(
                config_pbtxt(model_name, inputs, outputs, instance_kind=instance_kind)
            )
            _place(src, version / "model.onnx", link)
            # External data is referenced by a path relative to the .onnx: keep its name.
            for rel in _external_files(model):
                data = src.parent / rel
                if not data.is_file():
                    raise BundleError(
                        f"{file_name} references external data {rel}; expected it at {data}, "
                        "found nothing. Copy the whole bundle directory."
                    )
                (version / rel).parent.mkdir(parents=True, exist_ok=True)
                _place(data, version / rel, link)
            log.info("triton: %s (%d inputs, %d outputs)", model_name, len(inputs), len(outputs))
        manifest = root / "manifest.json"
        if manifest.is_file():
            shutil.copy2(manifest, tmp / "manifest.json")
        tx.commit()
    log.info("wrote Triton model repository %s", out)
    return out
