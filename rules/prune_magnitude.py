"""Magnitude pruning: which weights of a layer to set to zero, by their size alone.

The data-free criterion of the weight-sparsification stages (`onnxshrink.rules.sparsify_weights`)
and the mask helpers every criterion shares (`onnxshrink.rules.prune_wanda` scores differently
and picks its masks with the same helpers).

1. Scores: `magnitude_scores(W) = |W|` (float64). A larger score is kept.
2. Masks for a share `ratio` of zeros (`ratio_mask`), a keep-mask of the scores' shape:
   a. per layer (default): the `floor(ratio * size)` lowest scores of the whole tensor;
   b. per comparison group (`per_axis`): each slice along `per_axis` (one output channel, one
      embedding row) prunes its own `floor(ratio * slice)` lowest scores, so that every output
      keeps the same number of inputs (Wanda's comparison group, Sun et al. 2023);
   c. global (`global_threshold`): one threshold over the scores of every layer together, so
      that each layer's share follows from how its weights compare with the others'
      (Han et al. 2015's global magnitude pruning); a tie at the threshold is pruned.
   Exactly `floor(ratio * n)` values are pruned in (a) and (b), ties broken by position
   (`np.argpartition`), so that the sparsity reported is the sparsity applied.
3. N:M masks (`nm_mask`): in every run of `m` consecutive values along `axis` (the reduction
   axis of the layer), the `n` highest scores are kept and the other `m - n` set to zero: the
   2:4 pattern of NVIDIA's sparse tensor cores when n=2, m=4. The axis' length must be a
   multiple of m (the stage declines the others).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def magnitude_scores(weight: np.ndarray) -> np.ndarray:
    """|W| as float64 (case 1): the weights kept are those with the highest scores."""
    return np.abs(np.asarray(weight, np.float64))


def ratio_mask(scores: np.ndarray, ratio: float, per_axis: int | None = None) -> np.ndarray:
    """Keep-mask pruning `floor(ratio * n)` lowest scores of the tensor (case 2a) or of each
    slice along `per_axis` (case 2b); True where a weight is kept."""
    s = np.asarray(scores, np.float64)
    if per_axis is None:
        flat = s.reshape(1, -1)
    else:
        flat = np.moveaxis(s, per_axis, 0).reshape(s.shape[per_axis], -1)
    count = int(np.floor(ratio * flat.shape[1]))
    keep = np.ones(flat.shape, bool)
    if count > 0:
        pruned = np.argpartition(flat, count - 1, axis=1)[:, :count]
        np.put_along_axis(keep, pruned, False, axis=1)
    if per_axis is None:
        return keep.reshape(s.shape)
    moved = np.moveaxis(s, per_axis, 0).shape
    return np.moveaxis(keep.reshape(moved), 0, per_axis)


def global_threshold(scores: Sequence[np.ndarray], ratio: float) -> float:
    """The score below or at which `ratio` of all scores together lie (case 2c)."""
    flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores])
    count = int(np.floor(ratio * flat.size))
    if count == 0:
        return -np.inf
    return float(np.partition(flat, count - 1)[count - 1])


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with the `n` highest scores of every `m` consecutive along `axis` (case 3)."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    length = s.shape[-1]
    if length % m:
        raise ValueError(f"axis of length {length} is not a multiple of {m}")
    groups = s.reshape(*s.shape[:-1], length // m, m)
    # the m - n lowest of each group are pruned; ties broken by position
    pruned = np.argpartition(groups, m - n - 1, axis=-1)[..., : m - n]
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, pruned, False, axis=-1)
    return np.moveaxis(keep.reshape(s.shape), -1, axis)


def follows_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every run of `m` consecutive values along `axis` holds at most `n` non-zeros."""
    w = np.moveaxis(np.asarray(weight), axis, -1)
    if w.shape[-1] % m:
        return False
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
    return bool(np.all(np.count_nonzero(groups, axis=-1) <= n))


__all__ = ["follows_nm", "global_threshold", "magnitude_scores", "nm_mask", "ratio_mask"]
