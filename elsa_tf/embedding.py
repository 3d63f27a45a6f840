"""`embed` a Keras model into nested levels, and `extract` one level back out."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import keras

from elsa_tf import (
    _keras_compat,
    channels,
    elsa_model,
    model_ops,
    schedules,
    sparsifiers,
)
from elsa_tf import levels as levels_lib
from elsa_tf import physical as physical_lib
from elsa_tf import prunable as prunable_lib


def _prune_predicate(model, prune) -> Callable[[keras.layers.Layer], bool]:
    """Turns the `prune` option into a predicate over layers."""
    if prune is None:
        return lambda layer: True
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
        known = {}
        for layer in _keras_compat.walk(model):
            known.setdefault(layer.name, layer)
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


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model. Received: model={model!r}")
    if isinstance(model, elsa_model.ElsaModel) or any(
        isinstance(layer, elsa_model.ElsaModel) for layer in _keras_compat.walk(model)
    ):
        raise ValueError(f"Model {model.name!r} is already embedded.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Call it on data, or give it a "
            "keras.Input, before embedding."
        )


def copy_model(model: keras.Model, values: dict | None = None) -> keras.Model:
    """A copy of `model` made as Keras copies models, with weights.

    `keras.models.clone_model` keeps the class of a subclassed model and of
    a Functional subclass with its own config (keras_hub's backbones and
    tasks), which it rebuilds from that config, so a layer whose own config
    does not round-trip is never rebuilt alone. The copy is uncompiled.

    Args:
        model: a built model.
        values: optional `id(variable)` -> value for some of `model`'s
            weights, written into the copy instead of their current values.

    Raises:
        ValueError: if the copy's weights do not match the model's.
    """
    compiled = model.compiled
    # clone_model compiles the clone like its source, which would carry the
    # source's optimizer (a FreezingOptimizer for a level being extracted).
    model.compiled = False
    try:
        if type(model) in (keras.Sequential, keras.Model) or (
            type(model).__name__ == "Functional"
        ):
            # Layer by layer, so custom layers need no registration.
            clone = keras.models.clone_model(model)
        else:
            # Of its own class, from its own config, as Keras saves it.
            clone = keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(model),
                custom_objects={type(model).__name__: type(model)},
            )
    except Exception as e:
        raise ValueError(
            f"Model {model.name!r} of type {type(model).__name__} cannot be "
            "copied by keras.models.clone_model, which elsa_tf uses: give "
            "its class a get_config() whose values re-create it (Keras's "
            f"requirement for saving too). The error was: {e}"
        ) from e
    finally:
        model.compiled = compiled
    if not clone.built:
        clone.build_from_config(model.get_build_config())
    _keras_compat.copy_call_state(model, clone)
    source, target = model.weights, clone.weights
    if len(source) != len(target) or any(
        tuple(s.shape) != tuple(t.shape) for s, t in zip(source, target)
    ):
        raise ValueError(
            f"A copy of model {model.name!r} does not hold the same weights "
            f"({len(target)} against {len(source)}): its get_config() does not "
            "re-create it."
        )
    values = values or {}
    for s, t in zip(source, target):
        value = values.get(id(s))
        t.assign(s.numpy() if value is None else value)
    return clone


def embed(
    model: keras.Model,
    sparsities,
    *,
    prune=None,
    sparsifier=None,
    selection: str | None = None,
    schedule=None,
    shared: str | None = None,
    block_shape: tuple[int, int] | None = None,
    granularity: str | None = None,
    keep_whole=None,
) -> keras.Model:
    """Embeds nested sparse levels into a copy of `model`.

    Returns an `ElsaModel` around a copy of `model`, holding a level map for
    every prunable weight inside it, sublayers of composite layers included;
    the input model is not modified. Train the result with `elsa_tf.fit`,
    then `extract` levels.

    Args:
        model: a built Keras model: Sequential, Functional, subclassed (its
            class needs a `get_config()` that re-creates it, as Keras saving
            does), keras.applications or keras_hub.
        sparsities: target sparsity of each level over the prunable weights,
            strictly decreasing, each in [0, 1): level 0 is the sparsest and
            0.0 means dense.
        prune: which layers to prune: None (every layer elsa_tf knows how to
            prune, see `PrunableLayer`), a layer class or tuple of classes, a
            list of layer names, or a predicate `layer -> bool`. A layer is
            pruned when it, or a layer it sits in, is selected. The weights of
            the others are shared weights.
        sparsifier: how each level chooses its weights: a `Sparsifier`, or
            its name, `"gradual_magnitude"` (None, the default: gradual
            magnitude pruning, as tfmot's), `"dpf"` (Dynamic Pruning with
            Feedback) or `"polarized_gates"` (trained channel gates, with
            `granularity="channel"` only; `elsa_tf.PolarizedGates`). See
            `elsa_tf.sparsifiers`.
        selection: for a sparsifier given by name: `"lamp"` (the default:
            one ranking across all prunable weights of layer-adaptive
            scores, Lee et al. 2021, which never empties a layer: a
            depthwise or final layer that plain global ranking would prune
            whole keeps its best weights), `"global"` (one ranking of the
            magnitudes themselves) or `"per_layer"` (each layer reaches the
            level's sparsity, as tfmot's wrappers do). A sparsifier object
            carries its own.
        schedule: the pruning schedule inside each level: a `LevelSchedule`,
            `"polynomial_decay"` (the default), `"constant"`, or tfmot's
            `PolynomialDecay` / `ConstantSparsity` class.
        shared: how non-prunable weights are kept; None (the default) means
            `"freeze"` for single weights and `"per_level_statistics"` at
            `granularity="channel"` (`elsa_model.default_shared`). `"freeze"`:
            trained with level 0, then frozen (one copy, no storage cost).
            `"per_level_statistics"`: the same, except the statistics the
            model updates itself (BatchNormalization's moving mean and
            variance), which each level keeps its own of, with normalization
            in training mode at every level: more accurate where level 0
            leaves channels dead (their frozen variance is near zero), at
            some export cost (see the README). `"per_level"`: each level
            trains its own copy of every one.
        block_shape: for a sparsifier given by name (an object carries its
            own): None (the default) selects weights one by one; a pair
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

        granularity: for a sparsifier given by name (an object carries its
            own): `"weight"` (None, the default: single weights, or blocks
            with `block_shape`) or `"channel"`: each level keeps a nested
            subset of the channels of every channel group the model's graph
            couples (a convolution's filters with its bias, its
            BatchNormalization, the depthwise convolution after it and the
            next layer's input slice; residual partners together; see
            `elsa_tf.channels`), so that a level is a narrower dense network
            (`extract(..., physical=True)`). A level's sparsity is then the
            share of channels it removes from the groups that can be
            narrowed (model inputs and outputs keep their width), per group
            with `selection="per_layer"`, across groups with `"global"`; every
            group keeps at least one channel. Needs a Functional or
            Sequential model; `prune` and `block_shape` do not apply.
        keep_whole: at `granularity="channel"`, names of layers whose output
            width every level keeps (a residual stream, a layer another
            program reads), besides the model's outputs, which always are:
            the channel groups they belong to are pinned. None keeps only
            the outputs whole.

    Returns:
        The embedded model, uncompiled, at level 0.

    Raises:
        TypeError: for an option of the wrong type.
        ValueError: for bad sparsities, an unknown layer filter, a bad
            `block_shape` or `granularity`, a model with no prunable layer, an
            unbuilt model, a model Keras cannot copy, or a model already
            embedded; at channel granularity, a subclassed model, a model
            where no layer can be narrowed, `prune` or `block_shape`, or a
            level that would remove every channel of a group.

    Example:

    >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model = embed(base, sparsities=[0.5, 0.0])
    >>> [row["target_sparsity"] for row in summary(model)]
    [0.5, 0.0]
    """
    sparsities = levels_lib.validate_sparsities(sparsities)
    _check_model(model)
    if shared is not None:
        elsa_model.check_option("shared", shared, elsa_model.SHARED_MODES)
    options = {}
    if selection is not None:
        elsa_model.check_option("selection", selection, elsa_model.SELECTIONS)
        options["selection"] = selection
    if block_shape is not None:
        options["block_shape"] = levels_lib.validate_block_shape(block_shape)
    if granularity is not None:
        elsa_model.check_option("granularity", granularity, elsa_model.GRANULARITIES)
        options["granularity"] = granularity
    sparsifier = sparsifiers.get(sparsifier, **options)
    if sparsifier.granularity == "channel" and prune is not None:
        raise ValueError(
            "prune does not apply to granularity='channel': the prunable weights "
            "are the members of the model's unpinned channel groups. "
            f"Received: prune={prune!r}"
        )
    if keep_whole is not None and sparsifier.granularity != "channel":
        raise ValueError(
            "keep_whole keeps layers' channels whole at granularity='channel'; "
            f"it does not apply to granularity={sparsifier.granularity!r}. "
            f"Received: keep_whole={keep_whole!r}"
        )
    schedule = schedules.get(schedule)
    should_prune = _prune_predicate(model, prune)
    # A weight is pruned when the layer that holds it, or any layer around
    # that one (a block, a MultiHeadAttention), is selected by `prune`. The
    # user's names and predicate apply to the user's model: the copy's
    # unnamed sublayers may be named differently, so owners are matched by
    # their place in the traversal, and the copy must have the same ones.
    owners = prunable_lib.prunable_owners(model)
    selected = [
        i
        for i, (_, chain, _) in enumerate(owners)
        if any(should_prune(x) for x in chain[1:] or chain)
    ]
    if not selected:
        raise ValueError(
            f"Model {model.name!r} has no prunable layers selected by "
            f"prune={prune!r}. elsa_tf prunes Dense, EinsumDense, Conv*, "
            "DepthwiseConv*, SeparableConv*, Embedding, other layers' 'kernel' "
            "and 'embeddings' variables, and layers implementing "
            "get_prunable_weights(), inside any layer or model."
        )
    inner = copy_model(model)

    def shapes(found):
        return [[tuple(w.shape) for w in weights] for _, _, weights in found]

    if shapes(prunable_lib.prunable_owners(inner)) != shapes(owners):
        raise ValueError(
            f"A copy of model {model.name!r} does not hold the same prunable "
            "layers in the same order: its get_config() does not re-create it."
        )
    return elsa_model.ElsaModel(
        inner,
        sparsities,
        prune=None if len(selected) == len(owners) else selected,
        shared=shared,
        schedule=schedule,
        sparsifier=sparsifier,
        keep_whole=keep_whole,
        name=f"elsa_{model.name}",
    )


def extract(model: keras.Model, level: int, physical: bool = False) -> keras.Model:
    """A plain Keras model with the weights of one level.

    Args:
        model: an embedded model.
        level: the level to extract, in [0, number of levels).
        physical: for a model embedded with `granularity="channel"`: remove
            the channels `level` does not use instead of zeroing them. The
            result has the same architecture with fewer filters and units
            (`elsa_tf.physical.narrow`), and computes what the zeroed level
            computes, within float rounding.

    Returns:
        An uncompiled copy of the embedded model's inner model, of its class
        (a subclassed model or a keras_hub task keeps its methods), with no
        elsa_tf objects and the weights that `level` does not use at zero.
        It predicts exactly what the embedded model predicts at that level.

    Raises:
        ValueError: if the model is not embedded, `level` is out of range, or
            `physical=True` on a model not embedded at channel granularity.
    """
    model_ops.check_level(model, level)
    owner = model_ops.owner(model)
    if physical and owner.granularity != "channel":
        raise ValueError(
            "extract(physical=True) removes whole channels, so it needs a model "
            "embedded with granularity='channel'; model "
            f"{owner.name!r} has granularity={owner.granularity!r}. Received: "
            f"physical={physical!r}"
        )
    masked = copy_model(owner.inner_model, owner.effective_weights(level))
    if not physical:
        return masked
    keep = model_ops.channel_keep(owner, level)
    groups = channels.channel_groups(masked, keep_whole=owner.keep_whole or ())
    if [g.size for g in groups] != [g.size for g in owner.channel_groups]:
        raise RuntimeError(
            f"The copy of model {owner.inner_model.name!r} has other channel "
            "groups than the model itself."
        )
    return physical_lib.narrow(masked, groups, keep)


def set_level(model: keras.Model, level: int) -> None:
    """Makes the embedded model compute with the weights of `level`.

    Raises:
        ValueError: if the model is not embedded or `level` is out of range.
    """
    model_ops.set_view_level(model, level)
