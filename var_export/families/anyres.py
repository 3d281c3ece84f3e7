"""Any-resolution packing of LLaVA-NeXT / LLaVA-OneVision tile features, in numpy.

The vision graph of these families returns per-tile features ``[N_tiles, N, D]`` (vision tower
+ feature selection + projector, run on every tile) and the learned ``image_newline`` [D]. What
follows depends on the *values* of ``image_sizes`` (the tile grid, the unpadding, OneVision's
``anyres_max_K`` downsampling), so it is done here on the host instead of in the graph: the same
computation as ``LlavaNextModel.pack_image_features`` / ``LlavaOnevisionModel.pack_image_features``
(transformers 5), op for op, in float32.

Token order of one image (what the processor expands ``<image>`` into): the base tile's N
features, then the unpadded tile grid row by row, each row followed by ``image_newline``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from var_export.core.errors import DataError


def select_best_resolution(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The grid pinpoint (height, width) HF chooses for an image of ``size_hw`` (same rule)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    best: tuple[int, int] | None = None
    max_effective, min_wasted = 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = pw * ph - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (int(ph), int(pw))
    if best is None:
        raise DataError(f"no grid pinpoint fits an image of size {h}x{w}; expected a non-empty image.")
    return best


def tile_grid(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[int, int]:
    """(tile rows, tile columns) of the high-resolution part of an image (base tile excluded)."""
    best_h, best_w = select_best_resolution(size_hw, pinpoints)
    return best_h // tile_size, best_w // tile_size


def num_tiles(size_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
    """Tiles the processor makes for one image: the grid plus the base (whole image) tile."""
    rows, cols = tile_grid(size_hw, pinpoints, tile_size)
    return rows * cols + 1


def unpad(feature: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Crop the rows / columns that came from the processor's padding. feature: (D, H, W)."""
    orig_h, orig_w = int(size_hw[0]), int(size_hw[1])
    cur_h, cur_w = feature.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return feature[:, pad : cur_h - pad, :]
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return feature[:, :, pad : cur_w - pad]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear resize (align_corners=False) on one axis."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(scale) - 0.5
    src = np.maximum(src, 0.0).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def bilinear(feature: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(x[None], [out_h, out_w], mode="bilinear")[0]``. (D, H, W)."""
    y0, y1, ly = _linear_weights(feature.shape[1], out_h)
    x0, x1, lx = _linear_weights(feature.shape[2], out_w)
    top = feature[:, y0]  # (D, out_h, W)
    bottom = feature[:, y1]
    rows = top * (1 - ly)[None, :, None] + bottom * ly[None, :, None]
    left, right = rows[:, :, x0], rows[:, :, x1]  # (D, out_h, out_w)
    return (left * (1 - lx)[None, None, :] + right * lx[None, None, :]).astype(feature.dtype)


def pack_image(
    tiles: np.ndarray,
    size_hw: Sequence[int],
    newline: np.ndarray,
    *,
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    max_tiles: int | None = None,
) -> np.ndarray:
    """One image's visual token features (n_tokens, D) from its tile features (n_tiles, N, D).

    ``max_tiles``: OneVision's ``anyres_max_K`` (K); a grid with more than ~K tiles' worth of
    features is bilinearly downsampled. None: LLaVA-NeXT (never downsampled).
    """
    n, d = tiles.shape[1], tiles.shape[2]
    side = int(math.isqrt(n))
    if side * side != n:
        raise DataError(f"expected a square number of features per tile, found {n}.")
    if tiles.shape[0] == 1:  # no high-resolution tiles: base + one newline
        return np.concatenate([tiles[0], newline[None].astype(tiles.dtype)], axis=0)
    rows, cols = tile_grid(size_hw, pinpoints, tile_size)
    if tiles.shape[0] != rows * cols + 1:
        raise DataError(
            f"an image of size {tuple(size_hw)} needs {rows * cols + 1} tiles (grid {rows}x{cols} + base), "
            f"found {tiles.shape[0]}. Preprocess it with the model's processor."
        )
    grid = tiles[1:].reshape(rows, cols, side, side, d)  # (rows, cols, h, w, D)
    grid = grid.transpose(4, 0, 2, 1, 3).reshape(d, rows * side, cols * side)  # (D, H, W)
    grid = unpad(grid, size_hw)
    if max_tiles is not None:
        cur_h, cur_w = grid.shape[1:]
        ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
        if ratio > 1.1:
            grid = bilinear(grid, int(cur_h // ratio), int(cur_w // ratio))
    nl = np.broadcast_to(newline.astype(grid.dtype)[:, None, None], (d, grid.shape[1], 1))
    grid = np.concatenate([grid, nl], axis=-1)  # (D, H, W + 1)
    return np.concatenate([tiles[0], grid.reshape(d, -1).T], axis=0)


def max_tiles_of(vision_aspect_ratio: str | None) -> int | None:
    """K of OneVision's ``anyres_max_K``; None for anything else (LLaVA-NeXT)."""
    if not vision_aspect_ratio or not str(vision_aspect_ratio).startswith("anyres_max_"):
        return None
    return int(str(vision_aspect_ratio)[len("anyres_max_") :])


def pack_batch(
    tile_features: np.ndarray,
    image_sizes: np.ndarray,
    newline: np.ndarray,
    *,
    pinpoints: Sequence[Sequence[int]],
    tile_size: int,
    max_tiles: int | None = None,
) -> list[np.ndarray]:
    """Per image (n_tokens, D): ``tile_features`` (sum of tiles, N, D) holds the images' tiles in
    order (as :func:`flatten_tiles` lays them out); ``image_sizes`` (I, 2) (height, width)."""
    out, start = [], 0
    for size in np.asarray(image_sizes).tolist():
        k = num_tiles(size, pinpoints, tile_size)
        out.append(
            pack_image(tile_features[start : start + k], size, newline, pinpoints=pinpoints,
                       tile_size=tile_size, max_tiles=max_tiles)
        )
        start += k
    if start != tile_features.shape[0]:
        raise DataError(f"the images need {start} tiles, the vision encoder got {tile_features.shape[0]}.")
    return out


def flatten_tiles(
    pixel_values: np.ndarray, image_sizes: np.ndarray, *, pinpoints: Sequence[Sequence[int]], tile_size: int
) -> np.ndarray:
    """The processor's padded ``pixel_values`` (I, max_tiles, C, H, W) -> the real tiles
    (sum of tiles, C, H, W), image by image (padding tiles dropped), as HF does."""
    pv = np.asarray(pixel_values)
    if pv.ndim == 4:
        return pv
    parts = [pv[i, : num_tiles(size, pinpoints, tile_size)] for i, size in enumerate(np.asarray(image_sizes).tolist())]
    return np.concatenate(parts, axis=0)
