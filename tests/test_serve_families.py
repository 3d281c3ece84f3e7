"""Continuous batching (var_export.engine) for the other families: tiny-qwen2.5-vl (M-RoPE,
dynamic resolution, per-row rope_deltas) and tiny-llava-next (tiles + image_newline packing);
with ``-m slow`` also tiny-llava-onevision and tiny-internvl (each exports its decoder).

Rows of one batch carry images of different sizes (different numbers of image tokens), VAR on and
off, join a running batch and leave it at different steps; each request's text equals
`var-export run`'s (VarRuntime.generate) for the same prompt and image. The bundles are the
session's (conftest.tiny_qwen_bundle, conftest.tiled): nothing is exported here.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.serve_fixtures import PROMPTS, family_bundle, family_images, family_params
from var_export.engine import BatchedGenerator, GenRequest
from var_export.runtime import VarRuntime


@pytest.fixture(scope="module", params=family_params())
def case(request, tmp_path_factory, tiled):  # tiled: lazy; names the shared exports (xdist group)
    bundle = family_bundle(request, request.param)
    images = family_images(request.param, tmp_path_factory.mktemp(request.param))
    runtimes = {v: VarRuntime(bundle, var=v) for v in (True, False)}
    return {"name": request.param, "bundle": bundle, "images": images, "rt": runtimes,
            "b64": [base64.b64encode(p.read_bytes()) for p in images]}


class Client:
    def __init__(self, prompt, image, *, var=True, max_new_tokens=8):
        self.pieces: list[str] = []
        self.errors: list[Exception | None] = []
        self.request = GenRequest(prompt, image, max_new_tokens=max_new_tokens, var=var,
                                  on_piece=self.pieces.append, on_done=self.errors.append)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def test_rows_of_different_image_sizes_join_and_leave(case):
    rt = case["rt"][True]
    batches = [rt.prepare(p, PROMPTS[0]) for p in case["images"]]
    image_tokens = [int((b["input_ids"] == rt.image_token_id).sum()) for b in batches]
    assert len(set(image_tokens)) == 3, image_tokens  # the rows really differ
    if case["name"] == "qwen":  # M-RoPE: per-row rope_deltas that differ between the images
        deltas = [int(rt.family.prefill_positions(b)[1][0, 0]) for b in batches]
        assert len(set(deltas)) == 3 and all(d < 0 for d in deltas), deltas

    engine = BatchedGenerator(rt, max_batch=8)
    # (prompt, image, var, max_new_tokens): budgets differ, so rows leave at different steps
    cases = [(PROMPTS[k % 3], k % 3, k % 2 == 0, 3 + 2 * k) for k in range(6)]
    clients = [Client(p, case["b64"][i], var=v, max_new_tokens=n) for p, i, v, n in cases]
    for c in clients[:3]:  # three sizes prefilled together (left padding)
        engine.submit(c.request)
    engine.step(block=False)
    engine.step(block=False)
    engine.step(block=False)
    for c in clients[3:]:  # three join the running batch, the first has left it by then (3 tokens)
        engine.submit(c.request)
    engine.run_until_idle()
    assert engine.stats["prefill_calls"] == 2
    assert engine.stats["max_rows"] == 5  # the first request (3 tokens) left before the others joined
    for c, (p, i, v, n) in zip(clients, cases):
        assert c.errors == [None]
        want = case["rt"][v].generate(case["images"][i], p, max_new_tokens=n).text
        assert want and c.text == want, (p, i, v, n)


def test_decode_positions_come_from_the_family(case, monkeypatch):
    """The engine asks the bundle's family for every position (prefill and decode), with each
    running row's own decode state."""
    rt = case["rt"][True]
    fam = rt.family
    calls = {"prefill": 0, "decode": []}
    real_prefill, real_decode = fam.prefill_positions, fam.decode_positions

    def prefill(batch):
        calls["prefill"] += 1
        return real_prefill(batch)

    def decode(mask, state):
        calls["decode"].append(None if state is None else np.asarray(state).copy())
        return real_decode(mask, state)

    monkeypatch.setattr(fam, "prefill_positions", prefill)
    monkeypatch.setattr(fam, "decode_positions", decode)
    engine = BatchedGenerator(rt, max_batch=4)
    clients = [Client(PROMPTS[i], case["b64"][i], max_new_tokens=2 + i) for i in range(3)]
    for c in clients:
        engine.submit(c.request)
    engine.run_until_idle()
    assert all(c.errors == [None] for c in clients)
    assert calls["prefill"] == 3 and len(calls["decode"]) == 3  # 3 decode steps (budgets 2, 3, 4)
    if case["name"] == "qwen":
        rows = [real_prefill(rt.prepare(case["images"][i], PROMPTS[i]))[1] for i in range(3)]
        np.testing.assert_array_equal(calls["decode"][0], np.concatenate(rows))  # (3, 1)
        np.testing.assert_array_equal(calls["decode"][-1], rows[2])  # the rows that left took theirs
    else:
        assert calls["decode"] == [None, None, None]
