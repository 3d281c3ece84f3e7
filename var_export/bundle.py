"""The bundle directory of DESIGN.md §3: three graphs, calibration, processor files, manifest.

    out_dir/
      vision_encoder.onnx  embed_tokens.onnx  decoder_model_merged.onnx  [*.onnx.data]
      calibration.json     (when calibrated)
      tokenizer.json, processor_config.json, ... (processor.save_pretrained)
      manifest.json        schema_version, files {name: {sha256, bytes}}, io, model_id,
                           fingerprint, var, var_layers, head_mode, opset, tool_versions, created

``write_bundle`` builds the bundle in a staging folder beside ``out_dir`` and renames it into
place (:mod:`var_export.outputs`): an existing ``out_dir`` is replaced only when var-export wrote
it (its ``.var-export-owned`` marker lists every file in it), and only after the new bundle is
complete. ``load_bundle`` validates manifest.json (:class:`var_export.core.schemas.BundleManifest`)
and checks every file it lists (presence, size, SHA-256), external data files included: a graph
that refers to a data file the manifest does not list is refused.

Torch-free: only onnx (graph headers, never the weights) and the standard library.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from var_export.core.contract import (
    CALIBRATION,
    DECODER,
    EMBED_TOKENS,
    GRAPH_FILES,
    MANIFEST,
    VISION_ENCODER,
)
from var_export.core.errors import BundleError, UnsafeInputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REQUIRED_GRAPHS: tuple[str, ...] = GRAPH_FILES
# Packages whose versions are recorded in the manifest (distribution names).
TOOL_PACKAGES: tuple[str, ...] = (
    "var-export",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnx-ir",
)
# Keys of the manifest that write_bundle fills itself; manifest_fields may not set them.
_RESERVED = ("schema_version", "files", "io", "tool_versions", "created")
_REQUIRED_FIELDS = ("model_id", "fingerprint")
_CHUNK = 1 << 20


@dataclasses.dataclass
class Bundle:
    """A verified bundle directory."""

    path: Path
    manifest: dict[str, Any]
    graphs: dict[str, Path]  # graph file name (e.g. "decoder_model_merged.onnx") -> path

    @property
    def decoder(self) -> Path:
        return self.graphs[DECODER]

    @property
    def vision_encoder(self) -> Path:
        return self.graphs[VISION_ENCODER]

    @property
    def embed_tokens(self) -> Path:
        return self.graphs[EMBED_TOKENS]

    @property
    def calibration_path(self) -> Path | None:
        return self.path / CALIBRATION if CALIBRATION in self.manifest["files"] else None

    def calibration(self) -> dict[str, Any] | None:
        p = self.calibration_path
        return json.loads(p.read_text()) if p is not None else None

    @property
    def var(self) -> dict[str, Any] | None:
        """VAR settings (``VarSettings.to_dict()``), or None for a ``--no-var`` bundle."""
        return self.manifest.get("var")

    @property
    def var_layers(self) -> list[int]:
        return list(self.manifest.get("var_layers") or [])

    def io(self, graph: str) -> dict[str, list[str]]:
        return self.manifest["io"][graph]


# ---------------------------------------------------------------------------------------------
# Helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TOOL_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _check_relative(name: str, where: str) -> None:
    """A file name inside the bundle: relative, POSIX, no '..' (manifests come from elsewhere)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or name.startswith("~"):
        raise UnsafeInputError(
            f"{where} names the file {name!r}; expected a plain relative path inside the bundle. "
            "Refusing to read or write outside the bundle directory; re-export the bundle."
        )


def graph_io(path: Path) -> dict[str, list[str]]:
    """Input and output names of a graph, read without loading its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise BundleError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); expected a graph "
            "written by var-export export. Re-export it."
        ) from exc
    initializers = {t.name for t in model.graph.initializer}
    return {
        "inputs": [i.name for i in model.graph.input if i.name not in initializers],
        "outputs": [o.name for o in model.graph.output],
    }


def external_data_files(path: Path) -> list[str]:
    """Relative names of the external data files a graph refers to (without loading them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: list[str] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            raise BundleError(f"{path}: tensor {tensor.name!r} is external but has no location.")
        _check_relative(location, f"{path.name} (external data of {tensor.name!r})")
        if location not in names:
            names.append(location)
    return names


def _all_tensors(graph: Any) -> Iterable[Any]:
    """Initializers and tensor attributes of a GraphProto and its subgraphs."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _place(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``. Never a hard link: onnx refuses external data files with more
    than one link ("potential hardlink attack"), and a link would let edits reach the source."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _opset_of(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


# ---------------------------------------------------------------------------------------------
# Write


def write_bundle(
    out_dir: Path,
    *,
    graphs: Mapping[str, Path],
    manifest_fields: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
    processor: Any = None,
    extra_files: Iterable[Path | tuple[str, Path]] = (),
) -> Path:
    """Write a bundle atomically; returns ``out_dir``.

    ``graphs``: bundle file name -> source .onnx (the three of DESIGN.md §3 are required; their
    external data files are found from the graph and copied beside it).
    ``manifest_fields``: ``model_id`` and ``fingerprint`` (required), ``var`` (settings dict or
    None for ``--no-var``), ``var_layers``, ``head_mode``, ``opset`` (default: the decoder's),
    and anything else worth recording. ``processor``: saved with ``save_pretrained``.
    ``extra_files``: paths (kept under their file name) or (name, path) pairs.
    """
    out_dir = Path(out_dir)
    missing = [g for g in REQUIRED_GRAPHS if g not in graphs]
    if missing:
        raise BundleError(
            f"a bundle needs the graphs {list(REQUIRED_GRAPHS)}; missing {missing}. "
            "Export them with var_export.export.export_graphs first."
        )
    lacking = [k for k in _REQUIRED_FIELDS if not manifest_fields.get(k)]
    if lacking:
        raise BundleError(
            f"manifest_fields lacks {lacking}: every bundle records the model it came from."
        )
    reserved = [k for k in _RESERVED if k in manifest_fields]
    if reserved:
        raise BundleError(f"manifest_fields may not set {reserved}: write_bundle computes them.")
    for name, src in graphs.items():
        _check_relative(name, "graphs")
        if not Path(src).is_file():
            raise BundleError(
                f"graph {name}: expected a file at {src}, found none. Export it first."
            )
    from var_export.outputs import Outputs, check_target

    check_target(out_dir, "dir", what="bundle folder")
    with Outputs() as tx:
        stage = tx.stage_dir(out_dir, what="bundle folder")
        fill_bundle(stage, graphs=graphs, manifest_fields=manifest_fields, calibration=calibration,
                    processor=processor, extra_files=extra_files)
        tx.commit()
    log.info("wrote bundle %s", out_dir)
    return out_dir


def fill_bundle(
    tmp: Path,
    *,
    graphs: Mapping[str, Path],
    manifest_fields: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
    processor: Any = None,
    extra_files: Iterable[Path | tuple[str, Path]] = (),
) -> None:
    """Write the bundle files into the (empty, staged) folder ``tmp``; see :func:`write_bundle`.

    The caller owns ``tmp`` (a :class:`var_export.outputs.Outputs` staging folder): pipelines
    that write several outputs stage the bundle with the others and commit them together.
    """
    io = {name: _place_graph(Path(src), tmp, name) for name, src in graphs.items()}
    if calibration is not None:
        (tmp / CALIBRATION).write_text(json.dumps(calibration, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(str(tmp))
    for item in extra_files:
        name, src = item if isinstance(item, tuple) else (Path(item).name, item)
        _check_relative(name, "extra_files")
        if (tmp / name).exists() or name == MANIFEST:
            raise BundleError(f"extra file {name!r} collides with a file already in the bundle.")
        _place(Path(src), tmp / name)
    _write_manifest(tmp, manifest_fields, io)


def _place_graph(src: Path, tmp: Path, name: str) -> dict[str, list[str]]:
    """Place graph ``src`` as ``tmp/name`` with its external data files (each once); its I/O names."""
    _place(src, tmp / name)
    for data_name in external_data_files(src):
        data_src = src.parent / data_name
        if not data_src.is_file():
            raise BundleError(
                f"graph {src} refers to the external data file {data_name!r}, which is not "
                f"beside it. Keep {data_name} next to {src.name} or re-export."
            )
        if not (tmp / data_name).exists():
            _place(data_src, tmp / data_name)
    io = graph_io(tmp / name)
    log.debug("bundled %s", name)
    return io


def _write_manifest(tmp: Path, manifest_fields: Mapping[str, Any], io: dict[str, dict[str, list[str]]]) -> None:
    """``manifest.json``: the given fields, the graphs' I/O, every file's sha256 and size, tool versions."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model_id": manifest_fields["model_id"],
        "fingerprint": manifest_fields["fingerprint"],
        "var": manifest_fields.get("var"),
        "var_layers": list(manifest_fields.get("var_layers") or []),
        "head_mode": manifest_fields.get("head_mode"),
        "opset": manifest_fields.get("opset") or _opset_of(tmp / DECODER),
    }
    manifest.update({k: v for k, v in manifest_fields.items() if k not in manifest})
    manifest.update(
        {
            "io": io,
            "files": files,
            "tool_versions": tool_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Load


def _check_graph_data(root: Path, name: str, graph: Path, files: Mapping[str, Any]) -> None:
    """Every external data file ``graph`` refers to stays inside the bundle and is listed in the
    manifest (so it was size- and SHA-checked like the graphs)."""
    from var_export.safety import check_external_data

    for ref in check_external_data(graph):
        rel = PurePosixPath(os.path.relpath(ref.path, os.path.abspath(root))).as_posix()
        if rel not in files:
            raise BundleError(
                f"bundle {root}: {name} stores weights in {ref.location!r}, which {MANIFEST} does "
                "not list (so it is not verified). Re-export the bundle."
            )


def load_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Open a bundle, checking that every manifest file is present with its size and SHA-256.

    ``verify=False`` checks presence and size only (hashing a 7B bundle reads ~14 GB).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(
            f"{path}: expected a bundle directory, found none. Run var-export export."
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"{path} has no {MANIFEST}; expected a bundle written by var-export. Re-export it "
            "(var-export export --out DIR)."
        )
    from var_export.core.schemas import BundleManifest, load_json_object, validate_document

    fix = "Re-export the bundle with this version of var-export (var-export export --out DIR)."
    manifest = load_json_object(manifest_path, BundleError, fix=fix)
    if isinstance(manifest.get("files"), dict):  # unsafe names first: they are an attack, not a typo
        for name in manifest["files"]:
            _check_relative(name, str(manifest_path))
    parsed = validate_document(manifest, BundleManifest, BundleError, where=str(manifest_path), fix=fix)
    files = manifest["files"]
    missing_graphs = [g for g in REQUIRED_GRAPHS if g not in files]
    if missing_graphs:
        raise BundleError(
            f"{manifest_path} lists no {missing_graphs}; a bundle has {list(REQUIRED_GRAPHS)}. {fix}"
        )
    missing_io = [g for g in REQUIRED_GRAPHS if g not in parsed.io]
    if missing_io:
        raise BundleError(f"{manifest_path}: io has no entry for {missing_io}. {fix}")
    root = path.resolve()
    for name, entry in files.items():
        _check_relative(name, str(manifest_path))
        file = path / name
        if root not in file.resolve().parents:
            raise UnsafeInputError(
                f"{manifest_path}: {name!r} resolves outside the bundle; refusing."
            )
        if not file.is_file():
            raise BundleError(
                f"bundle {path} is missing {name} (listed in {MANIFEST}). Re-export the bundle."
            )
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(
                f"bundle {path}: {name} has {size} bytes, the manifest says {entry.get('bytes')}; "
                "the file is corrupt or was changed. Re-export the bundle."
            )
        if verify and sha256_file(file) != entry.get("sha256"):
            raise BundleError(
                f"bundle {path}: the SHA-256 of {name} does not match {MANIFEST}; the file is "
                "corrupt or was changed. Re-export the bundle."
            )
    graphs = {g: path / g for g in files if g.endswith(".onnx")}
    for name, graph in graphs.items():
        _check_graph_data(path, name, graph, files)
    return Bundle(path=path, manifest=manifest, graphs=graphs)
