"""Greedy generation with ONNX Runtime from a bundle alone (no torch model, no hub).

    rt = VarRuntime("build/tiny-llava")                       # VAR on (when the bundle has it)
    result = rt.generate("cat.png", "What is in the picture?", max_new_tokens=32,
                         stream=lambda text: print(text, end=""))
    result.text, result.token_ids, result.timings

Pipeline (DESIGN.md §3): processor (from the bundle's files) -> ``vision_encoder.onnx`` ->
``embed_tokens.onnx`` -> image features scattered into the image-token positions -> the
decoder loop with the KV cache and, for a VAR bundle, the sink-mask cache
(``present_sink_mask`` fed back as ``past_sink_mask``), greedy.

Decisions:

* **VAR off** (``var=False``, ``var-export run --no-var``) runs the *same* VAR bundle with an
  all-False ``visual_token_mask``. With no visual token no query row is eligible, so no row is
  changed and the VAR graph computes exactly the plain decoder (docs/ARCHITECTURE.md, "The
  decoder contract"); no second graph is needed. A ``--no-var`` bundle (no VAR inputs in the
  manifest's io) runs as it is; ``var=True`` on it logs that there is no VAR to switch on.
* **Prompts.** A prompt that already contains the processor's image token (``<image>``) is used
  verbatim: the caller formatted it. Otherwise the runtime formats it with the processor's chat
  template (one user turn: the image, then the text; generation prompt added), or, without a
  template, uses LLaVA-1.5's ``USER: <image>\n{prompt} ASSISTANT:``
  (:func:`var_export.inputs.format_prompt`). A prompt with more than one image token is a
  ``DataError`` (one image per call).
* **Length.** The model's position limit is the manifest's ``max_position_embeddings`` when
  recorded, else the tokenizer's ``model_max_length``. A prompt (image tokens included) at or
  beyond it is a ``DataError``; ``max_new_tokens`` is capped to what still fits (logged).

The step helpers (:func:`empty_past`, :func:`decode_step_numpy`, :func:`prefill_position_ids`,
:func:`greedy_decode_numpy`) work on batches with left padding and are what parity tests reuse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from var_export.core.contract import (
    DECODER,
    EMBED_TOKENS,
    PAST_SINK_MASK,
    PRESENT_SINK_MASK,
    VISION_ENCODER,
    VISUAL_MASK,
)
from var_export.core.errors import BundleError, ConfigError, DataError, InputValidationError
from var_export.inputs import load_image  # noqa: F401 - part of this module's API

if TYPE_CHECKING:
    import onnxruntime as ort
    from PIL import Image

log = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


# ---------------------------------------------------------------------------------------------
# Sessions


def make_session(path: str | os.PathLike[str], provider: str = "cpu") -> ort.InferenceSession:
    """An ONNX Runtime session on ``provider`` ('cpu' | 'cuda'); a clear error when unavailable."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ConfigError(f"--provider must be one of {sorted(PROVIDERS)}, found {provider!r}.")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted not in available:
        raise ConfigError(
            f"expected ONNX Runtime with {wanted} for --provider {provider}; this onnxruntime "
            f"({ort.__version__}) has {available}. Install onnxruntime-gpu on a machine with an "
            "NVIDIA GPU and CUDA, or use --provider cpu."
        )
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    from var_export import kernels

    options = kernels.session_options(path, ort.SessionOptions())  # VarAttention when the graph has it
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException
        raise BundleError(
            f"expected a loadable ONNX graph at {path}; ONNX Runtime failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Re-export the bundle."
        ) from exc
    if session.get_providers()[0] != wanted:
        raise ConfigError(
            f"ONNX Runtime did not start {wanted} for {Path(path).name} (got "
            f"{session.get_providers()}); check the CUDA / cuDNN installation or use --provider cpu."
        )
    return session


def _input_meta(session: ort.InferenceSession) -> dict[str, Any]:
    return {i.name: i for i in session.get_inputs()}


# ---------------------------------------------------------------------------------------------
# Step helpers (batch, left padding)


def prefill_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """HF's convention for left padding: cumsum(mask) - 1, pads at 1. (B, T) int64."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def empty_past(decoder: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length caches for prefill: every ``past_key_values.*`` (B, KV, 0, hd) and, for a VAR
    decoder, ``past_sink_mask`` (B, Lv, 0), with the graph's dtypes."""
    past: dict[str, np.ndarray] = {}
    for name, meta in _input_meta(decoder).items():
        if not (name.startswith("past_key_values.") or name == PAST_SINK_MASK):
            continue
        shape = list(meta.shape)
        is_sink = name == PAST_SINK_MASK
        static_axes = (1,) if is_sink else (1, 3)
        if len(shape) != (3 if is_sink else 4) or not all(isinstance(shape[a], int) for a in static_axes):
            raise BundleError(
                f"decoder input {name} has shape {shape}; expected "
                f"{'[B, Lv, P]' if is_sink else '[B, KV, P, hd]'} with static "
                f"{'Lv' if is_sink else 'KV and hd'}. Re-export the bundle."
            )
        dims = (batch, shape[1], 0) if is_sink else (batch, shape[1], 0, shape[3])
        past[name] = np.zeros(dims, dtype=_ORT_DTYPES.get(meta.type, np.float32))
    return past


# Input validation: every tensor is checked against the graph before ONNX Runtime sees it.

MAX_PROMPT_CHARS = 1_000_000  # longer prompts are refused before tokenisation


def _bad(name: str, expected: str, found: str, fix: str = "") -> InputValidationError:
    return InputValidationError(f"{name}: expected {expected}, found {found}.{' ' + fix if fix else ''}")


def _array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise _bad(name, "a numpy array", type(value).__name__)
    return value


def _integer(name: str, value: Any, shape_text: str) -> np.ndarray:
    value = _array(name, value)
    if value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.integer):
        raise _bad(name, f"an integer array {shape_text}", f"dtype {value.dtype}")
    return value.astype(np.int64, copy=False)


def _static(meta: Any, axis: int) -> int | None:
    shape = list(getattr(meta, "shape", None) or [])
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) else None


def check_step_inputs(
    meta: Mapping[str, Any],
    inputs_embeds: Any,
    attention_mask: Any,
    position_ids: Any,
    past: Mapping[str, Any],
    visual_token_mask: Any,
) -> dict[str, np.ndarray]:
    """The feeds of one decoder call, checked against the graph's inputs ``meta`` (name ->
    NodeArg): ranks, dtypes, static dims, batch and length consistency, mask values.
    ``InputValidationError`` names the tensor, what was expected and what was found."""
    embeds = _array("inputs_embeds", inputs_embeds)
    if embeds.ndim != 3 or not np.issubdtype(embeds.dtype, np.floating):
        raise _bad("inputs_embeds", "a float array (B, S, D)", f"shape {embeds.shape} dtype {embeds.dtype}")
    b, s, d = embeds.shape
    hidden = _static(meta.get("inputs_embeds"), 2)
    if hidden is not None and d != hidden:
        raise _bad("inputs_embeds", f"hidden size D = {hidden} (the decoder's)", f"D = {d}")
    if b == 0 or s == 0:
        raise _bad("inputs_embeds", "at least one sample and one position", f"shape {embeds.shape}")
    want = _ORT_DTYPES.get(getattr(meta.get("inputs_embeds"), "type", ""), embeds.dtype)
    embeds = embeds.astype(want, copy=False)
    if not np.isfinite(embeds).all():
        raise _bad("inputs_embeds", "finite values", "NaN or infinity")
    mask = _integer("attention_mask", attention_mask, "(B, T) of 0/1")
    if mask.ndim != 2 or mask.shape[0] != b:
        raise _bad("attention_mask", f"shape (B={b}, T)", f"shape {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise _bad("attention_mask", "only 0 and 1", f"values {np.unique(mask)[:6].tolist()}")
    past_len = mask.shape[1] - s
    if past_len < 0:
        raise _bad("attention_mask", f"T >= S = {s} (past + current positions)", f"T = {mask.shape[1]}")
    pos = _integer("position_ids", position_ids, "(B, S)")
    pos_rank = len(getattr(meta.get("position_ids"), "shape", None) or [None, None])
    want_pos = (3, b, s) if pos_rank == 3 else (b, s)
    if pos.shape != want_pos:
        raise _bad("position_ids", f"shape {want_pos}", f"shape {pos.shape}")
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
    feeds.update(_check_past(meta, past, b, past_len))
    if VISUAL_MASK in meta:
        if visual_token_mask is None:
            visual = np.zeros(mask.shape, dtype=np.bool_)
        else:
            visual = _array(VISUAL_MASK, visual_token_mask)
            if visual.dtype != np.bool_:
                raise _bad(VISUAL_MASK, "a bool array (True = image token)", f"dtype {visual.dtype}",
                           "Pass input_ids == image_token_id, not a float or int mask.")
            if visual.shape != mask.shape:
                raise _bad(VISUAL_MASK, f"the attention mask's shape {mask.shape}", f"shape {visual.shape}")
        feeds[VISUAL_MASK] = visual
    return feeds


def _check_past(meta: Mapping[str, Any], past: Mapping[str, Any], batch: int, past_len: int) -> dict[str, np.ndarray]:
    """The KV and sink-mask caches: one per graph input, batch B, length P = T - S."""
    if not isinstance(past, Mapping):
        raise _bad("past", "a mapping of past_key_values.* (empty_past() for prefill)", type(past).__name__)
    wanted = [n for n in meta if n.startswith("past_key_values.") or n == PAST_SINK_MASK]
    missing = [n for n in wanted if n not in past]
    if missing:
        raise _bad("past", f"every cache input of the decoder ({len(wanted)})", f"{missing[:3]} missing",
                   "For prefill pass empty_past(decoder, batch); decode steps feed the previous step's past.")
    unknown = sorted(set(past) - set(meta))
    if unknown:
        raise _bad("past", "only the decoder's cache inputs", f"unknown {unknown[:3]}")
    out = {}
    for name in wanted:
        value = _array(name, past[name])
        is_sink = name == PAST_SINK_MASK
        rank = 3 if is_sink else 4
        if value.ndim != rank:
            raise _bad(name, f"rank {rank}", f"shape {value.shape}")
        if value.shape[0] != batch or value.shape[2] != past_len:
            raise _bad(name, f"batch {batch} and past length P = T - S = {past_len}", f"shape {value.shape}",
                       "A decode step needs the past of the previous step (decode before prefill?).")
        for axis in ((1,) if is_sink else (1, 3)):
            dim = _static(meta[name], axis)
            if dim is not None and value.shape[axis] != dim:
                raise _bad(name, f"dim {axis} = {dim}", f"shape {value.shape}")
        if is_sink and value.dtype != np.bool_:
            raise _bad(name, "a bool array", f"dtype {value.dtype}")
        if not is_sink:
            want = _ORT_DTYPES.get(getattr(meta[name], "type", ""), value.dtype)
            if not np.issubdtype(value.dtype, np.floating):
                raise _bad(name, "a float array", f"dtype {value.dtype}")
            value = value.astype(want, copy=False)
        out[name] = value
    return out


def check_token_budget(max_new_tokens: Any) -> int:
    """``max_new_tokens`` as an int >= 1 (bools, floats, strings are refused, not rounded)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ConfigError(f"max_new_tokens must be an integer >= 1, found {max_new_tokens!r} "
                          f"({type(max_new_tokens).__name__}).")
    if max_new_tokens < 1 or max_new_tokens > 1_000_000:
        raise ConfigError(f"max_new_tokens must be in 1..1000000, found {max_new_tokens}.")
    return int(max_new_tokens)


def check_prompt(prompt: Any) -> str:
    """A non-empty str prompt of valid UTF-8 text (bytes are decoded strictly)."""
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"the prompt is not valid UTF-8 ({exc}); pass text in UTF-8.") from None
    if not isinstance(prompt, str):
        raise DataError(f"expected the prompt as text (str), found {type(prompt).__name__}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: undecodable bytes from the command line
        raise DataError(
            f"the prompt is not valid UTF-8 text (undecodable bytes at position {exc.start}); pass "
            "UTF-8 text (check the terminal's or file's encoding)."
        ) from None
    if not prompt.strip():
        raise DataError("expected a non-empty prompt; found an empty one. Pass --prompt TEXT.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DataError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
    if "\x00" in prompt:
        raise DataError("the prompt contains a NUL character; pass plain text.")
    return prompt


def decode_step_numpy(
    decoder: ort.InferenceSession,
    inputs_embeds: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    past: Mapping[str, np.ndarray],
    visual_token_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One decoder call. Returns (logits (B, S, V), the next ``past``).

    ``inputs_embeds`` (B, S, D), ``attention_mask`` (B, T = P + S) int64, ``position_ids`` (B, S),
    ``past``: the graph's ``past_key_values.*`` (and ``past_sink_mask``) inputs by name
    (:func:`empty_past` for prefill). ``visual_token_mask`` (B, T) bool is fed only when the graph
    has that input; None there means all-False (VAR off). The next ``past`` maps each
    ``present.*`` / ``present_sink_mask`` output back to its input name.
    """
    meta = _input_meta(decoder)
    feeds = check_step_inputs(meta, inputs_embeds, attention_mask, position_ids, past, visual_token_mask)
    missing = sorted(set(meta) - set(feeds))
    if missing:
        raise BundleError(
            f"the decoder expects inputs {missing} that the decoder contract (DESIGN.md §3) does "
            "not define; re-export the bundle with var-export."
        )
    names = [o.name for o in decoder.get_outputs()]
    outs = decoder.run(names, {k: v for k, v in feeds.items() if k in meta})
    logits = outs[0]
    nxt: dict[str, np.ndarray] = {}
    for name, value in zip(names[1:], outs[1:]):
        if name.startswith("present."):
            nxt["past_key_values." + name[len("present.") :]] = value
        elif name == PRESENT_SINK_MASK:
            nxt[PAST_SINK_MASK] = value
    return logits, nxt


@dataclasses.dataclass
class DecodeResult:
    tokens: np.ndarray  # (B, n) int64 generated ids; after EOS a finished row repeats pad_id
    steps: int  # decoder calls after prefill
    prefill_seconds: float
    decode_seconds: float


def _prompt_visual_mask(visual_token_mask: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """The prompt's (B, T) bool image-token mask, padding excluded (None: no image token, VAR off)."""
    if visual_token_mask is None:
        return np.zeros(mask.shape, dtype=np.bool_)
    visual_token_mask = _array(VISUAL_MASK, visual_token_mask)
    if visual_token_mask.dtype != np.bool_:
        raise _bad(VISUAL_MASK, "a bool array (True = image token)", f"dtype {visual_token_mask.dtype}")
    if visual_token_mask.shape != mask.shape:
        raise _bad(VISUAL_MASK, f"the attention mask's shape {mask.shape}", f"shape {visual_token_mask.shape}")
    return visual_token_mask & (mask != 0)


def greedy_decode_numpy(
    decoder: ort.InferenceSession,
    embed: Callable[[np.ndarray], np.ndarray],
    inputs_embeds: np.ndarray,
    attention_mask: np.ndarray,
    max_new_tokens: int,
    *,
    visual_token_mask: np.ndarray | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
    position_ids: np.ndarray | None = None,
    next_positions: Callable[[np.ndarray], np.ndarray] | None = None,
) -> DecodeResult:
    """Greedy decoding with the KV and sink-mask caches (batch, left padding).

    ``embed`` maps token ids (B, 1) to embeddings (B, 1, D) (the embed_tokens session).
    ``visual_token_mask`` (B, S) bool for the prompt (None: all False, i.e. VAR off). Generated
    tokens are never visual. Stops after ``max_new_tokens`` or when every row has produced
    ``eos_token_id``. ``on_token(ids (B,))`` is called after each new token.
    ``position_ids``: the prompt's (default :func:`prefill_position_ids`; M-RoPE models pass
    [3, B, S]); ``next_positions(mask (B, T))``: the newest token's positions (default: the
    previous + 1; Qwen-VL: ``cumsum(mask) - 1 + rope_deltas``, see var_export.families.qwen).
    """
    max_new_tokens = check_token_budget(max_new_tokens)
    inputs_embeds = _array("inputs_embeds", inputs_embeds)
    b = inputs_embeds.shape[0]
    mask = _integer("attention_mask", attention_mask, "(B, T) of 0/1")
    visual = _prompt_visual_mask(visual_token_mask, mask)
    if position_ids is None:
        position_ids = prefill_position_ids(mask)
    past = empty_past(decoder, b)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    t0 = time.perf_counter()
    logits, past = decode_step_numpy(decoder, inputs_embeds, mask, position_ids, past, visual)
    t1 = time.perf_counter()
    tokens: list[np.ndarray] = []
    done = np.zeros(b, dtype=np.bool_)
    steps = 0
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)  # (B,)
        nxt = np.where(done, pad, nxt)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if done.all() or i == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        visual = np.concatenate([visual, np.zeros((b, 1), np.bool_)], axis=1)
        position_ids = next_positions(mask) if next_positions is not None else position_ids[..., -1:] + 1
        logits, past = decode_step_numpy(decoder, embed(nxt[:, None]), mask, position_ids, past, visual)
        steps += 1
    out = np.stack(tokens, axis=1) if tokens else np.zeros((b, 0), np.int64)
    return DecodeResult(out, steps, t1 - t0, time.perf_counter() - t1)


# ---------------------------------------------------------------------------------------------
# Images and prompts


def format_prompt(processor: Any, prompt: str) -> str:
    """The text given to the processor: verbatim with one image token, else templated (module
    doc); :func:`var_export.inputs.format_prompt` does it."""
    from var_export.inputs import format_prompt as _format

    return _format(processor, prompt)


# ---------------------------------------------------------------------------------------------
# The runtime


@dataclasses.dataclass
class GenerationResult:
    text: str  # decoded new tokens, special tokens skipped
    token_ids: list[int]  # new token ids (EOS included when produced)
    timings: dict[str, float]  # seconds: preprocess, vision, prefill, decode, total; tokens_per_s
    prompt_tokens: int = 0  # prompt length, image tokens included
    var: bool = False  # whether VAR was active


class VarRuntime:
    """ONNX Runtime generation from a bundle directory (see the module docstring).

    ``provider``: 'cpu' or 'cuda' (onnxruntime-gpu). ``var``: run VAR (a VAR bundle) or switch it
    off by feeding no visual token. ``verify``: check the SHA-256 of every bundle file on load.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        provider: str = "cpu",
        var: bool = True,
        *,
        verify: bool = True,
    ) -> None:
        from var_export.bundle import load_bundle

        self.bundle = load_bundle(Path(bundle_dir), verify=verify)
        self.provider = provider
        manifest = self.bundle.manifest
        io = manifest.get("io") or {}
        self.sessions = self._open_sessions(provider)
        decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        manifest_inputs = (io.get(DECODER) or {}).get("inputs")
        if manifest_inputs is not None and list(manifest_inputs) != decoder_inputs:
            raise BundleError(
                f"the decoder's inputs {decoder_inputs} differ from the manifest's io "
                f"{list(manifest_inputs)}; the bundle is inconsistent. Re-export it."
            )
        self.has_var = VISUAL_MASK in decoder_inputs
        if self.has_var != (manifest.get("var") is not None):
            log.warning(
                "manifest var settings (%s) and decoder inputs (VAR inputs %s) disagree; "
                "following the graph",
                "present" if manifest.get("var") is not None else "null",
                "present" if self.has_var else "absent",
            )
        if var and not self.has_var:
            log.info("bundle %s has no VAR (exported with --no-var): running the plain decoder", self.bundle.path)
        self.var = bool(var and self.has_var)
        from var_export.families import family_for_model_type

        self.family = family_for_model_type(manifest.get("family") or "llava")
        self.processor = self._load_processor()
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer = tokenizer
        self.image_token_id = self._image_token_id(manifest)
        self.eos_token_id = manifest.get("eos_token_id", getattr(tokenizer, "eos_token_id", None))
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.max_positions = self._max_positions(manifest)

    def _open_sessions(self, provider: str) -> dict[str, Any]:
        """One session per graph; :class:`var_export.trt.runtime.TrtRuntime` serves them with
        TensorRT engines instead (the generation loop only needs get_inputs/get_outputs/run)."""
        return {
            name: make_session(self.bundle.graphs.get(name, self.bundle.path / name), provider)
            for name in (VISION_ENCODER, EMBED_TOKENS, DECODER)
        }

    @property
    def decoder(self) -> ort.InferenceSession:
        return self.sessions[DECODER]

    def _load_processor(self) -> Any:
        from var_export.core.errors import VarExportError
        from var_export.core.extras import require_extra
        from var_export.core.schemas import ProcessorFiles, parse_json_file
        from var_export.processor import torch_free_processor  # LLaVA-1.5 bundles, no torch

        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            if (self.bundle.path / name).is_file():  # typed check of the keys we rely on
                parse_json_file(self.bundle.path / name, ProcessorFiles, BundleError,
                                fix="Re-export the bundle (its processor files are damaged).")
        try:
            processor = torch_free_processor(self.bundle.path)
            if processor is not None:
                return processor
            require_extra("torch", f"the processor of {self.bundle.path} (not a LLaVA-1.5 CLIP processor)")
            return self.family.load_processor(self.bundle.path)
        except VarExportError:
            raise
        except Exception as exc:  # transformers raises OSError / ValueError / KeyError
            raise BundleError(
                f"expected the model's processor files (tokenizer, processor_config.json) in "
                f"{self.bundle.path}; AutoProcessor could not load them ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Re-export the bundle."
            ) from exc

    def _image_token_id(self, manifest: Mapping[str, Any]) -> int:
        value = manifest.get("image_token_id", getattr(self.processor, "image_token_id", None))
        if value is None:
            token = getattr(self.processor, "image_token", None)
            if token is not None:
                value = self.tokenizer.convert_tokens_to_ids(token)
        if value is None:
            raise BundleError(
                f"cannot tell the image token id of the bundle {self.bundle.path}: the manifest has "
                "no image_token_id and the processor no image_token. Re-export the bundle."
            )
        return int(value)

    def _max_positions(self, manifest: Mapping[str, Any]) -> int | None:
        for source in (manifest, manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}):
            value = source.get("max_position_embeddings") if isinstance(source, Mapping) else None
            if value:
                return int(value)
        config = self.bundle.path / "config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text())
                text = cfg.get("text_config", cfg)
                if text.get("max_position_embeddings"):
                    return int(text["max_position_embeddings"])
            except (json.JSONDecodeError, AttributeError):
                pass
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 10**7:
            return limit
        return None

    def prepare(self, image: Image.Image | str | os.PathLike[str], prompt: str) -> dict[str, np.ndarray]:
        """Processor outputs for one image and prompt: input_ids, attention_mask, pixel_values."""
        prompt = check_prompt(prompt)
        img = load_image(image)
        text = format_prompt(self.processor, prompt)
        try:
            batch = self.processor(images=[img], text=[text], return_tensors="np")
        except ValueError as exc:
            raise DataError(
                f"the processor rejected the prompt/image pair: {exc}. Expected one "
                f"{getattr(self.processor, 'image_token', '<image>')} in the prompt for the image."
            ) from exc
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        n_image = int((ids == self.image_token_id).sum())
        if n_image == 0:
            raise DataError(
                "the formatted prompt has no image token, but this model needs the image in the "
                "prompt; expected the processor to expand <image>. Check the bundle's processor files."
            )
        if self.max_positions is not None and ids.shape[1] >= self.max_positions:
            raise DataError(
                f"the prompt is {ids.shape[1]} tokens long ({n_image} of them image tokens); the "
                f"model allows at most {self.max_positions} positions, prompt and answer together. "
                "Shorten the prompt."
            )
        out = {key: np.asarray(value) for key, value in batch.items()}  # + image_sizes, ... (family)
        out["input_ids"] = ids
        out["attention_mask"] = np.asarray(batch["attention_mask"], dtype=np.int64)
        return out

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions[EMBED_TOKENS].run(["inputs_embeds"], {"input_ids": ids.astype(np.int64)})[0]

    def prompt_embeds(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """inputs_embeds (B, S, D) with the image features merged in; and the vision seconds."""
        from var_export.export import merge_image_features

        vision = self.sessions[VISION_ENCODER]
        types = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in vision.get_inputs()}
        feeds = {k: np.asarray(v).astype(types.get(k, np.float32)) for k, v in self.family.vision_feeds(batch).items()}
        names = [o.name for o in vision.get_outputs()]
        t0 = time.perf_counter()
        outputs = dict(zip(names, vision.run(names, feeds)))
        features = self.family.merge_vision_outputs(outputs, batch, self.bundle.manifest)  # (N_img, D)
        t_vision = time.perf_counter() - t0
        embeds = self._embed(batch["input_ids"])
        try:
            merged = merge_image_features(embeds, features, batch["input_ids"], self.image_token_id)
        except ConfigError as exc:
            raise DataError(str(exc)) from exc
        return merged, t_vision

    def prompt_logits(self, image: Image.Image | str | os.PathLike[str], prompt: str) -> np.ndarray:
        """Prefill logits (S, V) of one image + prompt: what the first generated token is chosen from."""
        batch = self.prepare(image, prompt)
        embeds, _ = self.prompt_embeds(batch)
        mask = batch["attention_mask"]
        visual = (batch["input_ids"] == self.image_token_id) if self.var else None
        positions, _ = self.family.prefill_positions(batch)
        logits, _ = decode_step_numpy(self.decoder, embeds, mask, positions, empty_past(self.decoder, 1), visual)
        return logits[0]

    def generate(
        self,
        image: Image.Image | str | os.PathLike[str],
        prompt: str,
        max_new_tokens: int = 32,
        stream: Callable[[str], None] | None = None,
        *,
        stop_on_eos: bool = True,
    ) -> GenerationResult:
        """Greedy generation for one image and prompt. ``stream(text_piece)`` gets the new text as
        it is generated (pieces concatenate to ``result.text``)."""
        max_new_tokens = check_token_budget(max_new_tokens)
        prompt = check_prompt(prompt)
        t0 = time.perf_counter()
        batch = self.prepare(image, prompt)
        prompt_len = int(batch["input_ids"].shape[1])
        max_new_tokens = self._cap_new_tokens(prompt_len, max_new_tokens)
        t_pre = time.perf_counter() - t0
        embeds, t_vision = self.prompt_embeds(batch)
        visual = batch["input_ids"] == self.image_token_id if self.var else None
        positions, decode_state = self.family.prefill_positions(batch)  # Qwen-VL: rope_deltas

        streamer = _Streamer(self._decode, stream)
        result = greedy_decode_numpy(
            self.decoder,
            self._embed,
            embeds,
            batch["attention_mask"],
            max_new_tokens,
            visual_token_mask=visual,
            eos_token_id=self.eos_token_id if stop_on_eos else None,
            pad_token_id=self.pad_token_id,
            on_token=streamer.on_token,
            position_ids=positions,
            next_positions=lambda m: self.family.decode_positions(m, decode_state),
        )
        generated = streamer.generated
        text = streamer.finish()
        total = time.perf_counter() - t0
        n = len(generated)
        timings = {
            "preprocess": t_pre,
            "vision": t_vision,
            "prefill": result.prefill_seconds,
            "decode": result.decode_seconds,
            "total": total,
            "tokens_per_s": (result.steps / result.decode_seconds) if result.decode_seconds > 0 else 0.0,
        }
        log.debug("generated %d tokens in %.3f s", n, total)
        return GenerationResult(
            text=text, token_ids=generated, timings=timings, prompt_tokens=prompt_len, var=self.var
        )

    def _cap_new_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """``max_new_tokens``, capped to what still fits in the model's positions (logged)."""
        if self.max_positions is not None and prompt_len + max_new_tokens > self.max_positions:
            capped = self.max_positions - prompt_len
            log.warning(
                "max_new_tokens %d does not fit after a %d-token prompt (limit %d positions): "
                "generating at most %d",
                max_new_tokens,
                prompt_len,
                self.max_positions,
                capped,
            )
            return capped
        return max_new_tokens

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class _Streamer:
    """Collects greedy tokens; hands ``stream`` each new piece of text (pieces concatenate to the
    final text: a piece is sent only once the decoded text extends what was sent)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stream: Callable[[str], None] | None) -> None:
        self.decode = decode
        self.stream = stream
        self.generated: list[int] = []
        self.emitted = ""

    def on_token(self, ids: np.ndarray) -> None:
        self.generated.append(int(ids[0]))
        if self.stream is not None:
            text = self.decode(self.generated)
            if text.startswith(self.emitted) and len(text) > len(self.emitted):
                self.stream(text[len(self.emitted) :])
                self.emitted = text

    def finish(self) -> str:
        """The whole text; the last piece is streamed if it was not yet."""
        text = self.decode(self.generated)
        if self.stream is not None and text != self.emitted and text.startswith(self.emitted):
            self.stream(text[len(self.emitted) :])
        return text
