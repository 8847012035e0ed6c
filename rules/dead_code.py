"""(stub, being written)"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxshrink.passes import RuleContext


def constants_to_initializers(graph: gs.Graph, ctx: RuleContext) -> bool:
    return False


def remove_dead_code(graph: gs.Graph, ctx: RuleContext) -> bool:
    return False
