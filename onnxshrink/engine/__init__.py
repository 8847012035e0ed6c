"""The lossless engine: models in and out, the pass machinery, and the `optimize` pipeline.

- `io`: load and save models safely (external data, atomic writes).
- `graph`: onnx-graphsurgeon helpers that rules share.
- `shapes`: shape inference, input-shape pinning, opset conversion.
- `passes`: the pass and rule contract and the pass manager (fixed point, step limit).
- `patterns`: pattern-matching helpers that rule families share (tolerances, reasons to
  decline, product chains, reshape no-ops, constants shared across graph scopes).
- `affine`: folding a per-channel affine map into a Conv/ConvTranspose/Gemm/MatMul's weights
  (shared by the affine and BatchNorm folds).
- `optimize`: the pipeline: load, rewrite, verify, run a lossy stage when asked, write.

Nothing is re-exported here: import from the modules (the public API is `onnxshrink`).
"""
