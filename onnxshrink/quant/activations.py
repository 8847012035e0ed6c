"""Intermediate tensors of a model on calibration data, streamed: what calibration-aware
weight methods read (GPTQ's Hessians, Wanda's input norms, a pruned layer's reconstruction).

1. `stream_tensors(model, data, names)` runs the model once over the calibration data with
   `names` added as outputs (the model itself, not a copy: `onnxshrink.engine.io.outputs_added`)
   and yields, per run, the feed and the arrays. One session, one pass: callers that need
   several tensors ask for them together.
2. `channel_rows(x, axis, keep)` turns one such array into a 2-D float64 `(rows, channels)`
   matrix, channels along `axis` (-1 for a transformer's hidden states, 1 for NCHW), leaving
   out padded positions: `keep` is the feed's mask (`onnxshrink.verify.measure.mask_input`),
   applied when the array's leading dims are the mask's.
3. `InputStatistics` accumulates over those rows, in bounded memory: the per-channel sum of
   squares (Wanda's `||x_j||^2`), optionally the Gram matrix `sum x^T x` (GPTQ's and
   SparseGPT's Hessian), and the row count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxshrink.engine.io import inference_session, outputs_added
from onnxshrink.quant.calibration import CalibrationData
from onnxshrink.verify.parity import declared_batches, feed_samples

Feed = dict[str, np.ndarray]


def stream_tensors(
    model: onnx.ModelProto,
    data: CalibrationData,
    names: Sequence[str],
    *,
    elem_types: Mapping[str, int] | None = None,
    skip_samples: int = 0,
    progress=None,
    phase: str = "statistics",
) -> Iterator[tuple[Feed, dict[str, np.ndarray]]]:
    """(feed, {name: array}) per calibration run (module docstring, 1).

    `elem_types` gives the type of a tensor that is not typed in the graph's value_info (default
    float); the first `skip_samples` samples are passed over (kept for a budget that must judge
    samples the fit did not see); `progress(phase, done, total)` is called per run.
    """
    import onnxruntime as ort

    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    options = ort.SessionOptions()
    options.log_severity_level = 3
    types: dict[str, int] = {n: int(onnx.TensorProto.FLOAT) for n in wanted}
    types.update(elem_types or {})
    with outputs_added(model, wanted, types) as probed:
        session = inference_session(probed, options, ["CPUExecutionProvider"])
    declared = declared_batches(model)
    total = len(data) if hasattr(data, "__len__") else 0
    skipped = runs = 0
    for feed in data:
        runs += 1
        if skipped < skip_samples:
            skipped += feed_samples(feed, declared)
            continue
        arrays = session.run(wanted, feed)
        yield feed, dict(zip(wanted, arrays, strict=True))
        if progress is not None:
            progress(phase, runs, total)  # total 0: unknown


def channel_rows(x: np.ndarray, axis: int = -1, keep: np.ndarray | None = None) -> np.ndarray:
    """`x` as float64 `(rows, channels)` with channels along `axis` (module docstring, 2)."""
    x = np.asarray(x)
    axis = axis % x.ndim
    if keep is not None and axis == x.ndim - 1 and x.shape[:-1] == keep.shape:
        return np.asarray(x[keep.astype(bool)], np.float64)  # (rows, channels) already
    x = np.moveaxis(x, axis, -1)
    return np.asarray(x.reshape(-1, x.shape[-1]), np.float64)


@dataclass
class InputStatistics:
    """Streaming statistics of one tensor's channels (module docstring, 3)."""

    gram: bool = False
    rows: int = 0
    sq: np.ndarray | None = None
    xtx: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, rows: np.ndarray) -> None:
        """Add a `(rows, channels)` matrix (`channel_rows`)."""
        self.rows += rows.shape[0]
        sq = np.einsum("ij,ij->j", rows, rows)
        self.sq = sq if self.sq is None else self.sq + sq
        if self.gram:
            xtx = rows.T @ rows
            self.xtx = xtx if self.xtx is None else self.xtx + xtx

    @property
    def norms(self) -> np.ndarray:
        """Per-channel L2 norm over every row seen (Wanda's `||x_j||`)."""
        assert self.sq is not None, "no rows seen"
        return np.sqrt(self.sq)


def input_statistics(
    model: onnx.ModelProto,
    data: CalibrationData,
    axes: Mapping[str, int],
    *,
    gram: bool = False,
    mask: str | None = None,
    elem_types: Mapping[str, int] | None = None,
    skip_samples: int = 0,
    progress=None,
    phase: str = "statistics",
) -> dict[str, InputStatistics]:
    """`InputStatistics` of each tensor of `axes` (name -> channel axis), in one pass
    (`stream_tensors` for the other arguments)."""
    stats = {name: InputStatistics(gram=gram) for name in axes}
    for feed, arrays in stream_tensors(
        model,
        data,
        list(axes),
        elem_types=elem_types,
        skip_samples=skip_samples,
        progress=progress,
        phase=phase,
    ):
        keep = None if mask is None or mask not in feed else np.asarray(feed[mask]) != 0
        for name, x in arrays.items():
            stats[name].update(channel_rows(x, axes[name], keep))
    return stats


__all__ = ["InputStatistics", "channel_rows", "input_statistics", "stream_tensors"]
