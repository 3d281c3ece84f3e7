"""Resolve ``--model`` (preset / HF hub id / local directory) and load a LLaVA model safely.

* ``resolve_model(spec)`` is cheap and offline: it only decides *what* ``spec`` names
  (``None`` -> the embedded ``tiny-llava``, built on demand in the cache).
* ``load_llava(spec, ...)`` loads the model (eval mode) and its processor. Safetensors only
  unless ``allow_pickle``; no remote code unless ``trust_remote_code``; hub ids come from the
  local HF cache, and when they are not there the hub is probed with a short timeout, so an
  offline machine fails in seconds with a message saying how to proceed.

torch and transformers are imported lazily (inside the functions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from var_export.configs import load_preset, preset_names
from var_export.core.errors import ModelLoadError, UnsafeInputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-llava"
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PROBE_TIMEOUT_S = 3.0  # connect timeout of the hub reachability probe
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
# keys of a text config that do not describe the model (dtype, paths, versions)
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "use_cache"}
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` names. Resolved offline; nothing is loaded yet."""

    kind: Literal["preset", "hub", "local"]  # preset: embedded model built in code
    name: str  # as the user wrote it (preset name, hub id or directory)
    path: Path | None = None  # local directory (local, or the built embedded preset)
    hf_id: str | None = None  # hub id (kind == "hub")
    preset: dict[str, Any] | None = None  # the matching preset (by name or by hf_id), if any

    @property
    def model_id(self) -> str:
        """A short id for manifests and calibration files."""
        if self.preset is not None:
            return str(self.preset.get("name", self.name))
        return self.hf_id or self.name

    @property
    def verified(self) -> bool:
        """True only for presets whose sink dims were checked against the real weights."""
        return bool(self.preset is not None and self.preset.get("verified", False))

    @property
    def sink_dims(self) -> list[int] | None:
        """The preset's sink dims, or None when no preset describes this model."""
        if self.preset is None or not self.preset.get("sink_dims"):
            return None
        return [int(d) for d in self.preset["sink_dims"]]


@dataclasses.dataclass
class LoadedModel:
    """A loaded LLaVA model and what came with it."""

    model: Any  # LlavaForConditionalGeneration, eval mode
    processor: Any  # LlavaProcessor (tokenizer + image processor)
    config: Any  # model.config (LlavaConfig)
    spec: ModelSpec  # where it came from
    path: Path  # the local directory it was loaded from

    def fingerprint(self) -> dict[str, Any]:
        """:func:`model_fingerprint` of this model (calibration records it)."""
        return model_fingerprint(self.config)

    def prepare(self, image: Any, prompt: str) -> dict[str, Any]:
        """One (image, prompt) pair -> a batch of torch tensors (:func:`var_export.inputs.prepare_batch`)."""
        from var_export.inputs import prepare_batch

        return prepare_batch(self.processor, [image], [prompt])


def _embedded_dir(name: str) -> Path:
    """The cached HF directory of an embedded (built-in-code) preset, built on first use."""
    from var_export.calibration import tiny_anyres, tiny_internvl

    if name in tiny_anyres.VARIANTS:
        return tiny_anyres.tiny_dir(name)
    if name == tiny_internvl.NAME:
        return tiny_internvl.tiny_internvl_dir()
    family = (load_preset(name) or {}).get("family")
    if family in ("qwen2_5_vl", "qwen2_vl"):
        from var_export.calibration.tiny_qwen import tiny_qwen_dir

        return tiny_qwen_dir(family)
    from var_export.calibration.tiny_llava import tiny_llava_dir

    return tiny_llava_dir()


def _preset_by_hf_id(hf_id: str) -> dict[str, Any] | None:
    for name in preset_names():
        preset = load_preset(name)
        if preset and preset.get("hf_id") == hf_id:
            return preset
    return None


def resolve_model(spec: str | None) -> ModelSpec:
    """Decide what ``--model`` names: a preset, a local HF directory or an HF hub id.

    Order: preset name, existing directory, ``owner/name`` hub id. ``None`` is tiny-llava.
    """
    name = DEFAULT_MODEL if spec is None or not str(spec).strip() else str(spec).strip()
    preset = load_preset(name) if "/" not in name and os.sep not in name else None
    if preset is not None:
        if preset.get("embedded"):
            return ModelSpec(kind="preset", name=name, path=_embedded_dir(name), preset=preset)
        if not preset.get("hf_id"):
            raise ModelLoadError(
                f"preset {name!r} has neither 'embedded': true nor an 'hf_id'; fix configs/{name}.json."
            )
        return ModelSpec(kind="hub", name=name, hf_id=str(preset["hf_id"]), preset=preset)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSpec(kind="local", name=name, path=path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"--model {name!r} is a file; expected a directory written by save_pretrained "
            "(config.json + *.safetensors + processor files), a preset or a hub id."
        )
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if _HUB_ID.match(name) and not looks_like_path:
        return ModelSpec(kind="hub", name=name, hf_id=name, preset=_preset_by_hf_id(name))
    if looks_like_path:
        raise ModelLoadError(
            f"model directory {name!r} does not exist. Expected a directory written by "
            "save_pretrained (config.json, *.safetensors, processor files)."
        )
    raise ModelLoadError(
        f"unknown model {name!r}: not a preset ({', '.join(preset_names())}), not an existing "
        "directory, not a hub id of the form owner/name. Pass one of those to --model."
    )


# ---------------------------------------------------------------------------------------------
# loading


def _hub_cache_dir() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port}: {exc or type(exc).__name__}"


def _hub_dir(hf_id: str, *, offline: bool = False) -> Path:
    """The local snapshot of ``hf_id``: from the HF cache, else downloaded if the hub answers."""
    from huggingface_hub import snapshot_download

    cache = _hub_cache_dir()
    try:
        return Path(snapshot_download(hf_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError and friends: not cached
        logger.debug("%s not in the local HF cache %s: %s", hf_id, cache, exc)
    how = (
        f"Download it on a machine with access (`hf download {hf_id}`; add --local-dir DIR to get a "
        f"plain directory), copy it here and pass --model DIR, or put it in the HF cache ({cache})."
    )
    if _offline() or offline:
        why = "HF_HUB_OFFLINE is set" if _offline() else (
            "it was named by a file (a bundle's model_id), which never triggers a download; pass "
            f"--model {hf_id} explicitly to allow it")
        raise ModelLoadError(f"{hf_id} is not in the local HF cache and {why}. {how}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    ok, why = _hub_reachable(endpoint)
    if not ok:
        raise ModelLoadError(
            f"{hf_id} is not in the local HF cache ({cache}) and the hub is unreachable ({why}). {how}"
        )
    logger.info("downloading %s from %s (safetensors + configs only)", hf_id, endpoint)
    try:
        return Path(snapshot_download(hf_id, cache_dir=cache, allow_patterns=_HUB_PATTERNS, etag_timeout=5))
    except Exception as exc:
        raise ModelLoadError(f"could not download {hf_id}: {type(exc).__name__}: {exc}. {how}") from exc


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist.")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{path} has no config.json: expected a directory written by save_pretrained "
            "(config.json, *.safetensors, processor files)."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_path} is corrupt (not valid JSON: {exc}). Re-download or re-save the model.") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} is corrupt: expected a JSON object, found {type(cfg).__name__}.")
    return cfg


def _check_architecture(cfg: dict[str, Any], path: Path, trust_remote_code: bool) -> None:
    from var_export.families import supported_model_types

    model_type = cfg.get("model_type")
    if model_type in supported_model_types():
        return
    hint = ""
    if cfg.get("auto_map") and not trust_remote_code:
        hint = " The model ships its own code (auto_map); it is not run unless --trust-remote-code."
    raise ModelLoadError(
        f"{path} is not a supported model: expected config model_type in {supported_model_types()}, "
        f"found model_type={model_type!r}, "
        f"architectures={cfg.get('architectures')}.{hint}"
    )


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights are present; refuses pickle-only weights unless allowed."""
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return True
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise UnsafeInputError(
            f"{path} has only pickle-based weights ({', '.join(pickles[:3])}); loading them can run "
            "arbitrary code. Expected *.safetensors. Convert them on a trusted machine, or pass "
            "--allow-pickle if you trust the source."
        )
    if not pickles:
        raise ModelLoadError(f"{path} has no weights: expected *.safetensors (model.safetensors or shards).")
    return False


def _torch_dtype(dtype: str) -> Any:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"dtype must be one of {list(DTYPES)}, found {dtype!r}.")
    return table[dtype]


def _load_weights(
    family: Any, path: Path, torch_dtype: Any, attn_implementation: str, use_safetensors: bool,
    trust_remote_code: bool,
) -> Any:  # noqa: ANN401 - the family's PreTrainedModel
    """The family's model from ``path``; a corrupt directory or weights that do not match the
    config are a ``ModelLoadError``."""
    try:
        model, info = family.model_class().from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (UnsafeInputError, ModelLoadError):
        raise
    except Exception as exc:  # safetensors / json / shape errors from a corrupt directory
        raise ModelLoadError(
            f"could not load the weights in {path}: {type(exc).__name__}: {exc}. "
            "The directory is corrupt or incomplete; re-download or re-save it."
        ) from exc
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ModelLoadError(
            f"weights in {path} do not match its config.json: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(mismatched)} with the wrong shape. Re-download or re-save it."
        )
    return model


def _load_processor(family: Any, path: Path, trust_remote_code: bool) -> Any:  # noqa: ANN401
    """The family's processor (tokenizer + image processor) from ``path``, or a ``ModelLoadError``."""
    try:
        return family.load_processor(path, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the processor (tokenizer + image processor) from {path}: "
            f"{type(exc).__name__}: {exc}. Expected the files written by the processor's save_pretrained."
        ) from exc


def load_llava(
    spec: ModelSpec | str | None,
    *,
    dtype: str = "fp32",
    attn_implementation: str = "eager",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool = False,
) -> LoadedModel:
    """Load a LLaVA model (eval mode) and its processor from a preset, hub id or directory.

    ``offline``: a hub id is taken from the local HF cache only, never downloaded (for ids read
    from files, e.g. a bundle's model_id)."""
    if not isinstance(spec, ModelSpec):
        spec = resolve_model(spec)
    torch_dtype = _torch_dtype(dtype)
    path = _hub_dir(spec.hf_id, offline=offline) if spec.kind == "hub" and spec.hf_id else spec.path
    if path is None:
        raise ModelLoadError(f"model {spec.name!r} resolved to no directory; this is a bug.")
    path = Path(path)
    cfg = _read_config(path)
    _check_architecture(cfg, path, trust_remote_code)
    use_safetensors = _check_weights(path, allow_pickle)

    from var_export.families import family_for_model_type

    family = family_for_model_type(cfg.get("model_type"))
    model = _load_weights(family, path, torch_dtype, attn_implementation, use_safetensors, trust_remote_code)
    processor = _load_processor(family, path, trust_remote_code)
    model.eval()
    logger.info("loaded %s from %s (%s, %s attention)", spec.model_id, path, dtype, attn_implementation)
    return LoadedModel(model=model, processor=processor, config=model.config, spec=spec, path=path)


# ---------------------------------------------------------------------------------------------
# config facts


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def text_config_dims(config: Any) -> tuple[int, int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim, hidden_size) of the language model."""
    tc = _text_config(config)
    layers, heads, hidden = int(tc.num_hidden_layers), int(tc.num_attention_heads), int(tc.hidden_size)
    kv = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or hidden // heads)
    return layers, heads, kv, head_dim, hidden


def model_fingerprint(config: Any) -> dict[str, Any]:
    """sha256 of the canonical text-config JSON plus the sizes that calibration depends on.

    Independent of dtype, attention implementation and transformers version.
    """
    tc = _text_config(config)
    d = tc.to_dict() if hasattr(tc, "to_dict") else dict(tc)
    canon = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str)
    layers, heads, kv, _, hidden = text_config_dims(config)
    return {
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv,
        "hidden_size": hidden,
        "vocab_size": int(tc.vocab_size),
    }
