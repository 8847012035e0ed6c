"""`--sparsify channels:R`: structured channel pruning with teacher-guided reconstruction.

Removing whole output channels shrinks every layer that makes or reads them, so the model runs
faster on any runtime; the layers reading them are then refit on calibration data so that
their outputs match the original model's (the teacher), without a training loop. A
`PlannedStage` (`onnxshrink.quant.lossy`): each channel group is a unit, and the engine's
budget search leaves the most sensitive groups dense until the output error holds.

1. Groups. Every finder of `FINDERS` (conv nets: `channels_conv`; transformer blocks:
   `channels_transformer`) returns `ChannelGroup`s (`onnxshrink.quant.sparsity`, 2) and
   declined nodes with reasons; the stage relies on the contract only (slices, consumers,
   attributes, shapes, `per_channel`, `offset`). Before the finders run, a small constant read
   by several nodes gets one copy per reader (so that a deduplicated per-channel constant
   does not tie unrelated groups); copies left identical are merged back when the model is
   built. A group found by two finders is kept once; one touching a tensor another group
   already claimed is declined. `--exclude` declines a group when it matches any node the
   group changes.
2. Statistics, one pass of the original model over the calibration samples: for each
   consumer, rows of its input features `x` (im2col of sampled output positions for a 2-D
   Conv, the input rows for Gemm/MatMul) and of its output `y`, accumulated as
   `G = [x 1]^T [x 1]` and `[x 1]^T y` (float64, at most `ROWS_PER_SAMPLE` rows per sample
   and fewer for wide layers, so that the cost per sample stays bounded). Other consumers
   (ConvTranspose, ...) get only their input's per-channel sum of squares. When there are
   more than 64 samples the fit uses those after the first 32 (the budget measures on the
   first 32, see `onnxshrink.rules.int4`); otherwise all, and a note says so.
3. Scores: channel c of a group scores `sum over consumers ||W[:, c]|| * ||x_c||`, with
   `||x_c||` from the diagonal of G (Wanda-like, data-aware). With synthetic calibration
   (`random`) the input norms mean nothing: `||x_c||` is replaced by the norm of the
   producers' slices of c (weights only), and no reconstruction is done.
4. Removal: the lowest-scored `R * width` channels of each group go, at least one staying. A
   group whose width is a multiple of `ROUND_TO` (16) keeps the nearest multiple of it (ties:
   more kept): ORT CPU runs convs in blocked NCHWc layout (blocks of 16 with AVX-512, 8 with
   AVX2) only when the channel counts are multiples of the block; measured on ppocr-v4-det,
   unrounded pruning of 25% gave 1.03x, rounded 1.46x. A group the rounding leaves whole is
   declined with the reason.
5. Materialization: every (tensor, axis) gets a keep-mask from the slices of the applied
   groups (offsets and `per_channel` in the original coordinates, so that several groups
   slicing one tensor compose); attributes and shape entries are set to
   `kept * per_channel`; stale value_info is dropped. Inputs and outputs are never touched
   (finders decline groups that reach them).
6. Teacher-guided reconstruction (`reconstruct`, on by default): each refittable consumer
   (Conv with group 1 and 2-D kernels, auto_pad NOTSET/VALID; Gemm with alpha = beta = 1;
   MatMul) gets new weights (and bias, added to a Conv without one; MatMul has none) from the
   ridge least squares `min ||[x_kept 1] w - y||^2 + lam ||w - w_0||^2`, `w_0` the original
   weights of the kept inputs, `lam = RIDGE * mean(diag G_kept)` (see below), solved per
   consumer from the rows and columns of G that the candidate keeps.
   Layer-by-layer dependence: `x` and `y` both come from the original model (the teacher), so
   each consumer is fit to reproduce its original output from the original values of the
   inputs it keeps (ThiNet / CP-style reconstruction), all consumers from one pass. This is
   what makes budget candidates affordable: every candidate (any set of groups pruned) is
   reconstructed exactly from the one statistics pass by slicing G, with no ORT run; the
   refit of a consumer is cached by the mask of its kept inputs. Errors that reach a
   consumer from pruned layers upstream are not refit away. Refitting from the pruned
   model's own inputs was measured and left out: all consumers at once in one more pass made
   the error worse (ppocr-v4-det at channels:0.25, every group: 0.109 -> 0.210; MiniLM at
   0.3: 0.320 -> 0.348), since each consumer's change moves the inputs the next one was fit
   on; one consumer at a time in graph order (a pass of both models each) lowered det's to
   0.100 (9%) in 263 s more and raised MiniLM's.
   Few rows against many features (a layer after global pooling sees one row per sample)
   overfit: `lam` grows by `RIDGE_PER_FEATURE * F / rows` of the mean diagonal.
7. Budget: the engine's. A group too sensitive is left dense, listed with its error.
8. Per-layer ratios: a group is two units, the least important channels up to half the ratio
   (named as the group) and the rest up to the ratio (`SECOND_HALF`), each measured alone by
   the budget; the most sensitive units are declined first, so a sensitive group keeps its
   second half and is pruned at R/2, and only a group whose first half also breaks the
   budget stays dense. Where rounding leaves no room for two steps, the group is one unit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxshrink.engine.io import array_of, graph_protos
from onnxshrink.engine.protos import compile_excludes, drop_initializers, excluded_by
from onnxshrink.errors import UsageError
from onnxshrink.quant.activations import channel_rows, stream_tensors
from onnxshrink.quant.lossy import (
    CalibrationSource,
    Plan,
    PlannedStage,
    StageResult,
    StageSettings,
    as_calibration_data,
)
from onnxshrink.quant.sensitivity import DEFAULT_SAMPLES
from onnxshrink.quant.sparsity import ChannelGroup, Slice
from onnxshrink.quant.targets import TargetProfile
from onnxshrink.rules import channels_conv, channels_transformer
from onnxshrink.verify.measure import mask_input
from onnxshrink.verify.parity import declared_batches, feed_samples

logger = logging.getLogger(__name__)

Finder = Callable[[onnx.ModelProto], tuple[list[ChannelGroup], dict[str, str]]]
#: the channel-group finders, in order (case 1): a group found twice is kept from the first
FINDERS: list[Finder] = [channels_conv.channel_groups, channels_transformer.channel_groups]
#: case 1: constants of at most this many values read by several nodes get a copy per reader
UNSHARE_MAX = 1 << 16
#: case 2: rows of statistics per calibration sample and consumer, and the cost bound
#: (rows * features^2) that lowers it for wide layers
ROWS_PER_SAMPLE = 8192
MIN_ROWS_PER_SAMPLE = 256
ROW_COST = 2.5e8
#: case 4: kept counts rounded to a multiple of ROUND_TO in groups at least ROUND_WIDTH wide
ROUND_TO = 16
#: case 6: ridge dampening, a share of the kept Gram matrix's mean diagonal
RIDGE = 1e-3
#: case 6: more dampening where rows are few per feature: RIDGE + RIDGE_PER_FEATURE * F / rows
RIDGE_PER_FEATURE = 1.0
#: case 8: the name of a group's second unit (the channels past half the ratio)
SECOND_HALF = " (second half)"
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


class NothingToPrune(UsageError):
    """The model has no channel group the stage can remove (one line, exit 2)."""


@dataclass
class _Fit:
    """Statistics of one consumer (case 2): its matrix form `y = M x + b` and Gram sums."""

    node: str
    kind: str  # "conv", "linear" (Gemm/MatMul, refittable) or "norms" (input norms only)
    weight: str
    in_axis: int  # the weight's input axis
    x: str  # its input tensor
    y: str  # its output tensor
    kernel: int = 1  # kh * kw of a conv
    bias: str | None = None  # the bias initializer, if any
    with_bias: bool = True  # a column of ones in the fit
    transposed: bool = False  # Gemm with transB: M is the weight itself
    channel_axis: int = 1  # of x, for "norms"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # conv: top, left, bottom, right
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    kshape: tuple[int, int] = (1, 1)
    gram: np.ndarray | None = None
    xty: np.ndarray | None = None
    sq: np.ndarray | None = None  # per input element of the weight's input axis
    rows: int = 0


@dataclass
class _Unit:
    group: ChannelGroup
    keep: np.ndarray  # indices of the channels kept, sorted
    nodes: set[str] = field(default_factory=set)


class _ChannelJob(PlannedStage):
    """One run of the stage with the user's settings (module docstring): the groups, their
    statistics and kept channels, and refits cached per consumer and kept-input mask."""

    name = "channels"
    precision = "pruned"
    family = "pruning"

    def __init__(
        self,
        settings: StageSettings,
        calibration: CalibrationSource,
        *,
        ratio: float,
        reconstruct: bool,
        finders: Sequence[Finder],
    ) -> None:
        self.settings = settings
        self.calibration = calibration
        self.ratio = ratio
        self.name = f"channels:{ratio:g}"
        self.reconstruct = reconstruct
        self.finders = list(finders)
        self.units: dict[str, _Unit] = {}
        self.fits: dict[str, _Fit] = {}
        self.refits: dict[tuple[str, bytes], tuple[np.ndarray, np.ndarray | None]] = {}
        self.base: onnx.ModelProto | None = None
        self.copies: dict[str, str] = {}
        self.synthetic = False
        self.fit_samples = 0
        self.fitted_on_budget_samples = False

    # ---------------------------------------------------------------------------------------
    # Case 1: the plan

    def plan(self, model: onnx.ModelProto, profile: TargetProfile, exclude: Sequence[str]) -> Plan:
        patterns = compile_excludes(exclude)
        self.base, self.copies = _unshared(model)
        base = self.base
        nodes = {n.name: n for n in base.graph.node}
        readers: dict[str, set[str]] = {}
        for node in base.graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.name)
        applied: dict[str, str] = {}
        declined: dict[str, str] = {}
        claimed: dict[tuple[str, int], list[tuple[int, int, str]]] = {}  # element ranges
        found: list[ChannelGroup] = []
        for finder in self.finders:
            groups, reasons = finder(base)
            for name, why in reasons.items():
                declined.setdefault(name, why)
            for group in groups:
                if group.unit in self.units or any(g.unit == group.unit for g in found):
                    continue
                found.append(group)
        for group in found:
            touched = _touched(group)
            ranges = _ranges(group)
            clash = next(
                (
                    unit
                    for key, start, end in ranges
                    for lo, hi, unit in claimed.get(key, [])
                    if start < hi and lo < end
                ),
                None,
            )
            if clash is not None:
                declined[group.unit] = f"its tensors are also in the group of {clash!r}"
                continue
            changed = {c.node for c in group.consumers} | {a[0] for a in group.attributes}
            changed |= {group.unit}
            for tensor in touched:
                changed |= readers.get(tensor, set())
            excluded = [excluded_by(nodes[n], patterns) for n in sorted(changed) if n in nodes]
            reason = next((r for r in excluded if r is not None), None)
            if reason is not None:
                declined[group.unit] = reason
                continue
            if group.width < 2:
                declined[group.unit] = "a single channel"
                continue
            for key, start, end in ranges:
                claimed.setdefault(key, []).append((start, end, group.unit))
            declined.pop(group.unit, None)
            self.units[group.unit] = _Unit(group, np.arange(group.width), changed)
        for unit in self.units.values():  # one finder's decline of a node another one grouped
            for name in unit.nodes:
                declined.pop(name, None)
        if not self.units:
            shown = "; ".join(f"{n}: {r}" for n, r in list(declined.items())[:3]) or (
                "no Conv, Gemm or MatMul has a constant weight"
            )
            raise NothingToPrune(
                "--sparsify channels: no channel group can be removed (a group's channels must "
                "end in layers that read them, not in graph outputs or unmodelled ops)"
                + f" ({shown})"
            )
        self._statistics(base)
        for name, unit in list(self.units.items()):
            keep = self._kept(unit.group)
            width = unit.group.width
            if len(keep) == width:
                declined[name] = (
                    f"{width} channels: rounding to blocks of {ROUND_TO} removes none"
                    if width % ROUND_TO == 0
                    else f"{width} channels: too few to remove a share of {self.ratio:g}"
                )
                del self.units[name]
                continue
            consumers = f", {len(unit.group.consumers)} consumer(s)" if unit.group.consumers else ""
            # case 8: the least important half of the removed channels is this unit, the rest a
            # second one, so that the budget can leave a group at R/2 instead of dense
            half = self._kept(unit.group, self.ratio / 2)
            unit.keep = half if len(keep) < len(half) < width else keep
            applied[name] = f"{width - len(unit.keep)} of {width} channels removed{consumers}"
            if unit.keep is half:
                second = f"{name}{SECOND_HALF}"
                rest = np.setdiff1d(half, keep)  # removed by the second unit
                self.units[second] = _Unit(unit.group, np.setdiff1d(np.arange(width), rest))
                self.units[second].nodes = unit.nodes
                applied[second] = (
                    f"{len(rest)} more of {width} channels removed (up to {self.ratio:g})"
                )
        return Plan(self.name, profile.name, applied, declined)

    # ---------------------------------------------------------------------------------------
    # Case 2: statistics

    def _statistics(self, model: onnx.ModelProto) -> None:
        inits = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        for unit in self.units.values():
            for consumer in unit.group.consumers:
                if consumer.node not in self.fits and consumer.node in nodes:
                    self.fits[consumer.node] = _consumer_fit(
                        nodes[consumer.node], consumer.weight, inits
                    )
        data = as_calibration_data(self.calibration, model, self.settings.calibration_batch)
        self.synthetic = bool(data.synthetic)
        wanted: list[str] = []
        for fit in self.fits.values():
            wanted.append(fit.x)
            if fit.kind != "norms":
                wanted.append(fit.y)
        if not wanted:
            return
        skip = DEFAULT_SAMPLES if data.samples > 2 * DEFAULT_SAMPLES else 0
        self.fitted_on_budget_samples = skip == 0
        mask = mask_input(model, self.settings.mask_input)
        declared = declared_batches(model)
        rng = np.random.default_rng(0)
        weights = {
            f.node: np.asarray(array_of(inits[f.weight]), np.float64) for f in self.fits.values()
        }
        for feed, arrays in stream_tensors(
            model,
            data,
            wanted,
            skip_samples=skip,
            progress=self.settings.progress,
            phase="channel statistics",
        ):
            self.fit_samples += feed_samples(feed, declared)
            keep = None if mask is None or mask not in feed else np.asarray(feed[mask]) != 0
            for fit in self.fits.values():
                _accumulate(fit, arrays, keep, rng, weights[fit.node])
        logger.info(
            "channels: statistics of %d consumer(s) from %d sample(s)",
            len(self.fits),
            self.fit_samples,
        )

    # ---------------------------------------------------------------------------------------
    # Cases 3, 4: scores and kept channels

    def _kept(self, group: ChannelGroup, ratio: float | None = None) -> np.ndarray:
        width = group.width
        kept = _kept_count(width, self.ratio if ratio is None else ratio)
        if kept >= width:
            return np.arange(width)
        scores = self._scores(group)
        order = np.argsort(-scores, kind="stable")
        return np.sort(order[:kept])

    def _scores(self, group: ChannelGroup) -> np.ndarray:
        width = group.width
        base = self.base
        assert base is not None
        inits = {t.name: t for t in base.graph.initializer}
        producer_norm = np.zeros(width)
        for s in group.producers:
            w = _channel_view(np.asarray(array_of(inits[s.tensor]), np.float64), s, width)
            flat = w.reshape(width, -1)
            if flat.shape[1] > 1:  # weights, not biases or per-channel constants
                producer_norm += (flat**2).sum(axis=1)
        producer_norm = np.sqrt(producer_norm)
        total = np.zeros(width)
        data_aware = not self.synthetic
        for consumer in group.consumers:
            fit = self.fits.get(consumer.node)
            w = _channel_view(
                np.asarray(array_of(inits[consumer.weight.tensor]), np.float64),
                consumer.weight,
                width,
            )
            wnorm = np.sqrt((w**2).reshape(width, -1).sum(axis=1))
            if data_aware and fit is not None and fit.sq is not None:
                along = Slice(
                    consumer.weight.tensor, 0, consumer.weight.per_channel, consumer.weight.offset
                )
                sq = _channel_view(fit.sq, along, width)
                xnorm = np.sqrt(sq.reshape(width, -1).sum(axis=1))
            else:
                xnorm = producer_norm
            total += wnorm * xnorm
        if not group.consumers:
            total = producer_norm
        return total

    # ---------------------------------------------------------------------------------------
    # Cases 5, 6: materialization and reconstruction

    def materialize(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
        if not plan.applied:
            return model, []
        assert self.base is not None
        work = onnx.ModelProto()
        work.CopyFrom(self.base)
        graph = work.graph
        inits = {t.name: t for t in graph.initializer}
        units = [self.units[u] for u in plan.applied]
        masks: dict[tuple[str, int], np.ndarray] = {}

        def mark(s: Slice, width: int, keep: np.ndarray) -> None:
            dims = inits[s.tensor].dims
            key = (s.tensor, s.axis)
            if key not in masks:
                masks[key] = np.ones(dims[s.axis], bool)
            removed = np.setdiff1d(np.arange(width), keep)
            for c in removed:
                start = s.offset + c * s.per_channel
                masks[key][start : start + s.per_channel] = False

        for unit in units:
            g = unit.group
            for s in g.producers:
                mark(s, g.width, unit.keep)
            for consumer in g.consumers:
                mark(consumer.weight, g.width, unit.keep)
        arrays: dict[str, np.ndarray] = {}
        refit = 0
        new_bias: dict[str, np.ndarray] = {}
        if self.reconstruct and not self.synthetic:
            for name, fit in self.fits.items():
                if fit.kind == "norms" or fit.gram is None:
                    continue
                key = (fit.weight, fit.in_axis)
                if key not in masks:
                    continue
                weight, bias = self._refit(fit, masks[key], inits)
                arrays[fit.weight] = weight  # input axis already cut
                masks.pop(key)
                if bias is not None and fit.bias is not None:
                    arrays[fit.bias] = bias  # its output axis is cut with the producers' masks
                elif bias is not None:
                    new_bias[name] = bias
                refit += 1
        for (tensor, axis), mask in masks.items():
            current = arrays.get(tensor)
            if current is None:
                current = np.asarray(array_of(inits[tensor]))
            arrays[tensor] = np.compress(mask, current, axis=axis)
        nodes = {n.name: n for n in graph.node}
        for name, bias in new_bias.items():
            fit = self.fits[name]
            node = nodes[name]
            bias_name = _fresh(f"{fit.weight}_refit_bias", inits, arrays)
            out_axis = 0 if fit.kind == "conv" or fit.transposed else 1
            out_mask = masks.get((fit.weight, out_axis))
            arrays[bias_name] = bias if out_mask is None else bias[out_mask]
            if len(node.input) == 2:
                node.input.append(bias_name)
            else:
                node.input[2] = bias_name
        replaced = []
        for name, values in arrays.items():
            dtype = (
                helper.tensor_dtype_to_np_dtype(inits[name].data_type)
                if name in inits
                else np.float32
            )
            replaced.append(onnx.numpy_helper.from_array(np.asarray(values, dtype), name))
        drop_initializers(graph, set(arrays))
        graph.initializer.extend(replaced)
        kept_of: dict[str, tuple[ChannelGroup, np.ndarray]] = {}  # case 8: units of one group
        for unit in units:
            group, keep = kept_of.get(unit.group.unit, (unit.group, unit.keep))
            kept_of[unit.group.unit] = (group, np.intersect1d(keep, unit.keep))
        for group, keep in kept_of.values():
            kept = len(keep)
            for node_name, attr, per in group.attributes:
                for a in nodes[node_name].attribute:
                    if a.name == attr:
                        a.i = kept * per
            for tensor, index, per in group.shapes:
                current = {t.name: t for t in graph.initializer}[tensor]
                values = np.array(array_of(current))
                flat = values.reshape(-1)
                flat[index] = kept * per
                drop_initializers(graph, {tensor})
                graph.initializer.append(onnx.numpy_helper.from_array(values, tensor))
        _merge_copies(graph, self.copies)
        del graph.value_info[:]
        removed = sum(g.width - len(keep) for g, keep in kept_of.values())
        total = sum(g.width for g, _ in kept_of.values())
        notes = [
            f"channels: {len(kept_of)} group(s) pruned, {removed} of {total} channels removed"
            + (
                f"; {refit} consumer(s) refit to the original outputs on {self.fit_samples} "
                "calibration sample(s)"
                if refit
                else ""
            )
        ]
        if refit and self.fitted_on_budget_samples:
            notes.append(
                f"reconstruction fit the samples the error budget is measured on (give more "
                f"than {2 * DEFAULT_SAMPLES} calibration samples to keep them apart): the "
                "budget's figure is optimistic; the held-out check is the one to read"
            )
        if self.synthetic:
            notes.append(
                "channels: synthetic calibration data: channels scored by weight norms and no "
                "reconstruction"
            )
        return work, notes

    def _refit(
        self, fit: _Fit, mask: np.ndarray, inits: Mapping[str, TensorProto]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The consumer's weight with its inputs cut to `mask` and refit (case 6), and its bias
        (None when the fit has none); cached per consumer and mask."""
        key = (fit.node, np.packbits(mask).tobytes() + bytes([len(mask) % 8]))
        if key in self.refits:
            return self.refits[key]
        assert fit.gram is not None and fit.xty is not None
        weight = np.asarray(array_of(inits[fit.weight]), np.float64)
        m0 = _matrix(weight, fit)  # [O, F]
        features = np.repeat(mask, fit.kernel)
        if fit.with_bias:
            b0 = (
                np.asarray(array_of(inits[fit.bias]), np.float64).reshape(-1)
                if fit.bias is not None
                else np.zeros(m0.shape[0])
            )
            cols = np.concatenate([features, [True]])
            w0 = np.concatenate([m0[:, features], b0[:, None]], axis=1)  # [O, F_kept + 1]
        else:
            cols = features
            w0 = m0[:, features]
        g = fit.gram[np.ix_(cols, cols)]
        xty = fit.xty[cols]
        # few rows for many features (a layer after global pooling sees one row per sample)
        # overfit: the dampening grows as rows per feature fall (case 6)
        ridge = RIDGE + RIDGE_PER_FEATURE * g.shape[0] / max(fit.rows, 1)
        lam = max(ridge * float(np.mean(np.diag(g))) if g.size else 0.0, 1e-12)
        a = g + lam * np.eye(g.shape[0])
        try:
            solved = np.linalg.solve(a, xty + lam * w0.T).T  # [O, F_kept (+1)]
        except np.linalg.LinAlgError:
            solved = w0
        bias = solved[:, -1] if fit.with_bias else None
        m = solved[:, :-1] if fit.with_bias else solved
        result = (_unmatrix(m, weight, mask, fit), bias)
        self.refits[key] = result
        return result


# -------------------------------------------------------------------------------------------
# Statistics helpers (case 2)


def _consumer_fit(node: onnx.NodeProto, weight: Slice, inits: Mapping[str, TensorProto]) -> _Fit:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tensor = inits[weight.tensor]
    dims = list(tensor.dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
    base = _Fit(
        node=node.name,
        kind="norms",
        weight=weight.tensor,
        in_axis=weight.axis,
        x=node.input[0],
        y=node.output[0],
        channel_axis=1 if node.op_type in ("Conv", "ConvTranspose") else -1,
    )
    if (
        node.op_type == "Conv"
        and len(dims) == 4
        and weight.axis == 1
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        and (bias is None or list(inits[bias].dims) == [dims[0]])
        and (len(node.input) <= 2 or not node.input[2] or bias is not None)
    ):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if attrs.get("auto_pad") in (b"VALID", "VALID"):
            pads = [0, 0, 0, 0]
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        return replace(
            base,
            kind="conv",
            kernel=dims[2] * dims[3],
            bias=bias,
            pads=(pads[0], pads[1], pads[2], pads[3]),
            strides=(strides[0], strides[1]),
            dilations=(dilations[0], dilations[1]),
            kshape=(dims[2], dims[3]),
        )
    if node.op_type == "Gemm" and len(dims) == 2:
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        bias_ok = bias is None or list(inits[bias].dims) in ([dims[weight.axis ^ 1]],)
        has_other_bias = len(node.input) > 2 and node.input[2] and bias is None
        if plain and bias_ok and not has_other_bias and not attrs.get("transA", 0):
            transposed = bool(attrs.get("transB", 0))
            return replace(base, kind="linear", bias=bias, transposed=transposed)
    if node.op_type == "MatMul" and len(dims) == 2 and weight.axis == 0:
        return replace(base, kind="linear", with_bias=False)
    return base


def _accumulate(
    fit: _Fit,
    arrays: Mapping[str, np.ndarray],
    keep: np.ndarray | None,
    rng: np.random.Generator,
    weight: np.ndarray,
) -> None:
    """Add one calibration run's rows to `fit` (case 2)."""
    x = np.asarray(arrays[fit.x])
    if fit.kind == "norms":
        rows = channel_rows(x, fit.channel_axis, keep)
        sq = np.einsum("ij,ij->j", rows, rows)
        fit.sq = sq if fit.sq is None else fit.sq + sq
        return
    y = np.asarray(arrays[fit.y])
    if fit.kind == "conv":
        xr, yr = _conv_rows(fit, x, y, rng, weight)
    else:
        xr = channel_rows(x, -1, keep)
        yr = channel_rows(y, -1, keep)
        limit = _row_limit(xr.shape[1])
        if xr.shape[0] > limit:
            pick = rng.choice(xr.shape[0], limit, replace=False)
            xr, yr = xr[pick], yr[pick]
    if fit.with_bias:
        xr = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
    gram = xr.T @ xr
    xty = xr.T @ yr
    fit.gram = gram if fit.gram is None else fit.gram + gram
    fit.xty = xty if fit.xty is None else fit.xty + xty
    features = xr[:, : xr.shape[1] - (1 if fit.with_bias else 0)]
    sq = np.einsum("ij,ij->j", features, features)
    if fit.kind == "conv":  # per input channel (summed over the kernel's taps)
        sq = sq.reshape(-1, fit.kernel).sum(axis=1)
    fit.sq = sq if fit.sq is None else fit.sq + sq
    fit.rows += xr.shape[0]


def _row_limit(features: int) -> int:
    return int(min(ROWS_PER_SAMPLE, max(MIN_ROWS_PER_SAMPLE, ROW_COST / max(features, 1) ** 2)))


def _conv_rows(
    fit: _Fit, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """im2col rows of sampled output positions of a 2-D conv, and the outputs there."""
    x = np.asarray(x, np.float32)
    batch, channels = x.shape[:2]
    _, _, out_h, out_w = y.shape
    top, left, bottom, right = fit.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    positions = batch * out_h * out_w
    limit = _row_limit(channels * fit.kernel + 1)
    pick = (
        rng.choice(positions, limit, replace=False) if positions > limit else np.arange(positions)
    )
    b, rest = np.divmod(pick, out_h * out_w)
    oy, ox = np.divmod(rest, out_w)
    kh, kw = fit.kshape
    iy = oy[:, None] * fit.strides[0] + np.arange(kh)[None, :] * fit.dilations[0]
    ix = ox[:, None] * fit.strides[1] + np.arange(kw)[None, :] * fit.dilations[1]
    patches = padded[
        b[:, None, None, None],
        np.arange(channels)[None, :, None, None],
        iy[:, None, :, None],
        ix[:, None, None, :],
    ]
    xr = np.asarray(patches.reshape(len(pick), -1), np.float64)
    yr = np.asarray(y[b, :, oy, ox], np.float64)
    return xr, yr


def _matrix(weight: np.ndarray, fit: _Fit) -> np.ndarray:
    """The consumer's weight as `M` of `y = M x` (`[O, F]`)."""
    if fit.kind == "conv":
        return weight.reshape(weight.shape[0], -1)
    if fit.transposed:
        return weight
    return weight.T


def _unmatrix(m: np.ndarray, weight: np.ndarray, mask: np.ndarray, fit: _Fit) -> np.ndarray:
    """`_matrix` undone, for a weight whose inputs were cut to `mask`."""
    if fit.kind == "conv":
        return m.reshape(weight.shape[0], int(mask.sum()), *weight.shape[2:])
    if fit.transposed:
        return m
    return m.T


# -------------------------------------------------------------------------------------------
# Graph helpers (cases 1, 5)


def _touched(group: ChannelGroup) -> set[str]:
    names = {s.tensor for s in group.producers} | {c.weight.tensor for c in group.consumers}
    return names | {name for name, _, _ in group.shapes}


def _kept_count(width: int, ratio: float) -> int:
    """Channels a group of `width` keeps (case 4): `width * (1 - ratio)`, at least 1; for a
    width that is a multiple of `ROUND_TO`, the nearest multiple of it (ties: more kept)."""
    exact = width * (1.0 - ratio)
    if ROUND_TO > 1 and width % ROUND_TO == 0:
        low = max(ROUND_TO, int(math.floor(exact / ROUND_TO)) * ROUND_TO)
        high = min(width, low + ROUND_TO)
        return low if exact - low < high - exact else high
    return min(width, max(1, int(round(exact))))


def _ranges(group: ChannelGroup) -> list[tuple[tuple[str, int], int, int]]:
    """The element ranges a group's slices cover, per (tensor, axis) (case 1)."""
    slices = [*group.producers, *(c.weight for c in group.consumers)]
    out = [((s.tensor, s.axis), s.offset, s.offset + group.width * s.per_channel) for s in slices]
    out += [((name, -1 - index), 0, 1) for name, index, _ in group.shapes]
    return out


def _channel_view(values: np.ndarray, s: Slice, width: int) -> np.ndarray:
    """The slice's elements of `values` as `[width, per_channel, rest...]`."""
    moved = np.moveaxis(values, s.axis, 0)
    part = moved[s.offset : s.offset + width * s.per_channel]
    return part.reshape(width, s.per_channel, *part.shape[1:])


def _fresh(hint: str, inits: Mapping[str, TensorProto], arrays: Mapping[str, np.ndarray]) -> str:
    name, i = hint, 1
    while name in inits or name in arrays:
        name, i = f"{hint}_{i}", i + 1
    return name


def _unshared(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` where each small constant read by several node inputs has one copy
    per reader (case 1), and {copy: original}."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    inits = {t.name: t for t in graph.initializer}
    inner: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for g in graph_protos(sub):
                    inner.update(i for n in g.node for i in n.input)
    outputs = {o.name for o in graph.output}
    seen: dict[str, int] = {}
    used = set(inits) | {n.name for n in graph.node}
    used |= {o for n in graph.node for o in n.output}
    copies: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            tensor = inits.get(name)
            if tensor is None or name in inner or name in outputs:
                continue
            count = int(np.prod(tensor.dims)) if tensor.dims else 1
            if count > UNSHARE_MAX or count <= 1:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                continue
            copy_name, k = f"{name}_{node.name}", 1
            while copy_name in used:
                copy_name, k = f"{name}_{node.name}_{k}", k + 1
            used.add(copy_name)
            copy = TensorProto()
            copy.CopyFrom(tensor)
            copy.name = copy_name
            graph.initializer.append(copy)
            node.input[i] = copy_name
            copies[copy_name] = name
    return work, copies


def _merge_copies(graph: onnx.GraphProto, copies: Mapping[str, str]) -> None:
    """Point readers of copies still equal to their original back at it (case 1)."""
    if not copies:
        return
    inits = {t.name: t for t in graph.initializer}
    back: dict[str, str] = {}
    for copy, original in copies.items():
        a, b = inits.get(copy), inits.get(original)
        if a is None or b is None:
            continue
        same = list(a.dims) == list(b.dims) and a.data_type == b.data_type
        if same and np.array_equal(np.asarray(array_of(a)), np.asarray(array_of(b))):
            back[copy] = original
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in back:
                node.input[i] = back[name]
    drop_initializers(graph, set(back))


class ChannelPruneStage:
    """`--sparsify channels:R` as a lossy stage (module docstring): each run is a `_ChannelJob`.

    Teacher-guided reconstruction (case 6) runs when both `reconstruct` (default True) and
    the settings' `reconstruct` (`--no-reconstruct` turns it off) say so; `finders` are the
    channel-group finders (case 1).
    """

    name = "channels"
    kind = "channels"
    summary = (
        "structured pruning: whole output channels of conv/linear layers removed (the graph's "
        "shapes following), consumers refit to the original outputs on calibration data"
    )
    reconstruct = True

    def __init__(self, finders: Sequence[Finder] | None = None) -> None:
        self.finders = list(FINDERS if finders is None else finders)

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        self.check(settings)
        assert settings.sparsity is not None
        job = _ChannelJob(
            settings,
            calibration,
            ratio=settings.sparsity.ratio,
            reconstruct=self.reconstruct and settings.reconstruct,
            finders=self.finders,
        )
        return job.run(model, calibration, settings)

    @staticmethod
    def check(settings: StageSettings) -> None:
        """UsageError (one line) unless the settings ask for `channels:R`, R in (0, 1)."""
        spec = settings.sparsity
        if spec is None or spec.kind != "channels":
            raise UsageError("the channels stage needs --sparsify channels:R, R in (0, 1)")
        if not (math.isfinite(spec.ratio) and 0.0 < spec.ratio < 1.0):
            raise UsageError(f"--sparsify channels:{spec.ratio:g}: the share must be in (0, 1)")


STAGE = ChannelPruneStage()

__all__ = ["FINDERS", "STAGE", "ChannelPruneStage", "NothingToPrune"]
