"""`--sparsify unstructured:R` and `--sparsify N:M`: weights set to zero, layer by layer.

Two lossy stages (`onnxshrink.quant.lossy`) on the engine's budget search, listed in
`onnxshrink.rules.SPARSIFY_STAGES`: `UNSTRUCTURED` (a share R of each layer's weights) and `NM`
(at most N non-zeros in every M consecutive weights along the reduction axis: 2:4 for NVIDIA's
sparse tensor cores). Each run is a `_SparsifyJob` (a `PlannedStage`): the plan lists the units,
every unit's pruned weight is computed once when the plan is made, and the engine keeps the most
sensitive units dense until the output error holds.

1. Units. A MatMul whose second input is a 2-D float initializer `[K, N]`; a Gemm with such a
   weight (`[N, K]` with transB); a Conv with a float initializer weight `[O, I/g, kh, kw]`; and,
   for unstructured only, a Gather (axis 0) from a 2-D float table `[V, D]` (an embedding):
   zeros there gain nothing at run time, but with `--compress` the table is where most of a
   small encoder's file is (half of MiniLM's), so it is pruned like the others, each row (one
   token's vector) keeping the same share. Nodes without a constant weight (attention
   products, index lookups) are not units and are not listed. Declined, with the reason:
   weights of fewer than `MIN_ELEMENTS` values (nothing to gain), weights another node also
   reads, nodes of other domains, `--exclude`.
2. N:M. The groups run along the reduction axis: axis 0 of a MatMul's `[K, N]` (and of a Gemm
   weight without transB), axis 1 of a transB Gemm's `[N, K]` and of a Conv's `[O, I/g, kh,
   kw]` (M consecutive input channels at each (o, kh, kw)). Only layers TensorRT's sparse
   kernels take are units: output channels a multiple of `TRT_OUT_MULTIPLE` (8), input
   channels a multiple of `TRT_IN_MULTIPLE` (16) and of M, and no grouped Conv; the others are
   declined with the reason. Gather tables are not products: declined for N:M. TensorRT picks
   a sparse kernel only where it times faster than the dense one, and some versions do not
   with Q/DQ int8: the pattern is a licence, not a promise of speed.
3. Criteria (`prune_magnitude`, `prune_wanda`), by the calibration data:
   a. random data (`CalibrationData.synthetic`): magnitude, per layer (`ratio_mask`) or N:M
      (`nm_mask`) on |W|; a table's rows each keep the same share;
   b. real data: data-aware. A MatMul/Gemm gets Wanda (|W| * ||x_j||, each output its own
      comparison group) and SparseGPT (the kept weights updated through the input Hessian,
      error compensated), and keeps the one whose output error on the budget's samples is lower
      (`prune_wanda.reconstruction_error` with their Hessian, case 4); a Conv gets Wanda with
      per-input-channel norms (the second-order update is not done for convolutions); a table
      has no input activation: magnitude.
   `SparsifyStage(kind, criterion=...)` forces one: "magnitude", "global-magnitude" (one
   threshold over every unit's |W|: the layers' shares follow from the weights, Han et al.
   2015), "wanda", "sparsegpt". Measured on all-MiniLM-L6-v2 at unstructured:0.5, every unit
   pruned (256 calibration sentences; mean cosine of mean-pooled embeddings with fp32 on 256
   held-out sentences; `bench/sparsify_minilm.py --max-error 1e9`): magnitude 0.718, global
   magnitude 0.694, Wanda 0.860, SparseGPT / data-aware 0.919 (SparseGPT won the comparison
   on all 36 linear layers; Wanda is kept as the Conv criterion and as the fallback when H is
   not positive definite). The tables pruned alone cost little (0.989); the linear layers
   pruned alone by SparseGPT give 0.932: a 384-wide encoder loses more at 50% than the large
   language models of the papers.
4. Statistics: one pass of the float model over the calibration data collects, per layer input,
   the Hessian `H = sum x^T x` (channels last; padded positions left out when the model has a
   mask input) of MatMul/Gemm inputs, or the per-channel sum of squares of Conv inputs (axis 1),
   through `onnxshrink.quant.activations`. The budget measures on the first 32 samples
   (`sensitivity.DEFAULT_SAMPLES`): when there are more than 64, the fit (Wanda's norms,
   SparseGPT's H) uses the others, and those first 32 give a second Hessian on which Wanda and
   SparseGPT are compared; with fewer, both use all samples and a note says the budget's
   figure is optimistic. Inputs are taken in groups whose Hessians fit in `HESSIAN_BYTES`.
   `SEQUENTIAL` (off) prunes level by level instead (`_levels`: a unit's depth in units), each
   level's statistics taken on the model with the levels before it pruned, as the SparseGPT
   paper does: on MiniLM it gave 0.9195 against 0.9191 in 3x the time (225 s against 74 s).
5. Budget: the engine's. Units too sensitive stay dense and are listed with their error. With
   `--compress`, units are declined by error per byte saved (`unit_sizes`).
6. `--compress`: after the budget, the pruned weights are stored packed, each in the smaller of
   two forms that stock ONNX Runtime turns back into the same dense tensor at load:
   a. a bit mask + values (`to_masked_initializers`): the non-zero values (`[NNZ + 1]`, a 0
      first) and one bit per weight (uint8, `np.packbits` little-endian), decoded by standard
      ops (Reshape, BitShift, Mod, Cast, CumSum, Mul, Gather, Reshape: the value index of each
      kept position is the running count of kept bits) that ORT's constant folding runs once at
      session creation, leaving the dense initializer: `itemsize * (NNZ + 1) + size / 8`
      bytes, 0.53x of fp32 at 50%;
   b. an ONNX sparse initializer (`to_sparse_initializers`, GraphProto.sparse_initializer):
      values and int64 linear indices `[NNZ]`, the only index type onnx's checker accepts
      (ORT also loads int32/int16/int8 indices, which the checker refuses). `12 * NNZ` bytes
      for fp32: larger than the dense tensor below 67% sparsity, smaller than (a) only below
      1/64 density. onnx's full_check cannot infer shapes through a sparse initializer.
   Both give outputs equal to the dense pruned model's (the same floats, gathered).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.engine.io import array_of
from onnxshrink.engine.protos import (
    collect_units,
    compile_excludes,
    drop_initializers,
    tensor_readers,
    weight_initializer,
)
from onnxshrink.errors import UsageError
from onnxshrink.quant.activations import InputStatistics, channel_rows, stream_tensors
from onnxshrink.quant.calibration import CalibrationData
from onnxshrink.quant.lossy import (
    CalibrationSource,
    Plan,
    PlannedStage,
    StageResult,
    StageSettings,
    as_calibration_data,
)
from onnxshrink.quant.sensitivity import DEFAULT_SAMPLES
from onnxshrink.quant.sparsity import SPARSIFY_FORMS, SparsifySpec
from onnxshrink.quant.targets import TargetProfile
from onnxshrink.rules.prune_magnitude import (
    global_threshold,
    magnitude_scores,
    nm_mask,
    ratio_mask,
)
from onnxshrink.rules.prune_wanda import reconstruction_error, sparsegpt, wanda_mask
from onnxshrink.verify.measure import mask_input
from onnxshrink.verify.parity import declared_batches, feed_samples

logger = logging.getLogger(__name__)

#: weights with fewer values stay dense (case 1)
MIN_ELEMENTS = 4096
#: the channel multiples TensorRT's sparse kernels take (case 2)
TRT_OUT_MULTIPLE = 8
TRT_IN_MULTIPLE = 16
#: the Hessians held at once (two float64 K x K per layer input); more take more passes (case 4)
HESSIAN_BYTES = 512 * 2**20
#: data-aware criteria prune level by level (case 4); False: one pass on the float model
SEQUENTIAL = False
CRITERIA = ("auto", "magnitude", "global-magnitude", "wanda", "sparsegpt")
_FLOATS: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
}
#: `_unit`'s reason for a node without a constant weight: not listed among the declined
#: the lowest default-domain opset of the mask decoding ops (BitShift, CumSum: case 6a)
_MASK_OPSET = 11


class NothingToPrune(UsageError):
    """The model has no unit the stage can prune (one line, exit 2)."""


@dataclass(frozen=True)
class _Unit:
    """A node the plan may prune (case 1): its weight, the input whose statistics data-aware
    criteria read (None for a table), and the weight's axes."""

    node: str
    op: str
    weight: str
    activation: str | None
    reduction_axis: int  # N:M groups run along it (case 2)
    output_axis: int  # one output per index: Wanda's comparison group
    groups: int = 1  # a Conv's group count


@dataclass
class _Pruned:
    """A unit's pruned weight, the criterion that made it, and its share of zeros."""

    weight: np.ndarray
    criterion: str
    sparsity: float


class _SparsifyJob(PlannedStage):
    """One run of a pruning stage with the user's settings: plan, materialize, and every unit's
    pruned weight (computed once, reused by every candidate the budget search builds)."""

    family = "pruning"

    def __init__(
        self,
        spec: SparsifySpec,
        settings: StageSettings,
        calibration: CalibrationSource,
        criterion: str = "auto",
    ) -> None:
        self.spec = spec
        self.name = spec.describe()
        self.precision = (
            f"{spec.n}:{spec.m}" if spec.kind == "n:m" else f"sparse {spec.ratio * 100:g}%"
        )
        self.settings = settings
        self.calibration = calibration
        self.criterion = criterion
        self.units: dict[str, _Unit] = {}
        self.pruned: dict[str, _Pruned] = {}
        self.fitted_on_budget_samples = False
        self.data_aware = False
        self.synthetic = False
        #: data-aware: layers pruned in order of depth, each level's statistics taken on the
        #: model with the levels before it pruned (case 4)
        self.sequential = SEQUENTIAL
        self.passes = 0

    # ---------------------------------------------------------------------------------------
    # Cases 1-2: the plan

    def plan(self, model: onnx.ModelProto, profile: TargetProfile, exclude: Sequence[str]) -> Plan:
        patterns = compile_excludes(exclude)
        inits = {t.name: t for t in model.graph.initializer}
        self.units, declined = collect_units(
            model, ("MatMul", "Gemm", "Conv", "Gather"), lambda n: self._unit(n, inits), patterns
        )
        applied = dict.fromkeys(self.units, self.precision)
        readers = tensor_readers(model)
        outputs = {o.name for o in model.graph.output}
        for name in list(applied):
            weight = self.units[name].weight
            others = [r for r in readers.get(weight, []) if r != name]
            if others or weight in outputs:
                del applied[name], self.units[name]
                declined[name] = (
                    f"weight also read by {others[0]!r}" if others else "weight is a graph output"
                )
        if not applied:
            shown = "; ".join(f"{n}: {r}" for n, r in list(declined.items())[:3])
            raise NothingToPrune(
                f"--sparsify {self.spec.describe()}: no MatMul, Gemm, Conv"
                + (" or Gather" if self.spec.kind == "unstructured" else "")
                + " with a float constant weight qualifies; nothing to prune"
                + (f" ({shown})" if shown else "")
            )
        self._prune_all(model, [self.units[n] for n in applied], inits)
        for name in applied:
            applied[name] = f"{self.precision} ({self.pruned[name].criterion})"
        return Plan(self.name, profile.name, applied, declined)

    def _unit(
        self, node: onnx.NodeProto, inits: Mapping[str, TensorProto]
    ) -> tuple[_Unit | None, str | None]:
        tensor, reason = weight_initializer(node, inits)
        if tensor is None:
            return None, reason
        dims = list(tensor.dims)
        if tensor.data_type not in _FLOATS:
            return None, "weight is not a float tensor"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nm = self.spec.kind == "n:m"
        groups = 1
        if node.op_type == "Conv":
            if len(dims) < 3:
                return None, "Conv weight of rank under 3"
            reduction, output, groups = 1, 0, int(attrs.get("group", 1))
        elif len(dims) != 2:
            return None, "weight is not a 2-D tensor"
        elif node.op_type == "Gather":
            if nm:
                return None, "a table lookup, not a product: N:M kernels do not apply"
            if attrs.get("axis", 0) not in (0, -2):
                return None, "Gather along an axis other than 0"
            reduction, output = 1, 0
        elif node.op_type == "Gemm" and attrs.get("transA", 0):
            return None, "Gemm with transA (its input's channels lead)"
        elif node.op_type == "Gemm" and attrs.get("transB", 0):
            reduction, output = 1, 0
        else:
            reduction, output = 0, 1
        if nm:  # case 2
            m = self.spec.m
            outs, ins = dims[output], dims[reduction]
            if groups != 1:
                return None, f"grouped Conv (group {groups}): no sparse kernel"
            if outs % TRT_OUT_MULTIPLE:
                return None, f"{outs} output channels: not a multiple of {TRT_OUT_MULTIPLE}"
            if ins % TRT_IN_MULTIPLE:
                return None, f"{ins} input channels: not a multiple of {TRT_IN_MULTIPLE}"
            if ins % m:
                return None, f"{ins} input channels: not a multiple of M={m}"
        size = math.prod(dims)
        if size < MIN_ELEMENTS:
            return None, f"weight of {size} values (under {MIN_ELEMENTS}: nothing to gain)"
        activation = None if node.op_type == "Gather" else node.input[0]
        return (
            _Unit(node.name, node.op_type, tensor.name, activation, reduction, output, groups),
            None,
        )

    # ---------------------------------------------------------------------------------------
    # Cases 3-4: every unit's pruned weight, computed once

    def _prune_all(
        self, model: onnx.ModelProto, units: Sequence[_Unit], inits: Mapping[str, TensorProto]
    ) -> None:
        criterion = self.criterion
        data = as_calibration_data(self.calibration, model, self.settings.calibration_batch)
        self.synthetic = bool(data.synthetic)
        if criterion == "auto":
            criterion = "magnitude" if data.synthetic else "data-aware"  # case 3a/3b
        self.data_aware = criterion in ("data-aware", "wanda", "sparsegpt")
        threshold = None
        if criterion == "global-magnitude":  # case 3, Han et al.
            scores = [magnitude_scores(array_of(inits[u.weight])) for u in units]
            threshold = global_threshold(scores, self.spec.ratio)
        if not self.data_aware:
            for unit in units:
                self._prune(unit, array_of(inits[unit.weight]), criterion, threshold)
            return
        tables = [u for u in units if u.activation is None]
        for unit in tables:  # no input activation: magnitude
            self._prune(unit, array_of(inits[unit.weight]), "magnitude", None)
        linear = [u for u in units if u.activation is not None]
        levels = _levels(model, linear) if self.sequential else [linear]
        current = model
        for depth, level in enumerate(levels):
            if depth:  # case 4: this level's inputs as the layers before it, pruned, make them
                current, _ = self.materialize(
                    model,
                    Plan(self.name, "", {u.node: "" for u in linear if u.node in self.pruned}),
                )
            for group in self._groups(level, inits):
                fit, check = self._statistics(current, data, group, inits)
                for unit in group:
                    assert unit.activation is not None
                    self._prune(
                        unit,
                        array_of(inits[unit.weight]),
                        criterion,
                        None,
                        fit[unit.activation],
                        check.get(unit.activation),
                    )
        self.passes = len(levels)

    def _groups(
        self, units: Sequence[_Unit], inits: Mapping[str, TensorProto]
    ) -> list[list[_Unit]]:
        """Units in groups whose layer inputs' Hessians fit in `HESSIAN_BYTES` (case 4)."""
        groups: list[list[_Unit]] = []
        seen: set[str] = set()
        held = 0
        for unit in sorted(units, key=lambda u: u.activation or ""):
            assert unit.activation is not None
            k = inits[unit.weight].dims[unit.reduction_axis]
            size = 0 if unit.op == "Conv" or unit.activation in seen else 16 * k * k
            if not groups or held + size > HESSIAN_BYTES:
                groups.append([])
                held = 0
            groups[-1].append(unit)
            seen.add(unit.activation)
            held += size
        return groups

    def _statistics(
        self,
        model: onnx.ModelProto,
        data: CalibrationData,
        units: Sequence[_Unit],
        inits: Mapping[str, TensorProto],
    ) -> tuple[dict[str, InputStatistics], dict[str, InputStatistics]]:
        """Case 4: per layer input, the statistics the fit reads and (MatMul/Gemm inputs, when
        samples are kept apart) the Hessian of the budget's samples; one pass."""
        axes: dict[str, int] = {}
        gram: dict[str, bool] = {}
        types: dict[str, int] = {}
        for u in units:
            assert u.activation is not None
            axes[u.activation] = 1 if u.op == "Conv" else -1
            gram[u.activation] = gram.get(u.activation, False) or u.op != "Conv"
            types[u.activation] = inits[u.weight].data_type
        graph_inputs = {i.name for i in model.graph.input}
        probed = [n for n in axes if n not in graph_inputs]
        split = data.samples > 2 * DEFAULT_SAMPLES
        self.fitted_on_budget_samples = not split
        fit = {n: InputStatistics(gram=gram[n]) for n in axes}
        check = {n: InputStatistics(gram=True) for n in axes if gram[n]} if split else {}
        mask = mask_input(model, self.settings.mask_input)
        declared = declared_batches(model)
        seen = 0
        runs = (
            stream_tensors(
                model,
                data,
                probed,
                elem_types=types,
                progress=self.settings.progress,
                phase="pruning statistics",
            )
            if probed  # only graph inputs: the feeds are the statistics
            else ((feed, {}) for feed in data)
        )
        for feed, arrays in runs:
            keep = None if mask is None or mask not in feed else np.asarray(feed[mask]) != 0
            budget_run = split and seen < DEFAULT_SAMPLES
            seen += feed_samples(feed, declared)
            for name, axis in axes.items():
                x = np.asarray(arrays[name] if name in arrays else feed[name])
                rows = channel_rows(x, axis, keep)
                (check if budget_run and name in check else fit)[name].update(rows)
        logger.info("%s: statistics of %d layer input(s)", self.name, len(axes))
        return fit, check

    def _prune(
        self,
        unit: _Unit,
        weight: np.ndarray,
        criterion: str,
        threshold: float | None,
        fit: InputStatistics | None = None,
        check: InputStatistics | None = None,
    ) -> None:
        """Unit's pruned weight by `criterion` (case 3), in the weight's shape and type."""
        spec = self.spec
        w = np.asarray(weight, np.float64)
        nm = spec.kind == "n:m"
        used = criterion
        if criterion == "global-magnitude" and not nm:
            assert threshold is not None
            keep = magnitude_scores(w) > threshold
            pruned = np.where(keep, w, 0.0)
        elif (
            fit is None
            or fit.sq is None
            or criterion == "magnitude"
            or (criterion == "global-magnitude")
        ):
            used = "magnitude"
            scores = magnitude_scores(w)
            if nm:
                keep = nm_mask(scores, spec.n, spec.m, unit.reduction_axis)
            else:  # a table: per row; a layer: per layer (case 3a)
                keep = ratio_mask(scores, spec.ratio, 0 if unit.op == "Gather" else None)
            pruned = np.where(keep, w, 0.0)
        elif unit.op == "Conv":
            used = "wanda"
            pruned = self._conv_wanda(unit, w, fit.norms)
        else:
            rows = w if unit.reduction_axis == 1 else w.T  # [outputs, K]
            ratio, n, m = spec.ratio, spec.n, spec.m
            candidates: dict[str, np.ndarray] = {}
            if criterion in ("data-aware", "wanda"):
                candidates["wanda"] = np.where(wanda_mask(rows, fit.norms, ratio, n, m), rows, 0.0)
            if criterion in ("data-aware", "sparsegpt") and fit.xtx is not None:
                candidates["sparsegpt"] = sparsegpt(rows, fit.xtx, ratio, n, m)
            if len(candidates) > 1:  # case 3b: the lower error on the budget's samples
                h = check.xtx if check is not None and check.xtx is not None else fit.xtx
                assert h is not None
                errors = {c: reconstruction_error(rows, p, h) for c, p in candidates.items()}
                used = min(errors, key=lambda c: errors[c])
            else:
                used = next(iter(candidates))
            best = candidates[used]
            pruned = best if unit.reduction_axis == 1 else best.T
        dtype = np.asarray(weight).dtype
        out = np.ascontiguousarray(pruned, dtype=dtype)
        sparsity = float(np.mean(out == 0))
        self.pruned[unit.node] = _Pruned(out, used, sparsity)

    def _conv_wanda(self, unit: _Unit, w: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Wanda on a Conv weight `[O, I/g, kh, kw]` (case 3b): each output channel its own
        comparison group, the input norm of the channel its group reads."""
        spec = self.spec
        outs, per_group = w.shape[0], w.shape[1]
        group_of = np.arange(outs) // max(outs // unit.groups, 1)
        channel = group_of[:, None] * per_group + np.arange(per_group)[None, :]  # [O, I/g]
        scale = norms[np.clip(channel, 0, norms.size - 1)]
        scores = np.abs(w) * scale.reshape(outs, per_group, *([1] * (w.ndim - 2)))
        if spec.kind == "n:m":
            keep = nm_mask(scores, spec.n, spec.m, axis=1)
        else:
            keep = ratio_mask(scores, spec.ratio, per_axis=0)
        return np.where(keep, w, 0.0)

    # ---------------------------------------------------------------------------------------
    # Case 5: materialization and sizes

    def materialize(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, list[str]]:
        if not plan.applied:
            return model, []
        work = onnx.ModelProto()
        work.CopyFrom(model)
        by_weight = {self.units[u].weight: self.pruned[u] for u in plan.applied}
        for i, tensor in enumerate(work.graph.initializer):
            pruned = by_weight.get(tensor.name)
            if pruned is not None:
                work.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(pruned.weight, tensor.name)
                )
        used = Counter(self.pruned[u].criterion for u in plan.applied)
        zeros = sum(int(np.sum(self.pruned[u].weight == 0)) for u in plan.applied)
        total = sum(self.pruned[u].weight.size for u in plan.applied)
        notes = [
            f"{len(plan.applied)} weight(s) pruned to {self.spec.describe()}, "
            f"{zeros / max(total, 1) * 100:.1f}% of their {total} values zero; criterion: "
            + ", ".join(f"{c} {k}" for c, k in used.most_common())
            + (" (calibration data is random: magnitude only)" if self.synthetic else "")
        ]
        if self.data_aware and self.fitted_on_budget_samples:
            notes.append(
                f"data-aware pruning fitted the weights on the samples the error budget is "
                f"measured on (give more than {2 * DEFAULT_SAMPLES} calibration samples to keep "
                "them apart): the budget's figure is optimistic"
            )
        return work, notes

    def unit_sizes(self, model: onnx.ModelProto, plan: Plan) -> dict[str, int]:
        """Bytes each unit saves with `--compress` (case 6a); empty without it."""
        if not self.settings.compress:
            return {}
        sizes = {}
        for name in plan.applied:
            w = self.pruned[name].weight
            dense = w.size * w.itemsize
            sizes[name] = max(dense - _masked_bytes(w), 1)
        return sizes


def _levels(model: onnx.ModelProto, units: Sequence[_Unit]) -> list[list[_Unit]]:
    """`units` by depth (case 4): a unit's level counts the units on the longest path from the
    graph's inputs to its input; the graph's nodes are in topological order."""
    by_node = {u.node: u for u in units}
    depth: dict[str, int] = {}
    levels: dict[int, list[_Unit]] = {}
    for node in model.graph.node:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        unit = by_node.get(node.name)
        if unit is not None:
            levels.setdefault(d, []).append(unit)
            d += 1
        for out in node.output:
            depth[out] = d
    return [levels[d] for d in sorted(levels)]


# -------------------------------------------------------------------------------------------
# Case 6: storage of pruned weights


def _masked_bytes(w: np.ndarray) -> int:
    return (int(np.count_nonzero(w)) + 1) * w.itemsize + -(-w.size // 8)


def _sparse_bytes(w: np.ndarray, index_dtype: type = np.int64) -> int:
    return int(np.count_nonzero(w)) * (w.itemsize + np.dtype(index_dtype).itemsize)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _dense_inits(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, TensorProto]:
    """The named initializers that can be stored packed: float, not graph inputs."""
    wanted = set(names)
    inputs = {i.name for i in model.graph.input}
    return {
        t.name: t
        for t in model.graph.initializer
        if t.name in wanted and t.name not in inputs and t.data_type in _FLOATS
    }


def to_sparse_initializers(
    model: onnx.ModelProto,
    names: Iterable[str],
    index_dtype: type = np.int64,
    only_smaller: bool = True,
) -> onnx.ModelProto:
    """`model` with the named initializers as ONNX sparse initializers (case 6b): values and
    linear indices `[NNZ]` of `index_dtype` (int64: what onnx's checker takes; ORT also loads
    int32/int16/int8); with `only_smaller`, those whose sparse form is not smaller stay dense.
    `model` is kept."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    converted: list[str] = []
    limit = np.iinfo(index_dtype).max
    for name, tensor in _dense_inits(work, names).items():
        w = np.asarray(array_of(tensor))
        if w.size - 1 > limit:
            continue
        if only_smaller and _sparse_bytes(w, index_dtype) >= w.size * w.itemsize:
            continue
        flat = w.reshape(-1)
        where = np.flatnonzero(flat)
        values = numpy_helper.from_array(flat[where], name)
        indices = numpy_helper.from_array(where.astype(index_dtype), f"{name}_indices")
        work.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, w.shape))
        converted.append(name)
    drop_initializers(work.graph, converted)
    return work


def to_masked_initializers(
    model: onnx.ModelProto, names: Iterable[str], only_smaller: bool = True
) -> onnx.ModelProto:
    """`model` with the named initializers stored as a bit mask and their non-zero values,
    decoded by standard ops that ORT folds at load (case 6a). `model` is kept; a model below
    opset 11 is returned as it is."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MASK_OPSET:
        logger.info("compress: opset %d under %d: weights stay dense", opset, _MASK_OPSET)
        return work
    graph = work.graph
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    shared: dict[str, str] = {}
    new_inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(key: str, value: np.ndarray) -> str:
        if key not in shared:
            shared[key] = _unique(f"sparsify_{key}", taken)
            new_inits.append(numpy_helper.from_array(value, shared[key]))
        return shared[key]

    converted: list[str] = []
    for name, tensor in _dense_inits(work, names).items():
        w = np.asarray(array_of(tensor))
        if only_smaller and _masked_bytes(w) >= w.size * w.itemsize:
            continue
        flat = w.reshape(-1)
        kept = flat != 0
        bits = _unique(f"{name}_nz_mask", taken)
        values = _unique(f"{name}_nz_values", taken)
        shape = _unique(f"{name}_nz_shape", taken)
        new_inits += [
            numpy_helper.from_array(np.packbits(kept, bitorder="little"), bits),
            numpy_helper.from_array(np.concatenate([flat[:1] * 0, flat[kept]]), values),
            numpy_helper.from_array(np.asarray(w.shape, np.int64), shape),
        ]
        t = [_unique(f"{name}_nz_{step}", taken) for step in range(8)]
        steps: list[tuple[str, list[str], dict[str, Any]]] = [
            ("Reshape", [bits, constant("column", np.array([-1, 1], np.int64))], {}),
            (
                "BitShift",
                [t[0], constant("bit_shifts", np.arange(8, dtype=np.uint8))],
                {"direction": "RIGHT"},
            ),
            ("Mod", [t[1], constant("two", np.array(2, np.uint8))], {}),
            ("Cast", [t[2]], {"to": TensorProto.INT32}),
            ("Reshape", [t[3], constant("flat", np.array([-1], np.int64))], {}),
        ]
        last = t[4]
        if w.size % 8:  # the mask's padding bits cut off
            ends = _unique(f"{name}_nz_size", taken)
            new_inits.append(numpy_helper.from_array(np.array([w.size], np.int64), ends))
            steps.append(("Slice", [last, constant("zero", np.array([0], np.int64)), ends], {}))
            last = _unique(f"{name}_nz_kept", taken)
        steps += [
            ("CumSum", [last, constant("axis", np.array(0, np.int32))], {}),
            ("Mul", [t[5], last], {}),
            ("Gather", [values, t[6]], {}),
            ("Reshape", [t[7], shape], {}),
        ]
        outputs = t[:4] + [t[4]] + ([last] if w.size % 8 else []) + t[5:8] + [name]
        for (op, inputs, attrs), output in zip(steps, outputs, strict=True):
            nodes.append(
                helper.make_node(
                    op, inputs, [output], name=_unique(f"{name}_unpack_{op}", taken), **attrs
                )
            )
        converted.append(name)
    drop_initializers(graph, converted)
    graph.initializer.extend(new_inits)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return work


@dataclass(frozen=True)
class Compression:
    """What `compress_weights` stored: bytes of the named weights dense and as stored, and how
    many went to each form (case 6)."""

    dense_bytes: int
    stored_bytes: int
    masked: int
    sparse: int
    dense: int


def compress_weights(
    model: onnx.ModelProto, names: Iterable[str]
) -> tuple[onnx.ModelProto, Compression]:
    """Each named weight in the smallest of: dense, bit mask + values, sparse initializer
    (case 6). `model` is kept."""
    inits = _dense_inits(model, names)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    masked: list[str] = []
    sparse: list[str] = []
    dense_bytes = stored = 0
    for name, tensor in inits.items():
        w = np.asarray(array_of(tensor))
        size = w.size * w.itemsize
        options = {"dense": size, "sparse": _sparse_bytes(w)}
        if opset >= _MASK_OPSET:
            options["masked"] = _masked_bytes(w)
        form = min(options, key=lambda f: options[f])
        dense_bytes += size
        stored += options[form]
        (masked if form == "masked" else sparse if form == "sparse" else []).append(name)
    work = to_masked_initializers(model, masked, only_smaller=False) if masked else model
    work = to_sparse_initializers(work, sparse, only_smaller=False) if sparse else work
    kept = len(inits) - len(masked) - len(sparse)
    return work, Compression(dense_bytes, stored, len(masked), len(sparse), kept)


class SparsifyStage:
    """A pruning stage (module docstring): each run is a `_SparsifyJob`; `criterion` forces
    one criterion (case 3), for comparisons."""

    def __init__(self, kind: str, criterion: str = "auto") -> None:
        if criterion not in CRITERIA:
            raise UsageError(f"pruning criterion {criterion!r}: expected one of {CRITERIA}")
        self.kind = kind
        self.name = kind
        self.criterion = criterion
        what = "a share of each layer's weights" if kind == "unstructured" else "N of every M"
        self.summary = (
            f"weights set to zero ({what}) in MatMul/Gemm/Conv layers, by magnitude or, with "
            "real calibration data, Wanda/SparseGPT; sensitive layers kept dense by the error "
            "budget; --compress stores them packed"
        )

    def run(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationSource,
        settings: StageSettings,
    ) -> StageResult:
        self.check(settings)
        assert settings.sparsity is not None
        job = _SparsifyJob(settings.sparsity, settings, calibration, self.criterion)
        result = job.run(model, calibration, settings)
        if settings.compress:
            result.model, notes = self.finish(result.model, result)
            result.notes.extend(notes)
        return result

    @staticmethod
    def finish(model: onnx.ModelProto, pruned: StageResult) -> tuple[onnx.ModelProto, list[str]]:
        """`--compress` (case 6): the weights `pruned` zeroed, stored packed in `model` (the
        pruned model, or what a later stage made of it: weights it replaced, such as int8
        ones, stay as they are)."""
        if pruned.plan is None or not pruned.plan.applied:
            return model, []
        units = set(pruned.plan.applied)
        inits = {t.name for t in pruned.model.graph.initializer}
        weights = [
            name
            for node in pruned.model.graph.node
            if node.name in units
            for name in node.input
            if name in inits
        ]
        model, c = compress_weights(model, weights)
        if c.masked + c.sparse + c.dense == 0:
            return model, [
                "compress: no pruned weight is still a float initializer (a later stage, such as "
                "int8, replaced them); nothing packed"
            ]
        return model, [
            f"compress: {c.masked + c.sparse} pruned weight(s) stored packed, "
            f"{c.dense_bytes / 2**20:.1f} MB -> {c.stored_bytes / 2**20:.1f} MB "
            f"({c.masked} as bit mask + values, decoded by standard ops that ONNX Runtime "
            f"folds at load; {c.sparse} as sparse initializers; {c.dense} left dense)"
        ]

    def check(self, settings: StageSettings) -> None:
        """UsageError (one line) when `settings.sparsity` is not this stage's kind."""
        spec = settings.sparsity
        if spec is None:
            raise UsageError(f"--sparsify: expected {SPARSIFY_FORMS}")
        if spec.kind != self.kind:
            raise UsageError(
                f"--sparsify {spec.describe()}: not a {self.kind} pattern ({SPARSIFY_FORMS})"
            )


UNSTRUCTURED = SparsifyStage("unstructured")
NM = SparsifyStage("n:m")

__all__ = [
    "CRITERIA",
    "NM",
    "UNSTRUCTURED",
    "Compression",
    "NothingToPrune",
    "SparsifyStage",
    "compress_weights",
    "to_masked_initializers",
    "to_sparse_initializers",
]
