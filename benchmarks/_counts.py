"""What the channel benchmarks count in a Keras model besides its parameters."""

from __future__ import annotations

import numpy as np


def multiply_adds(model) -> int:
    """Multiply-adds of one example through every Conv*D, DepthwiseConv*D
    and Dense layer: output positions times kernel elements (a kernel's
    input and output channels included). Any other layer with weights but
    BatchNormalization (which the converter folds) raises, rather than be
    left out of the count."""
    import keras

    kinds = (
        keras.layers.Conv1D,
        keras.layers.Conv2D,
        keras.layers.Conv3D,
        keras.layers.DepthwiseConv1D,
        keras.layers.DepthwiseConv2D,
        keras.layers.Dense,
    )
    total = 0
    for layer in model.layers:
        if type(layer) in kinds:
            positions = int(np.prod(layer.output.shape[1:-1], dtype=np.int64))
            total += positions * int(np.prod(layer.kernel.shape, dtype=np.int64))
        elif isinstance(layer, kinds) or (
            layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
        ):
            raise ValueError(
                f"Cannot count the multiply-adds of layer {layer.name!r} of "
                f"type {type(layer).__name__}: only exact Conv*D, "
                "DepthwiseConv*D and Dense layers are counted."
            )
    return total
