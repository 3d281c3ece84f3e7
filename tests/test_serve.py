"""Continuous batching (var_export.engine): each request's text equals `var-export run`'s."""

from __future__ import annotations

import base64

import pytest

from var_export.core.errors import DataError, RequestCancelled
from var_export.engine import BatchedGenerator, GenRequest, decode_image_b64
from var_export.runtime import VarRuntime

PROMPTS = (
    "What is in the picture?",
    "Describe the red square and the picture in words.",
    "Colors?",
)


@pytest.fixture(scope="module")
def runtimes(tiny_var_bundle):
    bundle = tiny_var_bundle["bundle"]
    return {True: VarRuntime(bundle, var=True), False: VarRuntime(bundle, var=False)}


@pytest.fixture(scope="module")
def b64(tiny_var_bundle):
    return [base64.b64encode(p.read_bytes()) for p in tiny_var_bundle["images"]]


class Client:
    """Collects the pieces and the end of one request."""

    def __init__(self, prompt, image, *, var=True, max_new_tokens=8, cancel_after=None):
        self.pieces: list[str] = []
        self.error: Exception | None = None
        self.done = 0
        self.cancel_after = cancel_after
        self.request = GenRequest(
            prompt, image, max_new_tokens=max_new_tokens, var=var, on_piece=self.pieces.append,
            on_done=self._done, is_cancelled=self._cancelled,
        )

    def _done(self, error):
        self.done += 1
        self.error = error

    def _cancelled(self):
        return self.cancel_after is not None and len(self.pieces) >= self.cancel_after

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _expected(runtimes, tiny_var_bundle, prompt, image_index, var, n):
    return runtimes[var].generate(tiny_var_bundle["images"][image_index], prompt, max_new_tokens=n).text


def test_batched_texts_equal_single_runs_var_on_and_off(runtimes, b64, tiny_var_bundle):
    engine = BatchedGenerator(runtimes[True], max_batch=8)
    cases = [(PROMPTS[i % 3], i % 3, i % 2 == 0, 4 + 3 * (i % 3)) for i in range(6)]
    clients = [Client(p, b64[im], var=var, max_new_tokens=n) for p, im, var, n in cases]
    for c in clients[:4]:  # four arrive together: one prefill call
        engine.submit(c.request)
    engine.step(block=False)
    engine.step(block=False)
    for c in clients[4:]:  # two join the running batch
        engine.submit(c.request)
    engine.run_until_idle()
    for c, (p, im, var, n) in zip(clients, cases):
        assert c.done == 1 and c.error is None
        assert c.text == _expected(runtimes, tiny_var_bundle, p, im, var, n)
        assert c.text
    assert engine.stats["prefill_calls"] == 2  # 4 together, then 2 together
    assert engine.stats["max_rows"] == 6  # the late two decoded with the first four


def test_bad_requests_fail_alone(runtimes, b64, tiny_var_bundle):
    engine = BatchedGenerator(runtimes[True], max_batch=8)
    good = Client(PROMPTS[0], b64[0], max_new_tokens=6)
    bad = {
        "base64": Client(PROMPTS[0], b"not base64 !!"),
        "image": Client(PROMPTS[0], base64.b64encode(b"plain text, no image")),
        "prompt": Client("", b64[0]),
        "long": Client("word " * 5000, b64[0]),
        "tokens": Client(PROMPTS[0], b64[0], max_new_tokens=0),
    }
    for c in (*bad.values(), good):
        engine.submit(c.request)
    engine.run_until_idle()
    for name, c in bad.items():
        assert c.done == 1 and isinstance(c.error, DataError), name
        assert c.pieces == []
    assert "base64" in str(bad["base64"].error)
    assert "positions" in str(bad["long"].error)
    assert good.error is None and good.text == _expected(runtimes, tiny_var_bundle, PROMPTS[0], 0, True, 6)


def test_cancelled_request_leaves_the_batch(runtimes, b64, tiny_var_bundle):
    engine = BatchedGenerator(runtimes[True], max_batch=8)
    gone = Client(PROMPTS[1], b64[1], max_new_tokens=12, cancel_after=1)
    stays = Client(PROMPTS[2], b64[2], max_new_tokens=10)
    engine.submit(gone.request)
    engine.submit(stays.request)
    engine.run_until_idle()
    assert isinstance(gone.error, RequestCancelled) and gone.done == 1 and len(gone.pieces) == 1
    assert stays.error is None and stays.text == _expected(runtimes, tiny_var_bundle, PROMPTS[2], 2, True, 10)


def test_worker_thread_serves_and_stops(runtimes, b64, tiny_var_bundle):
    engine = BatchedGenerator(runtimes[True], max_batch=2)
    clients = [Client(PROMPTS[i % 3], b64[i % 3], max_new_tokens=5) for i in range(3)]
    import threading

    ended = threading.Semaphore(0)
    for c in clients:
        inner = c.request.on_done
        c.request.on_done = lambda e, inner=inner: (inner(e), ended.release())
    engine.start()
    try:
        for c in clients:
            engine.submit(c.request)
        for _ in clients:
            assert ended.acquire(timeout=60)
    finally:
        engine.stop()
    for i, c in enumerate(clients):
        assert c.error is None and c.text == _expected(runtimes, tiny_var_bundle, PROMPTS[i % 3], i % 3, True, 5)
    assert engine.stats["max_rows"] <= 2  # max_batch holds the third back


def test_decode_image_b64_errors():
    with pytest.raises(DataError, match="base64"):
        decode_image_b64("%%%")
    with pytest.raises(DataError, match="not a readable image"):
        decode_image_b64(base64.b64encode(b"hello"))
