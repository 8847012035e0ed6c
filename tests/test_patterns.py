"""Pattern helpers that rule families share (onnxshrink/engine/patterns.py)."""

from __future__ import annotations

from onnxshrink.engine.patterns import reshape_is_noop


def test_reshape_zero_is_a_copy_only_without_allowzero():
    assert reshape_is_noop([2, 3, 4], [2, 0, 4], allowzero=False)
    assert not reshape_is_noop([2, 3, 4], [2, 0, 4], allowzero=True)
    assert reshape_is_noop([None, 3, 4], [0, -1, 4], allowzero=False)
    assert not reshape_is_noop([None, None, 4], [-1, -1, 4], allowzero=False)
