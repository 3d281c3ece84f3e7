"""A literal, loop-by-loop re-implementation of the released VAR code, for tests only.

MICV-yonsei/VisAttnSink, src/logic/logic.py: ``DimProspector.run_logic``, ``HeadFork.run_logic``
and ``VARProcessor.attn_redist``. The released code keeps its state in class attributes
(``indices``, ``forked_head``, ``MetadataStation``); here every piece of that state is an explicit
argument. Its assumptions are kept as they are: batch 1, one contiguous image span
``im .. im + pa - 1``; at prefill only queries ``>= im + pa`` are redistributed, at decode every
row. It is written independently (not copied) and deliberately keeps the released control flow
(per-head loop, ``nonzero`` coordinates, index lists) so that the vectorised reference in
``calibration.reference`` can be checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weightless_rmsnorm(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, S, D) -> (B, S, D) float32, no weight."""
    x = hidden.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def dim_prospector(hidden: torch.Tensor, dim_sink: Sequence[int], tau: float) -> torch.Tensor:
    """``DimProspector.run_logic``: token indices (n,) whose max |rmsnorm| over dim_sink > tau.

    hidden: (1, S, D) input of a decoder layer (prefill only in the released code).
    """
    magnitudes = torch.abs(weightless_rmsnorm(hidden))  # (1, S, D)
    per_dim = torch.stack([magnitudes[:, :, d] for d in dim_sink], dim=-1)  # (1, S, n_dims)
    largest = torch.max(per_dim, dim=-1)[0]  # (1, S)
    return torch.nonzero(largest > tau)[:, 1]  # token axis of the (batch, token) pairs


def head_fork(
    attn: torch.Tensor, sink_inds: torch.Tensor, im: int, pa: int, rho: float, summ: float
) -> torch.Tensor | list:
    """``HeadFork.run_logic``: (n, 3) coordinates (batch, head, query) of selected rows, or [].

    attn: (1, H, Q, T) post-softmax; sink_inds: sink token indices of this layer.
    """
    visual_sinks = [i.unsqueeze(0) for i in sink_inds if im <= i < im + pa]
    if len(visual_sinks) == 0:
        return []
    visual_sinks_t = torch.cat(visual_sinks, dim=0)  # (n,)
    image_attn = attn[:, :, :, im : im + pa]  # (1, H, Q, pa)
    portion = torch.sum(image_attn[:, :, :, visual_sinks_t - im], dim=-1) / torch.sum(
        image_attn + 1e-6, dim=-1
    )  # (1, H, Q)
    summation = torch.sum(image_attn, dim=-1)  # (1, H, Q)
    portion_ok = portion <= rho
    summation_ok = summation >= summ
    return torch.nonzero(portion_ok & summation_ok).clone()


def attn_redist(
    attention_map: torch.Tensor,
    coord: torch.Tensor | list,
    indices: torch.Tensor,
    im: int,
    pa: int,
    p: float,
    num_heads: int,
    prefill: bool,
) -> torch.Tensor:
    """``VARProcessor.attn_redist`` for one layer: returns the (in place) modified attention map.

    attention_map: (1, H, Q, T); coord: from :func:`head_fork`; indices: this layer's sink tokens
    (text and visual); prefill: the released ``get_output_token_count() < 0``.
    """
    if len(coord) == 0:
        return attention_map
    for h in range(num_heads):
        rows_of_head = coord[coord[:, 1] == h]  # (n_h, 3)
        query_coord = rows_of_head[:, 2]
        if prefill:
            query_coord = query_coord[im + pa <= query_coord]
        bsz_coord = rows_of_head[:, 0][: len(query_coord)]
        head_coord = rows_of_head[:, 1][: len(query_coord)]
        if not query_coord.shape[0] or not head_coord.shape[0]:
            continue

        selected = attention_map[bsz_coord, head_coord, query_coord, :].clone()  # (n_q, T)
        indices = indices.to(selected.device)
        vis_indices = indices[(im <= indices) & (indices < im + pa)]
        text_indices = indices[~torch.isin(indices, vis_indices)]
        original = selected.detach().clone()  # (n_q, T)

        # sinks keep a fraction p of their attention
        selected[:, text_indices] *= p
        selected[:, vis_indices] *= p

        # the (1 - p) taken from every sink is the budget
        budget_vis = original[:, vis_indices].sum(dim=1) * (1 - p)  # (n_q,)
        budget_text = original[:, text_indices].sum(dim=1) * (1 - p)

        # ... handed to the visual non-sink tokens in proportion to their attention
        original[:, vis_indices] *= 0
        ratios = original[:, im : im + pa] / original[:, im : im + pa].sum(dim=1, keepdim=True).to(
            selected.dtype
        )  # (n_q, pa)
        selected[:, im : im + pa] += (budget_vis + budget_text).view(-1, 1) * ratios
        attention_map[bsz_coord, head_coord, query_coord, :] = selected
    return attention_map


def released_layer(
    attn: torch.Tensor,
    sink_inds: torch.Tensor,
    im: int,
    pa: int,
    *,
    rho: float,
    summ: float,
    p: float,
    prefill: bool,
) -> torch.Tensor:
    """HeadFork then VAR on one layer, as the released attention forward does (on a clone)."""
    coord = head_fork(attn, sink_inds, im, pa, rho, summ)
    return attn_redist(attn.clone(), coord, sink_inds, im, pa, p, attn.shape[1], prefill)
