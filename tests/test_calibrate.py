"""Calibration: planted sink dims and heads are found, the file is checked, the CLI fails cleanly."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from var_export.calibration.calibrate import (
    SCHEMA_VERSION,
    calibrate,
    load_calibration,
    write_calibration,
)
from var_export.cli import main
from var_export.core.errors import CalibrationError, ConfigError
from var_export.core.settings import VarSettings
from var_export.inputs import calibration_samples

HIDDEN = 64


# ---- a planted random LLaMA (no processor: prepared samples with inputs_embeds) ---------------


def planted_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    from var_export.models import model_fingerprint

    return types.SimpleNamespace(model=model, processor=None, config=cfg,
                                 spec=types.SimpleNamespace(name="planted-llama"),
                                 fingerprint=lambda: model_fingerprint(cfg))


def planted_samples(n: int, dims=(5, 17), s: int = 14):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(1, s, HIDDEN, generator=g)
        for pos in (0, 3, 7):  # BOS and two image patches
            x[:, pos, list(dims)] = 300.0
        visual = torch.zeros(1, s, dtype=torch.bool)
        visual[:, 2:10] = True
        out.append({"inputs_embeds": x, "attention_mask": torch.ones(1, s, dtype=torch.long),
                    "visual_token_mask": visual})
    return out


def knobs(**kw) -> VarSettings:
    return VarSettings(**{"sink_dims": (0,), "tau": 4.0, **kw})


def test_planted_random_model_dims_stats_and_preset_check(caplog):
    lm = planted_llama()
    with caplog.at_level(logging.WARNING, logger="var_export.calibration.calibrate"):
        cal = calibrate(lm, planted_samples(3), knobs(), preset_sink_dims=[3, 9])
    assert cal["sink_dims"] == [5, 17] and cal["sink_dims_source"] == "data"
    assert "differ from the preset" in caplog.text
    assert cal["schema_version"] == SCHEMA_VERSION and cal["num_samples"] == 3
    assert cal["settings"]["var_layers"] == [2, 3] and cal["settings"]["convention"] == "code"
    for row in cal["layers"]:
        assert row["sink_count"] == 9 and row["visual_sink_count"] == 6  # 3 sinks x 3 samples
        assert row["eligible_rows"] == 3 * 4  # queries 10..13 of each sample
        assert len(row["image_centric_score"]) == 4
        assert all(0.0 <= x <= 1.0 for x in row["image_centric_score"])
    assert cal["heads"] == [[r["layer"], h] for r in cal["layers"]
                            for h, x in enumerate(r["image_centric_score"]) if x >= 0.5]
    # a user's dims are kept as given, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="var_export.calibration.calibrate"):
        cal = calibrate(lm, planted_samples(2), knobs(), user_sink_dims="5")
    assert cal["sink_dims"] == [5] and cal["sink_dims_source"] == "user"
    assert "keeping --sink-dims" in caplog.text
    # threshold 0 selects everything, 1.0 only perfect heads
    cal0 = calibrate(lm, planted_samples(2), knobs(), head_threshold=0.0)
    assert len(cal0["heads"]) == 2 * 4


def test_no_sink_dims_anywhere_is_an_error():
    lm = planted_llama()
    with pytest.raises(CalibrationError, match="no sink dims found"):
        calibrate(lm, planted_samples(2), knobs(tau=7.9))  # sqrt(64) = 8 bounds every |n[d]|
    cal = calibrate(lm, planted_samples(2), knobs(tau=7.9), preset_sink_dims=[5, 17])
    assert cal["sink_dims"] == [5, 17] and cal["sink_dims_source"] == "preset"
    with pytest.raises(ConfigError, match="hidden size"):
        calibrate(lm, planted_samples(1), knobs(), user_sink_dims=[5, HIDDEN])


def test_write_and_load_calibration(tmp_path):
    lm = planted_llama()
    cal = calibrate(lm, planted_samples(1), knobs())
    path = write_calibration(cal, tmp_path / "sub" / "cal.json")
    assert [p.name for p in path.parent.iterdir()] == ["cal.json"]  # no temp file left
    assert load_calibration(path, fingerprint=cal["fingerprint"]) == cal
    other = dict(cal["fingerprint"], hidden_size=4096, config_sha256="0" * 64)
    with pytest.raises(CalibrationError, match="made for model 'planted-llama'"):
        load_calibration(path, fingerprint=other)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not a readable JSON"):
        load_calibration(bad)
    bad.write_text(json.dumps({**cal, "schema_version": 99}))
    with pytest.raises(CalibrationError, match="schema_version"):
        load_calibration(bad)
    bad.write_text(json.dumps({**cal, "heads": [[1]]}))
    with pytest.raises(CalibrationError, match="heads"):
        load_calibration(bad)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")


# ---- tiny-llava: the planted phenomenon ----------------------------------------------------------


def test_tiny_llava_finds_planted_dims_and_heads(tiny_loaded):
    from var_export.calibration.tiny_llava import PLANTED_IMAGE_CENTRIC_HEADS, TINY_SINK_DIMS
    from var_export.models import model_fingerprint

    settings = VarSettings(sink_dims=TINY_SINK_DIMS)  # defaults: tau 20, rho 0.5, summ 0.2
    cal = calibrate(tiny_loaded, calibration_samples(None, 6), settings, preset_sink_dims=TINY_SINK_DIMS)
    assert cal["sink_dims"] == list(TINY_SINK_DIMS)
    assert cal["sink_dims_found"] == list(TINY_SINK_DIMS)
    assert cal["heads"] == [list(h) for h in PLANTED_IMAGE_CENTRIC_HEADS]
    assert cal["fingerprint"] == json.loads(json.dumps(model_fingerprint(tiny_loaded.config)))
    assert all(row["sink_count"] > 0 and row["visual_share"] > 0.5 for row in cal["layers"])


# ---- the command line ---------------------------------------------------------------------------


def _write_images(folder: Path, n: int) -> None:
    from var_export.calibration.tiny_llava import synthetic_images

    folder.mkdir()
    for i, img in enumerate(synthetic_images(n, seed=3)):
        img.save(folder / f"img{i}.png")


def test_cli_calibrate_with_data_folder(tmp_path, tiny_loaded):
    data = tmp_path / "data"
    _write_images(data, 2)
    (data / "prompts.txt").write_text("What is in the image?\nWhere is the red square?\n")
    out = tmp_path / "cal.json"
    rc = main(["-q", "calibrate", "--model", "tiny-llava", "--out", str(out), "--data", str(data)])
    assert rc == 0
    from var_export.models import model_fingerprint

    cal = load_calibration(out, fingerprint=model_fingerprint(tiny_loaded.config))
    assert cal["num_samples"] == 2 and cal["sink_dims"] == [5, 17]


@pytest.mark.parametrize(
    "extra",
    [
        ["--p", "1.5"],
        ["--p", "0"],
        ["--rho", "-0.1"],
        ["--summ", "1.2"],
        ["--tau", "0"],
        ["--head-threshold", "2"],
        ["--sink-dims", "5,1024"],  # hidden size is 1024
        ["--model", "no-such-preset"],
        ["--model", "./missing-model-dir"],
        ["--layers", "7"],
    ],
)
def test_cli_bad_input_fails_without_writing(tmp_path, extra):
    out = tmp_path / "cal.json"
    args = ["calibrate", "--model", "tiny-llava", "--out", str(out), "--num-samples", "1", *extra]
    assert main(args) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_data_fails_without_writing(tmp_path):
    out = tmp_path / "out" / "cal.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "--model", "tiny-llava", "--out", str(out), "--data", str(empty)]) != 0
    broken = tmp_path / "broken"
    _write_images(broken, 1)
    (broken / "zz.png").write_bytes(b"\x89PNG not really")
    assert main(["calibrate", "--model", "tiny-llava", "--out", str(out), "--data", str(broken)]) != 0
    assert main(["calibrate", "--model", "tiny-llava", "--out", str(out),
                 "--data", str(tmp_path / "nope")]) != 0
    assert not (tmp_path / "out").exists()
