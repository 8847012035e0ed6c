from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import make_model

# A small conv net with the patterns the default pipeline rewrites: a Constant node holding the
# weight, an Identity, and Conv+BatchNormalization.
_CONV_BN = """
<ir_version: 8, opset_import: ["" : 13]>
agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    c = Conv <pads = [1,1,1,1]> (x, w)
    i = Identity (c)
    y = BatchNormalization <epsilon = 0.001> (i, gamma, beta, mean, var)
}
"""


def build_conv_bn() -> onnx.ModelProto:
    """Conv (weight in a Constant node) -> Identity -> BatchNormalization."""
    rng = np.random.default_rng(0)
    return make_model(
        _CONV_BN,
        {
            "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
            "beta": rng.normal(size=4).astype(np.float32),
            "mean": rng.normal(size=4).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        },
        constant_nodes={"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32)},
    )


@pytest.fixture
def conv_bn_model() -> onnx.ModelProto:
    return build_conv_bn()


@pytest.fixture
def conv_bn_path(tmp_path, conv_bn_model):
    path = tmp_path / "conv_bn.onnx"
    onnx.save_model(conv_bn_model, str(path))
    return path
