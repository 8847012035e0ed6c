"""Checking a candidate model against a reference with ONNX Runtime.

- `parity`: run both models on the same feeds and compare every output (tolerances, inputs).
- `localize`: where the error enters, node by node, from the intermediate tensors.
- `measure`: the error figure of lossy stages (noise-to-signal per channel group, masks, task
  metrics).

Nothing is re-exported here: import from the modules.
"""
