"""Continuous batching of greedy generations over one bundle of any family (what ``var_llava`` serves).

    engine = BatchedGenerator(VarRuntime(bundle))
    engine.start()                                   # a worker thread
    engine.submit(GenRequest(prompt, image_bytes, on_piece=..., on_done=...))
    engine.stop()

Every iteration of the worker:

1. **Admit** the queued requests (up to ``max_batch`` running): preprocess each (processor,
   vision encoder, embeddings), then **prefill them in one decoder call** with left padding.
   Their first token comes from that call. Their caches join the running batch: the time axis
   of the running and the new caches is left-padded to a common length (zeros, mask 0).
2. **Decode** one token for every running sequence in one decoder call.
3. Sequences that produced EOS, reached their token budget or whose client went away
   **leave** the batch (rows dropped); columns that are padding in every remaining row are
   trimmed from the left.

The KV cache, the sink-mask cache, ``attention_mask`` and ``visual_token_mask`` are batched
(B, ..., T). Greedy argmax over a left-padded batch gives the tokens of a single-row run (masked
keys contribute exactly 0), so each request's text is what ``var-export run`` prints for the
same inputs. ``var=False`` on a request feeds it an all-False ``visual_token_mask`` (VAR off,
exactly ``run --no-var``); VAR-on and VAR-off requests share a batch.

Families. Everything family-specific comes from the code ``var-export run`` uses: the processor,
the visual token expansion and the vision inputs (:meth:`VarRuntime.prepare` and
:meth:`VarRuntime.prompt_embeds`: Qwen-VL dynamic resolution, LLaVA-NeXT / OneVision tiles and
image_newline packing, InternVL tiles), and the positions
(:meth:`~var_export.families.base.ModelFamily.prefill_positions` on each request's own one-row
batch, then left-padded into the prefill batch; ``decode_positions`` of the running batch's mask
with the rows' decode states joined by ``join_states``). Rows of one batch may have different
image sizes and numbers of image tokens; each row keeps its own decode state (Qwen-VL's M-RoPE
``rope_deltas``), so rows join and leave with theirs.

A bad request (DataError: bad image, empty or too long prompt) fails alone; an unexpected
error in a decoder call fails the requests of that call and the engine keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from var_export.core.contract import ATTENTION_MASK
from var_export.core.errors import DataError, RequestCancelled, VarExportError
from var_export.runtime import decode_step_numpy, empty_past

if TYPE_CHECKING:
    from PIL import Image

    from var_export.runtime import VarRuntime

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32  # as `var-export run`
_VISUAL = "visual"  # key of the (B, T) visual-token mask inside a batch's masks


@dataclasses.dataclass
class GenRequest:
    """One generation: the inputs of ``var-export run`` and where its text goes."""

    prompt: str
    image: str | bytes | Image.Image  # base64 of an encoded image (PNG/JPEG ...) or a PIL image
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    var: bool = True  # False: VAR off for this request (run --no-var)
    on_piece: Callable[[str], None] = lambda piece: None  # each new piece of text
    on_done: Callable[[Exception | None], None] = lambda error: None  # exactly once
    is_cancelled: Callable[[], bool] = lambda: False  # polled every step
    done: bool = dataclasses.field(default=False, init=False)  # on_done was called


def decode_image_b64(data: str | bytes) -> Image.Image:
    """An RGB PIL image from base64 text of an encoded image; DataError when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(
            f"input 'image': expected base64 text of an encoded PNG/JPEG; it is not valid base64 "
            f"({exc}). Send base64.b64encode(open(path, 'rb').read())."
        ) from exc
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"input 'image': the {len(raw)} decoded bytes are not a readable image "
            f"({type(exc).__name__}). Send an encoded PNG or JPEG."
        ) from exc


@dataclasses.dataclass
class _Prepared:
    """One admitted request's prompt, before it joins a prefill batch."""

    embeds: np.ndarray  # (S, D), image features merged in
    visual: np.ndarray  # (S,) bool: image tokens (all False with VAR off)
    positions: np.ndarray  # (S,) or M-RoPE (3, S), from the family's prefill_positions
    state: Any  # the family's decode state of this row (None, or Qwen-VL's rope_deltas [1, 1])
    budget: int  # tokens it may generate


@dataclasses.dataclass
class _Seq:
    """A running request: its row in the batch, its tokens and its streamed text."""

    req: GenRequest
    budget: int  # tokens it may still generate
    state: Any = None  # the family's decode state of this row (Qwen-VL: rope_deltas [1, 1])
    generated: list[int] = dataclasses.field(default_factory=list)
    emitted: str = ""
    next_token: int = 0
    finished: bool = False
    gone: bool = False  # sending to its client failed


class BatchedGenerator:
    """Continuous batching over a :class:`~var_export.runtime.VarRuntime` (module doc).

    ``max_batch``: most sequences decoded together (more wait in the queue).
    ``gather_s``: when idle, how long to wait for more requests to prefill together.
    """

    def __init__(self, runtime: VarRuntime, *, max_batch: int = 16, gather_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, found {max_batch}")
        self.rt = runtime
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._queue: queue.Queue[GenRequest] = queue.Queue()
        self._seqs: list[_Seq] = []
        self._past: dict[str, np.ndarray] = {}  # past_key_values.* (B,KV,T,hd), past_sink_mask (B,Lv,T)
        self._masks: dict[str, np.ndarray] = {}  # attention_mask (B,T) int64, visual (B,T) bool
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        pad = runtime.pad_token_id if runtime.pad_token_id is not None else (runtime.eos_token_id or 0)
        self._pad_embed = runtime._embed(np.array([[pad]], np.int64))[0, 0]  # (D,)
        self.stats = {"prefill_calls": 0, "decode_calls": 0, "max_rows": 0}

    # -- public -------------------------------------------------------------------------------

    def submit(self, req: GenRequest) -> None:
        """Queue a request (thread-safe); its callbacks run on the worker thread."""
        self._queue.put(req)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="var-llava-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running or queued end with RequestCancelled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail(list(self._seqs), RequestCancelled("the server is shutting down"))
        while not self._queue.empty():
            _finish(self._queue.get_nowait(), RequestCancelled("the server is shutting down"))

    def run_until_idle(self, max_iterations: int = 100_000) -> None:
        """Drive the engine on the calling thread until queue and batch are empty (tests)."""
        for _ in range(max_iterations):
            if not self._seqs and self._queue.empty():
                return
            self.step(block=False)
        raise RuntimeError(f"engine still busy after {max_iterations} iterations")

    def step(self, block: bool = True) -> None:
        """One iteration: admit + prefill new requests, then one decode step for all."""
        fresh = self._take(block)
        if fresh:
            self._guard(self._admit, fresh)
        self._drop_finished()
        if self._seqs:
            self._guard(self._decode, list(self._seqs))
            self._drop_finished()

    # -- worker -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step(block=True)

    def _take(self, block: bool) -> list[GenRequest]:
        room = self.max_batch - len(self._seqs)
        if room <= 0:
            return []
        out: list[GenRequest] = []
        if block and not self._seqs:
            try:  # idle: wait for work, then a short window for requests arriving together
                out.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
            time.sleep(self.gather_s)
        while len(out) < room:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _guard(self, fn: Callable[[list[Any]], None], items: list[Any]) -> None:
        """Run a batch operation; an unexpected error fails the batch's requests, not the engine."""
        try:
            fn(items)
        except Exception as exc:  # a decoder call failed: contain it to these requests
            log.exception("var_llava: a batch failed (%d requests)", len(items))
            err = exc if isinstance(exc, VarExportError) else RuntimeError(f"generation failed: {exc}")
            self._fail(self._seqs, err)
            for r in items:
                _finish(r.req if isinstance(r, _Seq) else r, err)  # once per request (GenRequest.done)
            self._seqs, self._past, self._masks = [], {}, {}

    # -- admission and prefill ----------------------------------------------------------------

    def _prepare(self, req: GenRequest) -> _Prepared | None:
        """The request's prompt as `var-export run` builds it, or None when the request failed."""
        rt = self.rt
        try:
            image = decode_image_b64(req.image) if isinstance(req.image, (bytes, str)) else req.image
            if req.max_new_tokens < 1:
                raise DataError(f"input 'max_new_tokens' must be >= 1, found {req.max_new_tokens}.")
            batch = rt.prepare(image, req.prompt)  # the family's processor: image tokens expanded
            embeds, _ = rt.prompt_embeds(batch)  # (1, S, D): the family's vision inputs and merge
            positions, state = rt.family.prefill_positions(batch)  # (1, S) or M-RoPE (3, 1, S)
        except VarExportError as exc:
            _finish(req, exc)
            return None
        ids = batch["input_ids"][0]
        budget = req.max_new_tokens
        if rt.max_positions is not None:
            budget = min(budget, rt.max_positions - len(ids))
        visual = (ids == rt.image_token_id) if (req.var and rt.has_var) else np.zeros(len(ids), bool)
        return _Prepared(embeds[0], visual, np.asarray(positions, np.int64)[..., 0, :], state, budget)

    def _admit(self, fresh: list[GenRequest]) -> None:
        prepared = [(r, p) for r in fresh if (p := self._prepare(r)) is not None]
        if not prepared:
            return
        s = max(len(p.embeds) for _, p in prepared)
        d = prepared[0][1].embeds.shape[1]
        lead = prepared[0][1].positions.shape[:-1]  # () or M-RoPE (3,)
        n = len(prepared)
        embeds = np.broadcast_to(self._pad_embed, (n, s, d)).copy()  # (n, S, D), left padding
        mask = np.zeros((n, s), np.int64)
        visual = np.zeros((n, s), bool)
        positions = np.ones((*lead, n, s), np.int64)  # pads: any position (their keys are masked)
        for i, (_, p) in enumerate(prepared):
            k = len(p.embeds)
            embeds[i, s - k :] = p.embeds
            mask[i, s - k :] = 1
            visual[i, s - k :] = p.visual
            positions[..., i, s - k :] = p.positions
        logits, past = decode_step_numpy(
            self.rt.decoder, embeds, mask, positions, empty_past(self.rt.decoder, n), visual
        )
        self.stats["prefill_calls"] += 1
        seqs = [_Seq(req=r, budget=p.budget, state=p.state) for r, p in prepared]
        self._join(seqs, past, {ATTENTION_MASK: mask, _VISUAL: visual})
        for seq, row in zip(seqs, logits[:, -1]):
            self._emit(seq, int(row.argmax()))

    def _join(self, seqs: list[_Seq], past: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        """Append rows to the running batch, left-padding the time axis of the shorter side."""
        if not self._seqs:
            self._seqs, self._past, self._masks = list(seqs), past, masks
        else:
            t = max(self._masks[ATTENTION_MASK].shape[1], masks[ATTENTION_MASK].shape[1])
            self._past = {k: np.concatenate([_left_pad(v, t), _left_pad(past[k], t)]) for k, v in self._past.items()}
            self._masks = {k: np.concatenate([_left_pad(v, t), _left_pad(masks[k], t)]) for k, v in self._masks.items()}
            self._seqs.extend(seqs)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._seqs))

    # -- decode -------------------------------------------------------------------------------

    def _decode(self, seqs: list[_Seq]) -> None:
        b = len(seqs)
        ids = np.array([[s.next_token] for s in seqs], np.int64)  # (B, 1)
        self._masks = {
            ATTENTION_MASK: np.concatenate([self._masks[ATTENTION_MASK], np.ones((b, 1), np.int64)], 1),
            _VISUAL: np.concatenate([self._masks[_VISUAL], np.zeros((b, 1), bool)], 1),
        }
        family = self.rt.family  # (B, 1) or M-RoPE (3, B, 1), each row with its own decode state
        state = family.join_states([s.state for s in seqs])
        position_ids = family.decode_positions(self._masks[ATTENTION_MASK], state)
        logits, self._past = decode_step_numpy(
            self.rt.decoder, self.rt._embed(ids), self._masks[ATTENTION_MASK], position_ids,
            self._past, self._masks[_VISUAL],
        )
        self.stats["decode_calls"] += 1
        for seq, row in zip(seqs, logits[:, -1]):
            self._emit(seq, int(row.argmax()))

    def _emit(self, seq: _Seq, token: int) -> None:
        """Record a token, stream its text (as VarRuntime.generate does), mark the end."""
        seq.generated.append(token)
        seq.next_token = token
        seq.budget -= 1
        text = self.rt._decode(seq.generated)
        if text.startswith(seq.emitted) and len(text) > len(seq.emitted):
            self._send(seq, text[len(seq.emitted) :])
            seq.emitted = text
        if token == self.rt.eos_token_id or seq.budget <= 0:
            if text != seq.emitted and text.startswith(seq.emitted):
                self._send(seq, text[len(seq.emitted) :])
                seq.emitted = text
            seq.finished = True

    def _send(self, seq: _Seq, piece: str) -> None:
        try:
            seq.req.on_piece(piece)
        except Exception as exc:  # the client is gone (or its sender failed): drop this request
            log.info("var_llava: dropping a request whose response failed (%s)", exc)
            seq.gone = True

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows; trim columns that are padding in every row."""
        keep: list[int] = []
        for i, s in enumerate(self._seqs):
            if s.gone or _cancelled(s.req):
                _finish(s.req, RequestCancelled("the client cancelled the request or disconnected"))
            elif s.finished:
                _finish(s.req, None)
            else:
                keep.append(i)
        if len(keep) == len(self._seqs):
            return
        self._seqs = [self._seqs[i] for i in keep]
        if not keep:
            self._past, self._masks = {}, {}
            return
        rows = np.array(keep)
        mask = self._masks[ATTENTION_MASK][rows]
        first = int(np.argmax(mask.any(0)))  # first column some row attends to
        self._masks = {k: v[rows][:, first:] for k, v in self._masks.items()}
        self._past = {k: v[rows][:, :, first:] for k, v in self._past.items()}

    def _fail(self, seqs: list[_Seq], error: Exception) -> None:
        for s in seqs:
            _finish(s.req, error)


def _left_pad(x: np.ndarray, t: int) -> np.ndarray:
    """Pad the time axis (last axis of masks / sink mask, axis 2 of KV) on the left to ``t``."""
    axis = 1 if x.ndim == 2 else 2
    missing = t - x.shape[axis]
    if missing == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (missing, 0)
    return np.pad(x, widths)


def _cancelled(req: GenRequest) -> bool:
    try:
        return bool(req.is_cancelled())
    except Exception:  # a sender that cannot tell any more is a gone client
        return True


def _finish(req: GenRequest, error: Exception | None) -> None:
    if req.done:
        return
    req.done = True
    try:
        req.on_done(error)
    except Exception:  # the client is gone; nothing else to tell it
        log.debug("var_llava: on_done failed", exc_info=True)


__all__ = ["BatchedGenerator", "DEFAULT_MAX_NEW_TOKENS", "GenRequest", "RequestCancelled", "decode_image_b64"]
