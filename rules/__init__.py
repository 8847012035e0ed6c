"""The rule families of onnxshrink, as explicit ordered lists the engine imports.

Nothing registers itself on import: to add a rule, write it in its module and list it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxshrink.engine.passes import FunctionPass, Pass, Rule, RulePass
from onnxshrink.errors import UsageError
from onnxshrink.rules import (
    constant_folding,
    cse,
    dead_code,
    dedup_initializers,
    float16,
    fold_batchnorm,
    fold_conv_affine,
    gelu,
    hardswish,
    int4,
    int8,
    int8_int4,
    layernorm,
    matmul_add_to_gemm,
    merge_reshapes,
    merge_slices,
    noop_elimination,
    pad_conv,
    prune_channels,
    sparsify_weights,
    symbolic_shapes,
)

if TYPE_CHECKING:
    from onnxshrink.quant.lossy import LossyStage
    from onnxshrink.quant.sparsity import SparsifySpec

# Dead-layer removal. Order: constants become initializers first so that every later rule sees
# weights as constants; no-ops go before folding so folding sees the real producers.
CLEANUP_RULES: list[Rule] = [
    *noop_elimination.RULES,
    *merge_reshapes.RULES,
    *merge_slices.RULES,
]

# Operator fusion. Activation and normalization patterns go first: their constants (the /6 of
# a decomposed HardSwish, LayerNorm's gamma) are Mul/Div by constants that the weight folds
# below would otherwise absorb into a neighbouring Conv, leaving a pattern that no longer
# matches. BatchNorm folds before the Mul/Add folds so that a Conv+BN+Mul+Add chain collapses
# into one Conv; Pad+Conv goes last because it only needs the final Conv.
FUSION_RULES: list[Rule] = [
    *hardswish.RULES,
    *layernorm.RULES,
    *gelu.RULES,
    *fold_batchnorm.RULES,
    *fold_conv_affine.RULES,
    *matmul_add_to_gemm.RULES,
    *pad_conv.RULES,
]


# Lossy stages, by the name `optimize --quantize NAME` takes (`onnxshrink.quant.lossy`). To add one,
# write its module (a `PlannedStage` with `plan` and `materialize`, or a stage with its own
# `run`) and list it here; the engine does not change. The order is the order of `--help`.
LOSSY_STAGES: list[LossyStage] = [int8.STAGE, float16.STAGE, int4.STAGE, int8_int4.STAGE]


def lossy_stage(name: str) -> LossyStage:
    """The stage called `name`; UsageError (one line) naming the known ones."""
    stages = {stage.name: stage for stage in LOSSY_STAGES}
    if name not in stages:
        raise UsageError(f"--quantize {name!r}: expected one of {', '.join(stages)}")
    return stages[name]


# Pruning stages, by the kind of `--sparsify` they take (`onnxshrink.quant.sparsity`):
# unstructured, N:M, channels. Same contract as LOSSY_STAGES; each also has a `kind`.
SPARSIFY_STAGES: list[LossyStage] = [
    sparsify_weights.UNSTRUCTURED,
    sparsify_weights.NM,
    prune_channels.STAGE,
]


def sparsify_stage(spec: SparsifySpec) -> LossyStage:
    """The pruning stage for a parsed `--sparsify`."""
    for stage in SPARSIFY_STAGES:
        if getattr(stage, "kind", None) == spec.kind:
            return stage
    raise UsageError(f"--sparsify {spec.describe()}: no stage prunes {spec.kind!r}")


def lossless_passes() -> list[Pass]:
    """The default pipeline of `onnxshrink optimize`, run by a PassManager to a fixed point."""
    # Symbolic shapes first: every later pass of the sweep reads the dims it names alike.
    return [
        FunctionPass("symbolic-shapes", symbolic_shapes.refine_shapes),
        FunctionPass("constants-to-initializers", dead_code.constants_to_initializers),
        FunctionPass("dead-code", dead_code.remove_dead_code),
        RulePass("cleanup", CLEANUP_RULES),
        FunctionPass("constant-folding", constant_folding.fold_constants),
        RulePass("fusion", FUSION_RULES),
        FunctionPass("cse", cse.eliminate_common_subexpressions),
        FunctionPass("dedup-initializers", dedup_initializers.deduplicate_initializers),
    ]


__all__ = [
    "CLEANUP_RULES",
    "FUSION_RULES",
    "LOSSY_STAGES",
    "SPARSIFY_STAGES",
    "lossless_passes",
    "lossy_stage",
    "sparsify_stage",
]
