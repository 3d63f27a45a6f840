"""A physically narrower copy of a model: dropped channels removed, not zeroed.

Given the model's channel groups (`channels.channel_groups`) and which channels
of each group to keep, `kept_indices` works out, for every variable, the
indices to keep along each axis the groups index (pure numpy), and `narrow`
builds the same architecture with fewer filters and units and copies the
kept slices into it. Layers that take their width from their input
(BatchNormalization, depthwise convolutions, Concatenate, Flatten, pooling)
need no change; `Dense` and the convolutions get their new `units` or
`filters`, `MultiHeadAttention` its new `num_heads` (and an `output_shape`
where its output is no longer as wide as its query), and a `Reshape` its new
last dimension.

The narrowed model computes exactly what the original computes with every
dropped channel's parameters zeroed (its kernel slices, bias, normalization
scale and shift, and its consumers' input slices): a zeroed channel is zero
after BatchNormalization and every pass-through layer, and contributes
nothing to the layers that read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np

from elsa_tf.channels import (
    ATTENTION,
    PRODUCERS,
    SEPARABLE,
    ChannelGroup,
    member_indices,
)


def kept_channels(
    groups: Sequence[ChannelGroup], keep: Mapping[int, np.ndarray]
) -> list[np.ndarray]:
    """The sorted indices of the channels kept in each group.

    Args:
        groups: the model's channel groups.
        keep: group index -> boolean array of the group's size, True for a
            kept channel. Groups not in `keep` keep every channel.

    Returns:
        One int64 array per group.

    Raises:
        ValueError: for an index that names no group, an array of the wrong
            shape or dtype, a group left without channels, or a pinned group
            asked to lose channels.
    """
    unknown = sorted(set(keep) - set(range(len(groups))))
    if unknown:
        raise ValueError(
            f"keep names groups that do not exist (there are {len(groups)}). "
            f"Received: keep keys {unknown}"
        )
    kept = []
    for index, group in enumerate(groups):
        if index not in keep:
            kept.append(np.arange(group.size, dtype=np.int64))
            continue
        mask = np.asarray(keep[index])
        where = f"group {index} (layers {list(group.layers)})"
        if mask.dtype != bool or mask.shape != (group.size,):
            raise ValueError(
                f"keep[{index}] must be a boolean array of shape ({group.size},) "
                f"for {where}. Received: dtype={mask.dtype}, shape={mask.shape}"
            )
        if not mask.any():
            raise ValueError(
                f"keep[{index}] drops every channel of {where}; keep at least one. "
                f"Received: keep[{index}]={mask.tolist()}"
            )
        if group.pinned and not mask.all():
            raise ValueError(
                f"{where} is pinned ({group.pinned}) and must keep all "
                f"{group.size} channels. Received: {int(mask.sum())} kept"
            )
        kept.append(np.flatnonzero(mask).astype(np.int64))
    return kept


def kept_indices(
    groups: Sequence[ChannelGroup],
    keep: Mapping[int, np.ndarray],
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, dict[int, np.ndarray]]:
    """The indices each variable keeps, along each axis that loses channels.

    Pure: no Keras objects.

    Args:
        groups: the model's channel groups.
        keep: as for `kept_channels`.
        shapes: variable path -> shape, for every variable the groups name.

    Returns:
        path -> {axis: ascending kept indices}, only for the variables and
        axes that lose something.

    Raises:
        ValueError: as `kept_channels`, or when a member names a variable
            missing from `shapes` or indexes past its axis (groups of another
            model).

    Example:
        >>> from elsa_tf.channels import Member
        >>> group = ChannelGroup(2, (Member("fc/kernel", 0, "in", stride=2,
        ...                                 repeat=3),), ("flatten",), None)
        >>> kept_indices([group], {0: np.array([False, True])},
        ...              {"fc/kernel": (6, 4)})["fc/kernel"][0].tolist()
        [1, 3, 5]
    """
    dropped: dict[tuple[str, int], list[np.ndarray]] = {}
    for group, kept in zip(groups, kept_channels(groups, keep)):
        if len(kept) == group.size:
            continue
        lost = np.setdiff1d(np.arange(group.size), kept)
        for member in group.members:
            if member.path not in shapes:
                raise ValueError(
                    f"A channel group of layers {list(group.layers)} names variable "
                    f"{member.path!r}, which the model does not have: were the "
                    "groups found on another model?"
                )
            indices = member_indices(member, lost)
            dim = shapes[member.path][member.axis]
            if indices.max() >= dim:
                raise ValueError(
                    f"A channel group of layers {list(group.layers)} indexes "
                    f"{member.path!r} axis {member.axis} up to {indices.max()}, "
                    f"past its size {dim}: were the groups found on another model?"
                )
            dropped.setdefault((member.path, member.axis), []).append(indices)
    result: dict[str, dict[int, np.ndarray]] = {}
    for (path, axis), lost in dropped.items():
        dim = shapes[path][axis]
        result.setdefault(path, {})[axis] = np.setdiff1d(
            np.arange(dim), np.concatenate(lost)
        )
    return result


def narrow(
    model: keras.Model,
    groups: Sequence[ChannelGroup],
    keep: Mapping[int, np.ndarray],
) -> keras.Model:
    """A copy of `model` with the dropped channels removed.

    Args:
        model: the Functional or Sequential model the groups were found on.
            It is not modified.
        groups: `channels.channel_groups(model, ...)`.
        keep: group index -> boolean array, True for a kept channel; groups
            not in `keep` (and pinned groups) keep every channel.

    Returns:
        A model of the same class, layer classes and names, with fewer units
        and filters, holding the kept slices of every variable.

    Raises:
        ValueError: as `kept_channels` and `kept_indices`.

    Example:
        >>> from elsa_tf.channels import channel_groups
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(3, name="hidden")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
        >>> groups = channel_groups(model)
        >>> small = narrow(model, groups, {1: np.array([True, False, True])})
        >>> small.get_layer("hidden").units
        2
    """
    variables = {v.path: v for v in model.weights}
    shapes = {path: tuple(v.shape) for path, v in variables.items()}
    slices = kept_indices(groups, keep, shapes)
    values = {}
    for path, variable in variables.items():
        value = keras.ops.convert_to_numpy(variable)
        for axis, indices in slices.get(path, {}).items():
            value = np.take(value, indices, axis=axis)
        values[path] = value

    kept = kept_channels(groups, keep)
    # A Reshape's last dimension shrinks as its channels do (each recurs the
    # same number of times before and after).
    ratio: dict[str, tuple[int, int]] = {}
    for group, channels in zip(groups, kept):
        for layer in group.layers:
            old, new = ratio.get(layer, (0, 0))
            ratio[layer] = (old + group.size, new + len(channels))

    def clone(layer):
        config = layer.get_config()
        key = PRODUCERS.get(type(layer))
        if key is not None:
            config[key] = values[layer.kernel.path].shape[-1]
        elif type(layer) in SEPARABLE:
            config["filters"] = values[layer.pointwise_kernel.path].shape[-1]
        elif type(layer) in ATTENTION:
            query = values[layer.query_dense.kernel.path].shape
            config["num_heads"] = query[1]
            # (heads, value_dim, *output_shape); a multi-axis output is pinned.
            output = values[layer.output_dense.kernel.path].shape[2:]
            if len(output) == 1 and (
                config["output_shape"] is not None or output[0] != query[0]
            ):
                config["output_shape"] = output[0]
        elif type(layer) is keras.layers.Reshape and config["target_shape"][-1] != -1:
            old, new = ratio[layer.name]
            target = list(config["target_shape"])
            target[-1] = target[-1] * new // old
            config["target_shape"] = tuple(target)
        return type(layer).from_config(config)

    input_tensors = None
    if not isinstance(model, keras.Sequential):
        # clone_model names new inputs after the input tensors, which need not
        # be the input layers' names (keras.applications); keep the layers'.
        names = {
            id(layer.output): layer.name
            for layer in model.layers
            if isinstance(layer, keras.layers.InputLayer)
        }
        input_tensors = keras.tree.map_structure(
            lambda t: keras.Input(
                batch_shape=t.shape, dtype=t.dtype, name=names.get(id(t), t.name)
            ),
            model.input,
        )
    narrowed = keras.models.clone_model(
        model, input_tensors=input_tensors, clone_function=clone
    )
    # By position: clone_model keeps the layers and their weights in order,
    # but not always their paths (a nested Sequential's weights lose its
    # name; a custom layer's unnamed variables are numbered afresh).
    if len(narrowed.weights) != len(model.weights):
        raise RuntimeError(
            f"The narrowed copy of model {model.name!r} has "
            f"{len(narrowed.weights)} variables; the model has {len(model.weights)}."
        )
    for source, variable in zip(model.weights, narrowed.weights):
        value = values[source.path]
        if tuple(variable.shape) != value.shape:
            raise RuntimeError(
                f"The narrowed copy of model {model.name!r} has variable "
                f"{variable.path!r} of shape {tuple(variable.shape)} where the "
                f"model's {source.path!r} narrows to {value.shape}."
            )
        variable.assign(value)
    return narrowed
