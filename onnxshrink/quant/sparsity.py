"""Sparsification: what `--sparsify` asks for, and the shapes the pruning stages share.

Pruning stages are lossy stages (`onnxshrink.quant.lossy`) like int8 and int4: a plan of units
(layers, or groups of channels), materialized, chosen within an error budget and verified on
held-out data. They live in `rules/` and are listed in `onnxshrink.rules.SPARSIFY_STAGES`;
`onnxshrink.rules.sparsify_stage` picks the one for a spec.

1. The spec (`SparsifySpec.parse`), the value of `--sparsify`:
   a. `unstructured:R`: a share R in (0, 1) of each layer's weights set to zero;
   b. `N:M` (e.g. `2:4`): at most N non-zeros in every group of M consecutive weights along
      the reduction axis, N < M;
   c. `channels:R`: a share R in (0, 1) of the output channels of conv/linear layers removed
      (for transformers, FFN neurons and attention heads), the graph's shapes following.
2. Channel groups (`ChannelGroup`): channels that must be removed together, described by the
   tensors to slice so that a finder (for conv nets, for transformer blocks) and the stage that
   scores, removes and repairs them need not know each other's patterns:
   a. `producers`: slices of the tensors that make the channels (a layer's weight along its
      output axis, its bias, a normalization's parameters);
   b. `consumers`: the linear layers that read them, each with the slice of its weight along
      its input axis; these are the layers teacher-guided reconstruction refits;
   c. `attributes`: node attributes that count the channels (a depthwise conv's `group`);
   d. `shapes`: entries of constant shape tensors that count them (the heads of a Reshape).
   A slice may cover `per_channel` consecutive elements per channel (an attention head is
   `head_dim` columns) from an `offset` (a fused weight holding several groups).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from onnxshrink.errors import UsageError

#: what `--sparsify` takes, for messages and --help
SPARSIFY_FORMS = "unstructured:R | N:M (e.g. 2:4) | channels:R, R in (0, 1)"
#: the default error budget of a pruning stage (worst output noise-to-signal ratio on the
#: calibration samples): pruning moves outputs more than rounding does, and the stages repair
#: what they can; `--max-error` overrides it
DEFAULT_SPARSIFY_MAX_ERROR = 0.05

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class SparsifySpec:
    """A parsed `--sparsify` value (module docstring, 1)."""

    kind: str  # "unstructured", "n:m" or "channels"
    ratio: float = 0.0  # unstructured, channels
    n: int = 0  # n:m
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> SparsifySpec:
        """The spec of `text`; UsageError (one line) saying what is wrong with it."""
        value = str(text).strip().lower()
        where = f"--sparsify {text!r}"
        match = _NM.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not (0 < n < m):
                raise UsageError(f"{where}: an N:M pattern needs 0 < N < M (e.g. 2:4)")
            return cls("n:m", n=n, m=m)
        kind, _, ratio = value.partition(":")
        if kind not in ("unstructured", "channels"):
            raise UsageError(f"{where}: expected {SPARSIFY_FORMS}")
        if not ratio:
            raise UsageError(f"{where}: give the share to prune, e.g. {kind}:0.5")
        try:
            share = float(ratio)
        except ValueError:
            raise UsageError(f"{where}: {ratio!r} is not a number in (0, 1)") from None
        if not (math.isfinite(share) and 0.0 < share < 1.0):
            raise UsageError(f"{where}: the share must be in (0, 1), not {ratio}")
        return cls(kind, ratio=share)

    def describe(self) -> str:
        """The spec as the user writes it: "unstructured:0.5", "2:4", "channels:0.25"."""
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        return f"{self.kind}:{self.ratio:g}"


@dataclass(frozen=True)
class Slice:
    """Elements of an initializer along one axis that belong to a channel group: channel c
    covers `[offset + c * per_channel, offset + (c + 1) * per_channel)` (module docstring, 2)."""

    tensor: str
    axis: int
    per_channel: int = 1
    offset: int = 0


@dataclass(frozen=True)
class Consumer:
    """A linear layer reading a channel group: the node and its weight's input-channel slice."""

    node: str
    weight: Slice


@dataclass
class ChannelGroup:
    """Channels removed together (module docstring, 2). `unit` names it in plans and reports
    (a node's name); `width` is its channel count; `activations` names tensors whose axis
    `activation_axis` runs over the group's channels (the consumers' inputs), for scoring."""

    unit: str
    op: str
    width: int
    producers: list[Slice] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    #: (node, attribute, per_channel): set to kept * per_channel
    attributes: list[tuple[str, str, int]] = field(default_factory=list)
    #: (initializer, index, per_channel): that entry of a shape constant set to kept * per_channel
    shapes: list[tuple[str, int, int]] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    activation_axis: int = -1


__all__ = [
    "DEFAULT_SPARSIFY_MAX_ERROR",
    "SPARSIFY_FORMS",
    "ChannelGroup",
    "Consumer",
    "Slice",
    "SparsifySpec",
]
