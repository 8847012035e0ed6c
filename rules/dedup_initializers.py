"""Initializer deduplication: constants with identical contents share one tensor.

1. Constants are grouped by (dtype, shape, SHA-256 of the bytes), and within a group compared
   byte for byte (so a digest collision can never merge different values). Bytes, not values:
   `0.0` and `-0.0` stay apart, and NaNs with equal bits merge.
2. The first constant met (main graph first, then subgraphs, in node order) is kept; readers
   of the others are pointed at it.
3. Constants that are graph inputs (initializers with a default that callers may override)
   or graph outputs are never merged.
4. Constants of different graphs can be merged (a body reads outer names), except when the
   kept constant's name is also used by another tensor somewhere in the model.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxshrink.engine.graph import all_graphs, redirect_readers
from onnxshrink.engine.passes import RuleContext

logger = logging.getLogger(__name__)


def deduplicate_initializers(graph: gs.Graph, ctx: RuleContext) -> bool:
    """Make readers of duplicate constants read a single copy.

    Returns True when at least one reader was rewired.
    """
    graphs = list(all_graphs(graph))
    pinned = {id(t) for g in graphs for t in [*g.inputs, *g.outputs]}
    by_name: dict[str, set[int]] = {}
    for g in graphs:
        for name, tensor in g.tensors().items():
            by_name.setdefault(name, set()).add(id(tensor))
    # Group by dtype and shape first (no data read), then hash only where that collides.
    by_layout: dict[tuple, list[gs.Constant]] = {}
    found: set[int] = set()
    for g in graphs:
        for node in g.nodes:
            for tensor in node.inputs:
                if not isinstance(tensor, gs.Constant) or id(tensor) in pinned | found:
                    continue
                found.add(id(tensor))
                layout = (str(tensor.dtype), tuple(tensor.shape))
                by_layout.setdefault(layout, []).append(tensor)
    groups: dict[tuple, list[gs.Constant]] = {}
    for layout, members in by_layout.items():
        if len(members) > 1:
            for tensor in members:
                groups.setdefault((*layout, _digest(tensor)), []).append(tensor)

    rewired = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        keepers: list[tuple[gs.Constant, bytes]] = []
        for tensor in members:
            data = _bytes(tensor)
            keeper = next((k for k, kept_bytes in keepers if kept_bytes == data), None)
            if keeper is None:
                keepers.append((tensor, data))
            elif by_name.get(keeper.name, set()) <= {id(keeper)}:  # case 4: no name clash
                rewired += redirect_readers(tensor, keeper)  # subgraph readers too
    if rewired:
        logger.debug("dedup: %d readers rewired", rewired)
    return rewired > 0


def _digest(tensor: gs.Constant) -> bytes:
    return hashlib.sha256(_bytes(tensor)).digest()


def _bytes(tensor: gs.Constant) -> bytes:
    # Read a lazily imported initializer without keeping the array on the Constant: hashing
    # every weight must not load a large model's weights into memory a second time.
    values = tensor._values
    array = onnx.numpy_helper.to_array(values.tensor) if isinstance(values, LazyValues) else values
    return np.ascontiguousarray(np.asarray(array)).tobytes()
