"""Which weights of a layer can be pruned.

Built-in Keras layers are looked up in a registry of attribute names, the way
tfmot's `PruneRegistry` does. A user's own layer opts in by implementing the
`PrunableLayer` protocol: a `get_prunable_weights()` method that returns the
variables to prune. Everything else a layer holds (biases, normalization
parameters, excluded kernels) is a *shared* weight, kept as the `shared`
option of `embed` says.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import keras


@runtime_checkable
class PrunableLayer(Protocol):
    """Protocol for a custom layer that declares its prunable weights.

    Example:

    ```python
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=input_shape[-1:])

        def call(self, x):
            return x * self.w

        def get_prunable_weights(self):
            return [self.w]
    ```
    """

    def get_prunable_weights(self) -> list: ...


# Layer type -> attributes naming its prunable variables. Only kernels and
# embeddings: biases and normalization parameters are tiny and shared.
_REGISTRY: dict[type, tuple[str, ...]] = {
    keras.layers.Dense: ("kernel",),
    keras.layers.EinsumDense: ("kernel",),
    keras.layers.Conv1D: ("kernel",),
    keras.layers.Conv2D: ("kernel",),
    keras.layers.Conv3D: ("kernel",),
    keras.layers.Conv1DTranspose: ("kernel",),
    keras.layers.Conv2DTranspose: ("kernel",),
    keras.layers.Conv3DTranspose: ("kernel",),
    keras.layers.DepthwiseConv1D: ("kernel",),
    keras.layers.DepthwiseConv2D: ("kernel",),
    keras.layers.SeparableConv1D: ("depthwise_kernel", "pointwise_kernel"),
    keras.layers.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
    keras.layers.Embedding: ("embeddings",),
}

# Layers made of registered sublayers: attribute names of those sublayers.
_COMPOSITES: dict[type, tuple[str, ...]] = {
    keras.layers.MultiHeadAttention: (
        "query_dense",
        "key_dense",
        "value_dense",
        "output_dense",
    ),
}


def _registered_type(layer, table):
    for cls in type(layer).__mro__:
        if cls in table:
            return cls
    return None


def is_prunable(layer: keras.layers.Layer) -> bool:
    """Whether `layer` has weights elsa_tf knows how to prune."""
    return (
        isinstance(layer, PrunableLayer)
        or _registered_type(layer, _REGISTRY) is not None
        or _registered_type(layer, _COMPOSITES) is not None
    )


def get_prunable_weights(layer: keras.layers.Layer) -> list:
    """The variables of a built `layer` that elsa_tf prunes.

    Raises:
        ValueError: if the layer is not built.
        TypeError: if `layer` is neither registered nor a `PrunableLayer`, or
            its `get_prunable_weights()` returns something that is not one of
            its own variables.
    """
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} must be built before pruning.")
    if isinstance(layer, PrunableLayer):
        weights = list(layer.get_prunable_weights())
        own = {id(v) for v in layer.weights}
        for w in weights:
            if id(w) not in own:
                raise TypeError(
                    f"{type(layer).__name__}.get_prunable_weights() must return "
                    f"variables of layer {layer.name!r}. Received: {w!r}"
                )
        return weights
    cls = _registered_type(layer, _REGISTRY)
    if cls is not None:
        return [getattr(layer, name) for name in _REGISTRY[cls]]
    cls = _registered_type(layer, _COMPOSITES)
    if cls is not None:
        weights = []
        for name in _COMPOSITES[cls]:
            weights.extend(get_prunable_weights(getattr(layer, name)))
        return weights
    raise TypeError(
        f"Layer {layer.name!r} of type {type(layer).__name__} has no known "
        "prunable weights. Implement `get_prunable_weights()` on it (see "
        "`elsa_tf.PrunableLayer`) or leave it out of `prune`."
    )
