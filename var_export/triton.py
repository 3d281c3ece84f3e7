"""A Triton Inference Server model repository that serves generation from a bundle.

Layout::

    REPO/
      var_llava/
        config.pbtxt        Python backend, decoupled (one streamed response per text piece)
        1/model.py          var_export/triton_model.py: the Triton glue, nothing else
        1/environment.json  the Python that runs the generation worker; the stub's extra sys.path
        1/bundle/           the bundle (copied), or config parameter bundle_dir -> elsewhere

``var_llava`` runs the whole generation inside the server with ``var_export.runtime`` (ONNX
Runtime) and ``var_export.engine`` (continuous batching), in a worker process the model starts
(var_export/serve_worker.py): the KV cache and the sink-mask cache never leave it. Inputs: ``prompt`` TYPE_STRING [1], ``image`` TYPE_STRING [1] (base64 of an
encoded PNG/JPEG, so HTTP JSON works), optional ``max_new_tokens`` TYPE_INT32 [1] (default 32)
and ``var`` TYPE_BOOL [1] (default true; false = ``var-export run --no-var``). Output ``text``
TYPE_STRING [1], one response per new piece of text, then the final flag.

The config is built as Triton's own protobuf (``tritonclient``'s ``model_config_pb2``) and
written with ``google.protobuf.text_format``. The repository needs a Triton with the Python
backend (``var-export serve`` runs the one in ``nvidia-pytriton``); docs/serving.md says what
an NGC container needs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from var_export.core.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from var_export.bundle import Bundle

log = logging.getLogger(__name__)

MODEL_NAME = "var_llava"
MODEL_FILE = Path(__file__).with_name("triton_model.py")  # copied as model.py
ENVIRONMENT = "environment.json"  # beside model.py: the worker's Python, the stub's extra sys.path
BUNDLE_SUBDIR = "bundle"
DEFAULT_MAX_BATCH = 16  # sequences decoded together by the engine


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError(
            "writing a Triton config needs tritonclient (its model_config_pb2 is Triton's schema); "
            "found it missing. pip install 'tritonclient[grpc,http]' (or var-export[serve])."
        ) from exc
    return model_config_pb2


def model_config(
    *,
    bundle_dir: str = BUNDLE_SUBDIR,
    max_batch: int = DEFAULT_MAX_BATCH,
    instance_kind: str = "KIND_CPU",
) -> Any:
    """The ``var_llava`` ModelConfig protobuf (module doc). ``bundle_dir`` is absolute or relative
    to the model's version folder; ``max_batch`` bounds the engine's running batch."""
    pb = _pb()
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, found {max_batch}.")
    kinds = {"KIND_CPU": pb.ModelInstanceGroup.KIND_CPU, "KIND_GPU": pb.ModelInstanceGroup.KIND_GPU}
    if instance_kind not in kinds:
        raise ConfigError(f"instance_kind must be one of {sorted(kinds)}; found {instance_kind!r}.")

    def tensor(cls: Any, name: str, dtype: str, optional: bool = False) -> Any:
        kw = {"optional": True} if optional else {}
        return cls(name=name, data_type=pb.DataType.Value(dtype), dims=[1], **kw)

    return pb.ModelConfig(
        name=MODEL_NAME,
        backend="python",
        max_batch_size=0,  # the engine batches itself (continuous batching), not Triton
        input=[
            tensor(pb.ModelInput, "prompt", "TYPE_STRING"),
            tensor(pb.ModelInput, "image", "TYPE_STRING"),
            tensor(pb.ModelInput, "max_new_tokens", "TYPE_INT32", optional=True),
            tensor(pb.ModelInput, "var", "TYPE_BOOL", optional=True),
        ],
        output=[tensor(pb.ModelOutput, "text", "TYPE_STRING")],
        model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True),
        instance_group=[pb.ModelInstanceGroup(count=1, kind=kinds[instance_kind])],
        parameters={
            "bundle_dir": pb.ModelParameter(string_value=bundle_dir),
            "max_batch": pb.ModelParameter(string_value=str(max_batch)),
        },
    )


def config_text(config: Any) -> str:
    """``config.pbtxt`` text of a ModelConfig (protobuf text format)."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str) -> Any:
    """A ``config.pbtxt`` read back into a ModelConfig (a protobuf ParseError when it is not one)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def environment(stub_sys_path: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``environment.json`` for this interpreter: ``python`` runs the generation worker (it must
    import var_export), ``stub_sys_path`` goes first on the Triton stub's sys.path (a private
    numpy<2 when needed), ``worker_pythonpath`` is the worker's PYTHONPATH (empty: installed)."""
    return {"python": sys.executable, "stub_sys_path": list(stub_sys_path), "worker_pythonpath": []}


def write_triton_repository(
    bundle: Bundle | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    copy_bundle: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
    instance_kind: str = "KIND_CPU",
    stub_sys_path: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Write the ``var_llava`` repository (module doc) for ``bundle`` into ``out_dir``.

    ``copy_bundle``: copy the bundle into the repository (self-contained, movable); False
    records the bundle's absolute path instead (``var-export serve`` does that).
    ``stub_sys_path``: folders the model puts first on the stub's sys.path (:func:`environment`).
    ``overwrite``: replace an existing repository written by this function.
    Writes into a temporary sibling and renames it into place: never half a repository.
    """
    from var_export.bundle import load_bundle

    loaded = bundle if hasattr(bundle, "manifest") else load_bundle(Path(bundle), verify=False)
    config = model_config(
        bundle_dir=BUNDLE_SUBDIR if copy_bundle else str(Path(loaded.path).resolve()),
        max_batch=max_batch,
        instance_kind=instance_kind,
    )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"expected an empty or new directory for the Triton repository; {out} has files "
            "(pass overwrite to replace a repository written here). Choose another --out or remove it."
        )
    from var_export.outputs import Outputs, check_target

    check_target(out, "dir", what="Triton repository")  # replaced only when var-export wrote it
    with Outputs() as tx:
        tmp = tx.stage_dir(out, what="Triton repository")
        version = tmp / MODEL_NAME / "1"
        version.mkdir(parents=True)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(config_text(config))
        shutil.copyfile(MODEL_FILE, version / "model.py")
        (version / ENVIRONMENT).write_text(json.dumps(environment(stub_sys_path), indent=2) + "\n")
        if copy_bundle:
            _copy_bundle(Path(loaded.path), loaded.manifest, version / BUNDLE_SUBDIR)
        tx.commit()
    log.info("wrote Triton model repository %s (model %s)", out, MODEL_NAME)
    return out


def _copy_bundle(src: Path, manifest: dict[str, Any], dst: Path) -> None:
    """The bundle's manifest and every file it lists (nothing else of the folder)."""
    from var_export.core.contract import MANIFEST

    for name in [*manifest["files"], MANIFEST]:
        if not (src / name).is_file():
            raise BundleError(f"bundle {src} lacks {name}, listed in its manifest. Re-export the bundle.")
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
