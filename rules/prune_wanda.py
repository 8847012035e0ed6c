"""Data-aware pruning: which weights to zero given what the layer's input carries.

Magnitude pruning (`onnxshrink.rules.prune_magnitude`) forgets that a small weight on an input
channel with large activations moves the output more than a large weight on a quiet one;
transformer hidden states have a few such outlier channels, and at 50% magnitude pruning
collapses where the data-aware criteria hold (Sun et al. 2023, Frantar & Alistarh 2023).
Both criteria read the layer's input statistics on calibration data
(`onnxshrink.quant.activations.InputStatistics`); weights here are `[rows, K]`: one row per
output, K along the reduction (the caller transposes a MatMul's `[K, N]`).

1. Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"):
   `score_ij = |W_ij| * ||x_j||`, `||x_j||` the L2 norm of input channel j over every
   calibration row. Each output row is its own comparison group: it keeps the same share of
   its inputs (`prune_magnitude.ratio_mask` per row), or, for N:M, the n highest scores of
   every m consecutive inputs. The kept weights are not changed.
2. SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in
   One-Shot"): with `H = sum x^T x` (`K x K`, dampened by `DAMP` of its mean diagonal; a
   channel that is always 0 gets `H_jj = 1`) and `U` the upper Cholesky factor of `H^-1`,
   columns j are visited in order; in blocks of `BLOCK` columns, the mask of the block is
   chosen by `w_ij^2 / U_jj^2` (the output error of pruning the weight alone, OBS): the lowest
   `ratio` of the block (all rows together), or for N:M the `m - n` lowest of each group of m
   columns when its first column is reached. Each column's pruning error
   `e_i = (w_ij - q_ij) / U_jj` is then spread over the columns not yet visited,
   `W[:, j:] -= e U[j, j:]`, so the kept weights absorb what the pruned ones did: the same
   update as GPTQ (`onnxshrink.rules.int4.quantize_gptq`) with zeros in place of rounding.
3. The error a pruned weight adds on data, `reconstruction_error(W, W', H) = tr(D H D^T)`
   with `D = W - W'`: the sum over the calibration rows of `||x (W - W')^T||^2`, read off the
   Hessian with no further pass. The stage compares the two criteria with it per layer
   (`onnxshrink.rules.sparsify_weights`, case 3b) and keeps the lower.
4. Which wins: on all-MiniLM-L6-v2 at unstructured:0.5 (held-out embedding cosine with fp32,
   `bench/sparsify_minilm.py`), magnitude 0.718, Wanda 0.860, SparseGPT 0.919; SparseGPT had
   the lower error on the budget's samples on all 36 linear layers. On a synthetic layer with
   20x outlier input channels (tests/test_sparsify_weights.py) both cut magnitude's held-out
   error by more than half and SparseGPT is below Wanda.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxshrink.rules.prune_magnitude import nm_mask, ratio_mask

logger = logging.getLogger(__name__)

#: SparseGPT: dampening of H as a share of its mean diagonal, and columns per block (case 2)
DAMP = 0.01
BLOCK = 128


def wanda_scores(weight: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """`|W_ij| * ||x_j||` (case 1) of a `[rows, K]` weight and the K input norms."""
    return np.abs(np.asarray(weight, np.float64)) * np.asarray(norms, np.float64)[None, :]


def wanda_mask(
    weight: np.ndarray, norms: np.ndarray, ratio: float = 0.0, n: int = 0, m: int = 0
) -> np.ndarray:
    """Wanda's keep-mask (case 1) of a `[rows, K]` weight: `ratio` of each row, or N:M along K."""
    scores = wanda_scores(weight, norms)
    if m:
        return nm_mask(scores, n, m, axis=1)
    return ratio_mask(scores, ratio, per_axis=0)


def sparsegpt(
    weight: np.ndarray,
    hessian: np.ndarray,
    ratio: float = 0.0,
    n: int = 0,
    m: int = 0,
    damp: float = DAMP,
    block: int = BLOCK,
) -> np.ndarray:
    """SparseGPT (case 2) of a `[rows, K]` weight given `H` (`[K, K]`): the pruned weight,
    the kept weights updated; `ratio` of each block of columns, or N:M along K. Falls back to
    Wanda (case 1) when H is not positive definite even dampened."""
    w = np.array(weight, dtype=np.float64)
    rows, k_dim = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k_dim)] += damp * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    except np.linalg.LinAlgError:
        logger.info("sparsegpt: Hessian not positive definite; Wanda instead")
        norms = np.sqrt(np.maximum(np.diag(hessian), 0.0))
        return np.where(wanda_mask(weight, norms, ratio, n, m), weight, 0.0)
    diag = np.diag(upper)
    if m:  # a group of m columns never straddles two blocks
        block = max(m, block // m * m)
    for start in range(0, k_dim, block):
        end = min(start + block, k_dim)
        cols = w[:, start:end].copy()
        errors = np.zeros_like(cols)
        u = upper[start:end, start:end]
        keep = np.ones(cols.shape, bool)
        if not m:
            keep = ratio_mask(cols**2 / diag[None, start:end] ** 2, ratio)
        for i in range(end - start):
            if m and i % m == 0:
                group = cols[:, i : i + m] ** 2 / diag[None, start + i : start + i + m] ** 2
                keep[:, i : i + m] = nm_mask(group, n, m, axis=1)
            col = cols[:, i]
            q = np.where(keep[:, i], col, 0.0)
            err = (col - q) / u[i, i]
            cols[:, i:] -= np.outer(err, u[i, i:])
            cols[:, i] = q
            errors[:, i] = err
        w[:, start:end] = cols
        w[:, end:] -= errors @ upper[start:end, end:]
    return w


def reconstruction_error(weight: np.ndarray, pruned: np.ndarray, hessian: np.ndarray) -> float:
    """`tr(D H D^T)`, D = W - W' (case 3): the squared output error summed over the rows of H."""
    d = np.asarray(weight, np.float64) - np.asarray(pruned, np.float64)
    return float(np.sum((d @ np.asarray(hessian, np.float64)) * d))  # BLAS, not einsum's loop


__all__ = ["BLOCK", "DAMP", "reconstruction_error", "sparsegpt", "wanda_mask", "wanda_scores"]
