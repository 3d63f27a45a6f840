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

from elsa_tf import _keras_compat


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

# A layer that is neither registered nor a `PrunableLayer` and holds no
# sublayers (keras_hub's `PositionEmbedding`, say) has its variables of these
# names pruned, when they are at least rank 2: Keras and keras_hub name a
# layer's connection weights so, and a rank-1 variable is a bias or a scale.
_PRUNABLE_NAMES = ("kernel", "embeddings")


def _registered_type(layer, table):
    for cls in type(layer).__mro__:
        if cls in table:
            return cls
    return None


def _own_prunable_weights(layer) -> list | None:
    """The weights `layer` itself declares prunable, or None to look inside."""
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
    if not _keras_compat.sublayers(layer):
        return [
            w for w in layer.weights if w.name in _PRUNABLE_NAMES and len(w.shape) >= 2
        ]
    return None


def prunable_owners(layer: keras.layers.Layer) -> list[tuple[str, list, list]]:
    """The layers inside `layer` (itself included) that own prunable weights.

    A registered layer or a `PrunableLayer` owns what it declares; any other
    layer is looked into, sublayer by sublayer (a keras_hub
    `TransformerEncoder`, a `MultiHeadAttention`, a user's block), down to
    the layers that hold the weights.

    Returns:
        One `(path, chain, weights)` per owning layer, in tracking order:
        `path` joins the layer names below `layer` with "/" ("" for `layer`
        itself), `chain` lists the layers from `layer` down to the owner, and
        `weights` are the owner's prunable variables. A variable reachable
        twice (a shared sublayer) is listed once.
    """
    found, seen = [], set()

    def visit(node, path, chain):
        own = _own_prunable_weights(node)
        if own is not None:
            own = [w for w in own if id(w) not in seen]
            seen.update(id(w) for w in own)
            if own:
                found.append((path, chain, own))
            return
        for sub in _keras_compat.sublayers(node):
            visit(sub, f"{path}/{sub.name}" if path else sub.name, [*chain, sub])

    visit(layer, "", [layer])
    return found


def is_prunable(layer: keras.layers.Layer) -> bool:
    """Whether `layer`, or a layer inside it, has weights elsa_tf can prune."""
    if isinstance(layer, PrunableLayer) or _registered_type(layer, _REGISTRY):
        return True
    if not layer.built:
        return False
    return bool(prunable_owners(layer))


def get_prunable_weights(layer: keras.layers.Layer) -> list:
    """The variables of a built `layer` that elsa_tf prunes, sublayers' included.

    Raises:
        ValueError: if the layer is not built.
        TypeError: if `layer` has no prunable weight, or a `PrunableLayer`
            returns a variable that is not its own.
    """
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} must be built before pruning.")
    found = prunable_owners(layer)
    if not found:
        raise TypeError(
            f"Layer {layer.name!r} of type {type(layer).__name__} has no known "
            "prunable weights. Implement `get_prunable_weights()` on it (see "
            "`elsa_tf.PrunableLayer`) or leave it out of `prune`."
        )
    return [w for _, _, weights in found for w in weights]
