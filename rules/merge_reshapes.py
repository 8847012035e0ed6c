"""(stub, being written)"""

from __future__ import annotations

from onnxshrink.passes import Rule

RULES: list[Rule] = []
