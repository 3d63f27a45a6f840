"""`embed` a Keras model into nested levels, and `extract` one level back out."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import keras

from elsa_tf import levels as levels_lib
from elsa_tf import model_ops, schedules
from elsa_tf import prunable as prunable_lib
from elsa_tf._keras_compat import is_functional
from elsa_tf.wrapper import SELECTIONS, SHARED_MODES, ElsaWrapper, check_option


def _prune_predicate(model, prune) -> Callable[[keras.layers.Layer], bool]:
    """Turns the `prune` option into a predicate over layers."""
    if prune is None:
        return prunable_lib.is_prunable
    if isinstance(prune, type) or (
        isinstance(prune, tuple) and prune and all(isinstance(p, type) for p in prune)
    ):
        types = prune if isinstance(prune, tuple) else (prune,)
        for t in types:
            if not issubclass(t, keras.layers.Layer):
                raise TypeError(
                    "prune types must be Keras layer classes. "
                    f"Received: prune={prune!r}"
                )
        return lambda layer: isinstance(layer, types)
    if isinstance(prune, str):
        prune = [prune]
    if isinstance(prune, Iterable) and not callable(prune):
        names = list(prune)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(
                "prune must be None, a layer class or tuple of classes, a list of "
                f"layer names, or a predicate. Received: prune={prune!r}"
            )
        known = {layer.name: layer for layer in model_ops.iter_layers(model)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"prune names layers that model {model.name!r} does not have: "
                f"{unknown}. Received: prune={names!r}"
            )
        not_prunable = [n for n in names if not prunable_lib.is_prunable(known[n])]
        if not_prunable:
            raise ValueError(
                f"prune names layers with no prunable weights: {not_prunable}. "
                f"Received: prune={names!r}"
            )
        wanted = set(names)
        return lambda layer: layer.name in wanted
    if callable(prune):
        return prune
    raise TypeError(
        "prune must be None, a layer class or tuple of classes, a list of layer "
        f"names, or a predicate. Received: prune={prune!r}"
    )


def _copy_layer(layer):
    """A built copy of `layer` with its weights."""
    clone = layer.__class__.from_config(layer.get_config())
    if getattr(layer, "weights", None):
        build_config = layer.get_build_config()
        if build_config is None:
            raise ValueError(
                f"Layer {layer.name!r} was built without a recorded input shape, "
                "so it cannot be copied. Build the model by calling it on data "
                "or on keras.Input first."
            )
        clone.build_from_config(build_config)
        clone.set_weights(layer.get_weights())
    return clone


def _check_cloneable(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model. Received: model={model!r}")
    nested = [m for m in model_ops.iter_layers(model) if isinstance(m, keras.Model)]
    for m in [model, *nested]:
        if not isinstance(m, keras.Sequential) and not is_functional(m):
            raise TypeError(
                f"Cannot embed model {m.name!r}: it is a subclassed "
                f"{type(m).__name__}, whose layers cannot be re-wired. Build it "
                "as a Functional or Sequential model (keras.Input(...) -> "
                "layers -> keras.Model(inputs, outputs)), or embed the "
                "Functional / Sequential parts it is made of."
            )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Call it on data, or give it a "
            "keras.Input, before embedding."
        )


def _clone(model, clone_function):
    """`keras.models.clone_model`, recursive, returning an uncompiled model.

    clone_model compiles the clone like its source; a clone's compile
    settings would carry the source's optimizer (a `FreezingOptimizer` for an
    extracted level), so the source is presented as uncompiled meanwhile.
    """
    compiled = model.compiled
    model.compiled = False
    try:
        return keras.models.clone_model(
            model, clone_function=clone_function, recursive=True
        )
    finally:
        model.compiled = compiled


def embed(
    model: keras.Model,
    sparsities,
    *,
    prune=None,
    selection: str = "per_layer",
    schedule=None,
    shared: str = "freeze",
    block_shape: tuple[int, int] | None = None,
) -> keras.Model:
    """Embeds nested sparse levels into a copy of `model`.

    Every layer with weights is wrapped in an `ElsaWrapper`; the input model is
    not modified. Train the result with `elsa_tf.fit`, then `extract` levels.

    Args:
        model: a built Functional or Sequential Keras model; nested models are
            embedded too.
        sparsities: target sparsity of each level over the prunable weights,
            strictly decreasing, each in [0, 1): level 0 is the sparsest and
            0.0 means dense.
        prune: which layers to prune: None (every layer elsa_tf knows how to
            prune, see `PrunableLayer`), a layer class or tuple of classes, a
            list of layer names, or a predicate `layer -> bool`. The weights of
            the others are shared weights.
        selection: `"per_layer"` magnitude selection (each layer reaches the
            level's sparsity) or `"global"` (one magnitude ranking across all
            prunable weights).
        schedule: the pruning schedule inside each level: a `LevelSchedule`,
            `"polynomial_decay"` (the default), `"constant"`, or tfmot's
            `PolynomialDecay` / `ConstantSparsity` class.
        shared: how non-prunable weights are kept: `"freeze"` (trained with
            level 0, then frozen: one copy, no storage cost) or `"per_level"`
            (each level trains its own copy).
        block_shape: None (the default) selects weights one by one; a pair
            of positive ints `(rows, cols)` keeps or drops every rank-2
            prunable weight in whole blocks of that shape, ranked by their
            mean score (mean |w|), like tfmot's `block_size`. On a Dense
            kernel, of shape `(in, out)`, `(4, 1)` groups 4 consecutive inputs
            of one output unit: the 1x4 blocks that TFLite's sparse
            fully-connected kernel runs fast. Where the block does not divide
            a weight's shape, the edge blocks are smaller. Weights of other
            ranks (convolution kernels) are still selected one by one. As
            whole blocks are kept, each level keeps the achievable number of
            weights nearest its target (the smaller one on a tie), so its
            sparsity is off by at most half a block per layer (per model for
            `selection="global"`).

    Returns:
        The embedded model, uncompiled, at level 0.

    Raises:
        TypeError: for a subclassed model or an option of the wrong type.
        ValueError: for bad sparsities, an unknown layer filter, a bad
            `block_shape`, a model with no prunable layer, or a model already
            embedded.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model = embed(base, sparsities=[0.5, 0.0])
    >>> [row["target_sparsity"] for row in summary(model)]
    [0.5, 0.0]
    """
    sparsities = levels_lib.validate_sparsities(sparsities)
    _check_cloneable(model)
    check_option("shared", shared, SHARED_MODES)
    check_option("selection", selection, SELECTIONS)
    block_shape = levels_lib.validate_block_shape(block_shape)
    schedule = schedules.get(schedule)
    if any(True for _ in model_ops.iter_wrappers(model)):
        raise ValueError(f"Model {model.name!r} is already embedded.")
    should_prune = _prune_predicate(model, prune)

    def wrap(layer):
        clone = _copy_layer(layer)
        if not getattr(layer, "weights", None):
            # Weightless layers and functional ops (`x + y`) need no levels.
            return clone
        return ElsaWrapper(
            clone,
            sparsities,
            prune=bool(should_prune(layer)) and prunable_lib.is_prunable(layer),
            shared=shared,
            schedule=schedule,
            selection=selection,
            block_shape=block_shape,
            name=f"elsa_{layer.name}",
        )

    embedded = _clone(model, wrap)
    if not any(w.prunable_weights for w in model_ops.iter_wrappers(embedded)):
        raise ValueError(
            f"Model {model.name!r} has no prunable layers selected by "
            f"prune={prune!r}. elsa_tf prunes Dense, EinsumDense, Conv*, "
            "DepthwiseConv*, SeparableConv*, Embedding, MultiHeadAttention and "
            "layers implementing get_prunable_weights()."
        )
    return embedded


def extract(model: keras.Model, level: int) -> keras.Model:
    """A plain Keras model with the weights of one level.

    Args:
        model: an embedded model.
        level: the level to extract, in [0, number of levels).

    Returns:
        An uncompiled model with the original architecture and no elsa_tf
        objects, whose weights unused by `level` are zero. It predicts exactly what the
        embedded model predicts at that level.

    Raises:
        ValueError: if the model is not embedded or `level` is out of range.
    """
    model_ops.check_level(model, level)

    def unwrap(layer):
        if not isinstance(layer, ElsaWrapper):
            return layer.__class__.from_config(layer.get_config())
        inner = layer.layer
        clone = inner.__class__.from_config(inner.get_config())
        clone.build_from_config(inner.get_build_config())
        clone.set_weights(layer.effective_weights(level))
        return clone

    return _clone(model, unwrap)


def set_level(model: keras.Model, level: int) -> None:
    """Makes the embedded model compute with the weights of `level`.

    Raises:
        ValueError: if the model is not embedded or `level` is out of range.
    """
    model_ops.set_view_level(model, level)
