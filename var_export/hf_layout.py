"""The bundle where other runtimes look: Hugging Face config files and the transformers.js layout.

* :func:`hf_config_files` writes ``config.json`` and ``generation_config.json`` of the model
  (the pipeline puts them in every bundle, so ``AutoConfig.from_pretrained(bundle)`` works).
* :func:`write_transformers_js_layout` writes the onnx-community layout that transformers.js
  (and Optimum's file conventions) expect::

      OUT/config.json  generation_config.json  preprocessor_config.json  tokenizer*.json ...
      OUT/onnx/vision_encoder.onnx  onnx/embed_tokens.onnx  onnx/decoder_model_merged.onnx
      OUT/onnx/decoder_model_merged.onnx_data      (external weights, transformers.js naming)
      OUT/var_export.json                          the bundle manifest, for reference

  transformers.js feeds every decoder output whose name starts with ``present`` back as the
  input named with ``present`` replaced by ``past_key_values``. So in this layout the sink
  cache input ``past_sink_mask`` is renamed ``past_key_values_sink_mask``: the renamed
  ``present_sink_mask`` lands on it by itself at every decode step. What the caller must still
  add (docs/serving.md): an empty ``past_key_values_sink_mask`` (B, Lv, 0) bool at prefill and
  ``visual_token_mask`` (B, T) bool at every step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from var_export.core.contract import DECODER, EMBED_TOKENS, MANIFEST, PAST_SINK_MASK, VISION_ENCODER
from var_export.core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

TJS_PAST_SINK_MASK = "past_key_values_sink_mask"  # what transformers.js renames present_sink_mask to
TJS_EXTERNAL_SUFFIX = ".onnx_data"  # transformers.js: external weights of X.onnx are X.onnx_data
HF_CONFIG_FILES = ("config.json", "generation_config.json")


def hf_config_files(config: Any, out_dir: Path) -> list[tuple[str, Path]]:
    """Write the model's ``config.json`` and ``generation_config.json`` into ``out_dir``;
    returns (name, path) pairs for ``write_bundle(extra_files=...)``."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    return [(name, out_dir / name) for name in HF_CONFIG_FILES]


def write_transformers_js_layout(bundle_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the onnx-community layout of a bundle into a new or empty ``out_dir`` (module doc)."""
    import onnx_ir as ir

    from var_export.bundle import load_bundle

    bundle = load_bundle(Path(bundle_dir), verify=False)
    missing = [n for n in HF_CONFIG_FILES if not (bundle.path / n).is_file()]
    if missing:
        raise BundleError(
            f"bundle {bundle.path} has no {missing}; transformers.js needs the model config. "
            "Re-export the bundle with this var-export (it writes them)."
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"expected a new or empty directory for the transformers.js layout; {out} has files.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    (tmp / "onnx").mkdir(parents=True)
    try:
        for name in (VISION_ENCODER, EMBED_TOKENS, DECODER):
            model = ir.load(str(bundle.graphs[name]))
            if name == DECODER:
                _rename_sink_input(model)
            external = name + "_data" if _has_external(bundle.graphs[name]) else None
            ir.save(model, str(tmp / "onnx" / name), external_data=external)
        for item in bundle.path.iterdir():  # config, tokenizer and processor files
            if item.is_file() and item.suffix in (".json", ".jinja", ".txt", ".model") and item.name != MANIFEST:
                shutil.copyfile(item, tmp / item.name)
        shutil.copyfile(bundle.path / MANIFEST, tmp / "var_export.json")
        _preprocessor_config(bundle.path, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the transformers.js layout %s", out)
    return out


def _rename_sink_input(model: Any) -> None:
    for value in model.graph.inputs:
        if value.name == PAST_SINK_MASK:
            value.name = TJS_PAST_SINK_MASK  # onnx-ir renames every use with it


def _has_external(path: Path) -> bool:
    from var_export.bundle import external_data_files

    return bool(external_data_files(path))


def _preprocessor_config(bundle: Path, out: Path) -> None:
    """``preprocessor_config.json`` (the image processor) for runtimes that read it alone."""
    if (out / "preprocessor_config.json").is_file():
        return
    processor = json.loads((bundle / "processor_config.json").read_text()) if (bundle / "processor_config.json").is_file() else {}
    image = processor.get("image_processor")
    if not isinstance(image, dict):
        raise BundleError(f"bundle {bundle} has no image processor settings (processor_config.json); re-export it.")
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
