"""``var-export inspect`` on tiny-llava: the pictures exist, and their numbers are the model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from var_export.calibration.calibrate import calibrate
from var_export.calibration.tiny_llava import (
    GRID,
    PLANTED_IMAGE_CENTRIC_HEADS,
    SINK_COLOURFULNESS_THRESHOLD,
    TINY_SINK_DIMS,
    patch_colourfulness,
    synthetic_images,
)
from var_export.cli import main
from var_export.core.errors import BundleError, ConfigError, DataError, VarExportError
from var_export.core.settings import VarSettings
from var_export.inputs import prepare_batch
from var_export.inspect import (
    HEAD_SCORES_PNG,
    SINK_COUNTS_PNG,
    SINKS_PNG,
    SUMMARY,
    inspect_bundle,
    inspect_model,
)
from var_export.models import load_llava, model_fingerprint

PROMPT = "What is in the image?"
SEED = 3  # synthetic image: grey background (sinks) with a few coloured boxes


@pytest.fixture(scope="module")
def tiny():
    return load_llava("tiny-llava")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "boxes.png"
    synthetic_images(1, seed=SEED)[0].save(path)
    return path


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory, image_path) -> Path:
    """``var-export inspect --model tiny-llava`` once (head scores computed from this image)."""
    out = tmp_path_factory.mktemp("cli") / "pics"
    rc = main(["-q", "inspect", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT, "--out", str(out)])
    assert rc == 0
    return out


def independent_sink_patches(tiny, image_path: Path, layer: int, tau: float = 20.0) -> np.ndarray:
    """(GRID, GRID) bool from HF's own hidden states (no reference code): DESIGN.md §1 sink test."""
    batch = prepare_batch(tiny.processor, [Image.open(image_path)], [PROMPT])
    with torch.no_grad():
        out = tiny.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"], output_hidden_states=True,
        )
    x = out.hidden_states[layer][0].float()  # (S, D): input of decoder layer `layer`
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    sink = normed[:, list(TINY_SINK_DIMS)].abs().amax(-1) > tau  # (S,)
    visual = batch["visual_token_mask"][0]
    return sink[visual].reshape(GRID, GRID).numpy()


def patches(entry: dict) -> np.ndarray:
    m = np.zeros((GRID, GRID), dtype=bool)
    for r, c in entry["sink_patches"]:
        m[r, c] = True
    return m


def check_png(path: Path, min_w: int = 400, min_h: int = 250) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert min_w <= w <= 4000 and min_h <= h <= 4000, (path.name, img.size)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, f"{path.name} looks blank"


def test_cli_writes_valid_pngs_and_summary(cli_out):
    summary = json.loads((cli_out / SUMMARY).read_text())
    att = summary["attention"]
    names = [SINKS_PNG, SINK_COUNTS_PNG, HEAD_SCORES_PNG, f"attention_{att['layer']}_{att['head']}.png", SUMMARY]
    assert sorted(p.name for p in cli_out.iterdir()) == sorted([*names, ".var-export-owned"])
    assert summary["files"] == names
    for name in names[:-1]:
        check_png(cli_out / name)
    assert not [p for p in cli_out.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_sink_patches_are_the_planted_ones(cli_out, tiny, image_path):
    summary = json.loads((cli_out / SUMMARY).read_text())
    assert summary["grid"] == [GRID, GRID]
    assert summary["var_layers"] == [2, 3]
    batch = prepare_batch(tiny.processor, [Image.open(image_path)], [PROMPT])
    planted = (patch_colourfulness(batch["pixel_values"])[0] < SINK_COLOURFULNESS_THRESHOLD).reshape(GRID, GRID).numpy()
    assert 0 < planted.sum() < GRID * GRID
    for entry in summary["layers"]:
        layer = entry["layer"]
        got = patches(entry)
        np.testing.assert_array_equal(got, independent_sink_patches(tiny, image_path, layer), err_msg=f"layer {layer}")
        if layer >= 2:
            np.testing.assert_array_equal(got, planted, err_msg=f"layer {layer}")
            assert entry["visual_sinks"] == planted.sum()
            assert entry["text_sinks"] == 1  # BOS
        else:
            assert entry["visual_sinks"] == entry["text_sinks"] == 0


def test_default_head_is_a_planted_image_centric_head_and_var_moves_mass(cli_out):
    summary = json.loads((cli_out / SUMMARY).read_text())
    hs = summary["head_scores"]
    assert sorted(map(tuple, hs["selected"])) == PLANTED_IMAGE_CENTRIC_HEADS
    att = summary["attention"]
    assert (att["layer"], att["head"]) in PLANTED_IMAGE_CENTRIC_HEADS
    assert hs["scores"][att["layer"]][att["head"]] == max(max(r) for r in hs["scores"] if r[0] is not None)
    assert att["row_eligible"] and att["row_changed"]
    p = summary["settings"]["p"]
    before, after = att["before"], att["after"]
    # DESIGN.md §1 on a selected row: sinks keep p, the rest moves to visual non-sinks
    assert after["visual_sinks"] == pytest.approx(p * before["visual_sinks"], rel=1e-4)
    assert after["other_text"] == pytest.approx(before["other_text"], abs=1e-6)
    moved = (1 - p) * (before["visual_sinks"] + before["text_sinks"])
    assert att["moved_from_sinks"] == pytest.approx(moved, rel=1e-4)
    assert att["gained_by_visual_nonsinks"] == pytest.approx(moved, rel=1e-3)
    grid_b, grid_a = np.array(att["grid_before"]), np.array(att["grid_after"])
    assert grid_b.shape == grid_a.shape == (GRID, GRID)
    assert grid_b.sum() == pytest.approx(before["visual_sinks"] + before["visual_nonsinks"], abs=1e-4)


def _dummy_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_bundle_uses_its_calibration_and_settings(tmp_path, tiny, image_path):
    from var_export.bundle import write_bundle

    settings = VarSettings(sink_dims=TINY_SINK_DIMS, heads="hybrid")
    cal = calibrate(tiny, [(img, PROMPT) for img in synthetic_images(2, seed=0)], settings)
    graphs = {n: _dummy_graph(tmp_path / n) for n in ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")}
    bundle = write_bundle(
        tmp_path / "bundle", graphs=graphs, calibration=cal, processor=tiny.processor,
        manifest_fields={
            "model_id": "tiny-llava", "fingerprint": model_fingerprint(tiny.config),
            "var": settings.to_dict(), "var_layers": [2, 3], "head_mode": "hybrid", "heads": cal["heads"],
        },
    )
    result = inspect_bundle(bundle, image_path, PROMPT, tmp_path / "out", layer=3)
    hs = result.summary["head_scores"]
    assert hs["num_samples"] == 2 and hs["source"].endswith("calibration.json")
    for entry in cal["layers"]:
        assert hs["scores"][entry["layer"]] == pytest.approx(entry["image_centric_score"])
    assert hs["selected"] == cal["heads"]
    assert (result.layer, result.head) in PLANTED_IMAGE_CENTRIC_HEADS and result.layer == 3
    assert (tmp_path / "out" / f"attention_3_{result.head}.png").is_file()


def test_errors(tmp_path, tiny, image_path):
    settings = VarSettings(sink_dims=TINY_SINK_DIMS, heads="dynamic")
    out = tmp_path / "out"
    for kw, match in (({"layer": 9}, "out of range"), ({"head": 8}, "out of range"), ({"layer": 1}, "not a VAR layer")):
        with pytest.raises(ConfigError, match=match):
            inspect_model(tiny, image_path, PROMPT, settings, None, out, **kw)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        inspect_model(tiny, bad, PROMPT, settings, None, out)
    with pytest.raises(DataError, match="does not exist"):
        inspect_model(tiny, tmp_path / "missing.png", PROMPT, settings, None, out)
    with pytest.raises(BundleError):
        inspect_bundle(tmp_path / "no-bundle", image_path, PROMPT, out)
    with pytest.raises(ConfigError, match="needs calibrated heads"):
        inspect_model(tiny, image_path, PROMPT, settings.replace(heads="static"), None, out)
    assert not out.exists()
    assert issubclass(DataError, VarExportError)


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "tiny-llava", "--layer", "9"],
        ["--model", "tiny-llava", "--image", "{bad}"],
        ["{missing_bundle}"],
        ["{missing_bundle}", "--tau", "5"],
    ],
)
def test_cli_errors_exit_non_zero(tmp_path, image_path, capsys, extra):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    args = ["inspect", "--image", str(image_path), "--prompt", PROMPT, "--out", str(tmp_path / "o")]
    args += [a.format(bad=bad, missing_bundle=tmp_path / "nothing") for a in extra]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "Error" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_out_dir_of_the_user_is_refused_ours_is_replaced(tmp_path, tiny, image_path):
    from var_export.core.errors import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    settings = VarSettings(sink_dims=TINY_SINK_DIMS, heads="dynamic")
    with pytest.raises(OutputError, match="notes.txt"):
        inspect_model(tiny, image_path, PROMPT, settings, None, out, layer=2, head=6)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    ours = tmp_path / "ours"
    inspect_model(tiny, image_path, PROMPT, settings, None, ours, layer=2, head=6)
    result = inspect_model(tiny, image_path, PROMPT, settings, None, ours, layer=2, head=6)  # replaced
    assert all(p.is_file() for p in result.files)
    assert result.summary["head_scores"]["source"] is None
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_head_option_reaches_inspect(tmp_path, image_path, capsys):
    args = ["inspect", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT,
            "--out", str(tmp_path / "o"), "--head", "99"]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own error
        rc = exc.code
    assert rc != 0 and "--head 99 is out of range" in capsys.readouterr().err


def test_many_layers_draw_one_union_panel(tmp_path):
    """A 7B-sized layout (30 VAR layers, 24x24 grid, 32 heads) draws without the model."""
    from var_export.inspect import plot_head_scores, plot_sink_counts, plot_sinks

    rng = np.random.default_rng(0)
    grid, layers, heads = 24, 32, 32
    summary = {
        "grid": [grid, grid],
        "settings": VarSettings(sink_dims=(1415, 2533)).to_dict(),
        "tokens": {"total": 600, "visual": grid * grid, "text": 24},
        "layers": [
            {"layer": i, "var_layer": i >= 2, "visual_sinks": 3, "text_sinks": 1,
             "sink_patches": [[int(r), int(c)] for r, c in rng.integers(0, grid, (3, 2))] if i >= 2 else []}
            for i in range(layers)
        ],
        "head_scores": {"source": "calibration.json", "num_samples": 8, "selected": [[5, 3], [20, 31]],
                        "scores": [[None] * heads] * 2 + rng.random((layers - 2, heads)).round(3).tolist()},
        "attention": {"layer": 5, "head": 3},
    }
    image = rng.random((336, 336, 3))
    plot_sinks(tmp_path / "s.png", summary, image)
    plot_sink_counts(tmp_path / "c.png", summary)
    plot_head_scores(tmp_path / "h.png", summary)
    for name in ("s.png", "c.png", "h.png"):
        check_png(tmp_path / name)


def test_sink_outline_boxes_the_sink_patches_themselves():
    """When sinks are most of the image, the outline still marks the sinks (one box per sink
    patch, inside it), not the boundary of the non-sink holes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from var_export.inspect import _outline

    mask = np.ones((8, 8), dtype=bool)
    mask[2:5, 1:4] = False  # a 3x3 hole of non-sink patches
    fig, ax = plt.subplots()
    _outline(ax, mask, "red")
    (boxes,) = ax.collections
    paths = boxes.get_paths()
    assert len(paths) == int(mask.sum())
    for path in paths:
        (x0, y0), (x1, y1) = path.vertices.min(0), path.vertices.max(0)
        r, c = int(y0), int(x0)
        assert mask[r, c] and x1 <= c + 1 and y1 <= r + 1, (r, c)  # inside one sink cell
    plt.close(fig)
