"""Pure channel-level math: channel codes, channel scores and kept channels.

With `granularity="channel"`, a level keeps or drops whole channels of the
model's unpinned channel groups (`elsa_tf.channels`). The state stays the
element-level `uint8` level maps of `elsa_tf.levels`, one per prunable weight,
so masking, exact freezing, saving and extraction work as they do for single
weights. A channel's *code* (the first level that uses it) is written onto
every element of its member slices; an element indexed by two channels (a
Dense kernel is "in" for one group and "out" for another) carries the larger
of the two codes, since it is used only when both channels are
(`element_codes`). Channels of pinned groups count as code 0 (always used).

The way back, `channel_codes`, reads a channel's code as the smallest code
over its member slices. That is exact as long as every unpinned group keeps
at least one channel at level 0 (`keep_channels` guarantees it): a channel's
slice then always holds an element whose other channels are used at least as
early as it is. `prune_to` checks the round trip on every mask update.

A channel's score is a norm of the sparsifier's elementwise scores over its
"out" member slices (its filter, bias, normalization scale and shift),
divided by their element count: the mean (`"l1"`) or the root mean square
(`"l2"`). Within a group every channel has the same count, so this changes
nothing for per-layer selection; under global selection it lets a 3x3x8
filter compete with a 3x3x256 one on the size of its weights rather than on
their number.

Nothing here knows about Keras or TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from elsa_tf import levels
from elsa_tf import selection as selection_lib
from elsa_tf.channels import ChannelGroup, member_indices

CHANNEL_NORMS = ("l1", "l2")


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
    """One member of a group, on a prunable weight.

    Attributes:
        weight: the weight's index among the prunable weights.
        axis: the weight's axis the channels index.
        indices: `member_indices(member, range(size))`: channel `c`'s
            positions are `indices[j * size + c]`, `j` in `range(repeat)`.
        role: "out" or "in" (see `channels.Member`).
    """

    weight: int
    axis: int
    indices: np.ndarray
    role: str


@dataclasses.dataclass(frozen=True, eq=False)
class GroupLayout:
    """An unpinned channel group, seen through the prunable weights.

    Attributes:
        group: the group's index in `channel_groups(model)`.
        size: its number of channels.
        slices: its members on prunable weights.
        layer: the first layer carrying its channels, for messages.
    """

    group: int
    size: int
    slices: tuple[Slice, ...]
    layer: str


def layout(groups: Sequence[ChannelGroup], paths: Sequence[str]) -> list[GroupLayout]:
    """The unpinned groups' members on the prunable weights named `paths`.

    Args:
        groups: `channels.channel_groups(model)`.
        paths: the prunable weights' variable paths, in order.

    Returns:
        One `GroupLayout` per unpinned group, in group order.
    """
    index = {path: i for i, path in enumerate(paths)}
    result = []
    for g, group in enumerate(groups):
        if group.pinned is not None:
            continue
        channels = np.arange(group.size)
        slices = tuple(
            Slice(index[m.path], m.axis, member_indices(m, channels), m.role)
            for m in group.members
            if m.path in index
        )
        result.append(GroupLayout(g, group.size, slices, group.layers[0]))
    return result


def _per_channel(array: np.ndarray, piece: Slice, size: int) -> np.ndarray:
    """The slice's entries of `array`, as (size, entries per channel)."""
    taken = np.moveaxis(np.take(array, piece.indices, axis=piece.axis), piece.axis, 0)
    repeat = piece.indices.size // size
    return np.swapaxes(taken.reshape(repeat, size, -1), 0, 1).reshape(size, -1)


def element_codes(
    codes: Sequence[np.ndarray], groups: Sequence[GroupLayout], shapes
) -> list[np.ndarray]:
    """Every prunable weight's level map, from its channels' codes.

    Args:
        codes: one uint8 array of codes per group of `groups`.
        groups: the layout of the unpinned groups.
        shapes: the prunable weights' shapes.

    Returns:
        One uint8 map per weight: each element holds the largest code of the
        channels that index it (0 where none does).
    """
    maps = [np.zeros(shape, np.uint8) for shape in shapes]
    for group, group_codes in zip(groups, codes):
        group_codes = np.asarray(group_codes, np.uint8)
        for piece in group.slices:
            target = maps[piece.weight]
            shape = [1] * target.ndim
            shape[piece.axis] = -1
            repeat = piece.indices.size // group.size
            along = np.tile(group_codes, repeat).reshape(shape)
            index = [slice(None)] * target.ndim
            index[piece.axis] = piece.indices
            target[tuple(index)] = np.maximum(target[tuple(index)], along)
    return maps


def out_slices(
    flags: Sequence[np.ndarray], groups: Sequence[GroupLayout], shapes
) -> list[np.ndarray]:
    """Per prunable weight, True on the "out" slices of the flagged channels.

    A channel's "out" slices (its filter, bias, normalization parameters,
    depthwise filter) are what it computes from; its "in" slices, where
    other layers read it, are not included.

    Args:
        flags: one boolean array per group of `groups`.
        groups: the layout of the unpinned groups.
        shapes: the prunable weights' shapes.
    """
    masks = [np.zeros(shape, bool) for shape in shapes]
    for group, group_flags in zip(groups, flags):
        group_flags = np.asarray(group_flags, bool)
        for piece in group.slices:
            if piece.role != "out":
                continue
            target = masks[piece.weight]
            index = [slice(None)] * target.ndim
            index[piece.axis] = piece.indices[
                np.tile(group_flags, piece.indices.size // group.size)
            ]
            target[tuple(index)] = True
    return masks


def channel_codes(
    level_maps: Sequence[np.ndarray], groups: Sequence[GroupLayout]
) -> list[np.ndarray]:
    """Each group's channel codes: the smallest code over each channel's slices.

    The inverse of `element_codes` while every group has a channel of code
    0 (see the module docstring).
    """
    result = []
    for group in groups:
        codes = np.full(group.size, levels.UNUSED, np.uint8)
        for piece in group.slices:
            entries = _per_channel(
                np.asarray(level_maps[piece.weight]), piece, group.size
            )
            if entries.shape[1]:
                codes = np.minimum(codes, entries.min(axis=1))
        result.append(codes)
    return result


def channel_scores(
    scores: Sequence[np.ndarray], groups: Sequence[GroupLayout], norm: str = "l2"
) -> list[np.ndarray]:
    """Each channel's score: the mean (`"l1"`) or root mean square (`"l2"`) of
    the elementwise `scores` over its "out" slices.

    Args:
        scores: one float array per prunable weight (the sparsifier's
            elementwise scores, highest kept).
        groups: the layout of the unpinned groups.
        norm: `"l1"` or `"l2"`.

    Returns:
        One float64 array of channel scores per group.

    Example:
        >>> g = GroupLayout(0, 2, (Slice(0, 1, np.arange(2), "out"),), "dense")
        >>> channel_scores([np.array([[3.0, 1.0], [4.0, 1.0]])], [g])[0].tolist()
        [3.5355339059327378, 1.0]
    """
    if norm not in CHANNEL_NORMS:
        raise ValueError(
            f"channel_norm must be one of {CHANNEL_NORMS}. Received: channel_norm="
            f"{norm!r}"
        )
    result = []
    for group in groups:
        total = np.zeros(group.size)
        count = 0
        for piece in group.slices:
            if piece.role != "out":
                continue
            entries = _per_channel(
                np.asarray(scores[piece.weight], np.float64), piece, group.size
            )
            total += (np.abs(entries) if norm == "l1" else entries**2).sum(axis=1)
            count += entries.shape[1]
        mean = total / max(count, 1)
        result.append(mean if norm == "l1" else np.sqrt(mean))
    return result


def keep_channels(
    scores: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    frozen: Sequence[np.ndarray],
    sparsity: float,
    *,
    selection: str = "per_layer",
) -> list[np.ndarray]:
    """The kept channels of every group for a level of `sparsity`.

    As `selection.keep_sets` over channels (frozen channels are kept and
    count towards the budget), except that every group keeps at least one
    channel: under global selection, a group with neither a frozen channel
    nor one in the global top keeps its best candidate, out of the same
    budget.

    Returns:
        One boolean array per group, True for a kept channel.
    """
    kept = selection_lib.keep_sets(
        scores, candidates, frozen, sparsity, selection=selection
    )
    if all(k.any() for k in kept):
        return kept
    if selection == "per_layer":
        return kept  # the level targets were checked to keep a channel per group
    # Reserve each empty group's best candidate, then rank the rest globally.
    reserved = []
    for s, c, f, k in zip(scores, candidates, frozen, kept):
        r = np.zeros(np.shape(s), bool)
        free = np.asarray(c, bool) & ~np.asarray(f, bool)
        if not k.any() and free.any():
            r[np.flatnonzero(free)[np.argmax(np.asarray(s)[free])]] = True
        reserved.append(r)
    kept = selection_lib.keep_sets(
        scores,
        [np.asarray(c, bool) & ~r for c, r in zip(candidates, reserved)],
        [np.asarray(f, bool) | r for f, r in zip(frozen, reserved)],
        sparsity,
        selection=selection,
    )
    return kept


def check_targets(
    groups: Sequence[GroupLayout], sparsities: Sequence[float], selection: str
) -> None:
    """Raises a ValueError when a level's target would empty a group.

    Per layer, each group keeps `round((1 - s) * size)` channels, which must
    be at least 1; globally, the budget must hold one channel per group.
    """
    for s in sparsities:
        if selection == "per_layer":
            for group in groups:
                if levels.keep_count(group.size, s) < 1:
                    raise ValueError(
                        f"A level of sparsity {s} removes every channel of layer "
                        f"{group.layer!r} ({group.size} channels, per-layer "
                        "selection); a group keeps at least one channel. Received: "
                        f"sparsities={list(sparsities)}"
                    )
        else:
            total = sum(group.size for group in groups)
            if levels.keep_count(total, s) < len(groups):
                raise ValueError(
                    f"A level of sparsity {s} keeps {levels.keep_count(total, s)} "
                    f"of {total} channels, fewer than the {len(groups)} channel "
                    f"groups (layer {groups[0].layer!r} and others), each of which "
                    "keeps at least one channel. Received: "
                    f"sparsities={list(sparsities)}"
                )


def check_kept(
    kept, codes, candidates, level: int, sparsity: float, selection: str, name: str
) -> list[np.ndarray]:
    """Checks a sparsifier's kept channels; returns them as bool arrays.

    Args:
        kept: the sparsifier's answer, one array per group.
        codes: the groups' channel codes before the update.
        candidates: the channels the sparsifier could keep.
        level, sparsity, selection: the level being trained, its sparsity
            now and the sparsifier's selection.
        name: the sparsifier's class name, for messages.

    Raises:
        ValueError: for a kept set of the wrong shape, one that drops a frozen
            channel or empties a group, or a total off the level's budget.
    """
    out = selection_lib.checked_sets(
        kept, codes, level, f"{name}.select_channels", "channel"
    )
    for i, k in enumerate(out):
        if not k.any():
            raise ValueError(
                f"{name}.select_channels kept no channel of group {i}; a group "
                "keeps at least one."
            )
    frozen = [levels.frozen_mask_np(c, level) for c in codes]
    want = selection_lib.expected_kept(
        [c.size for c in codes],
        [int(f.sum()) for f in frozen],
        [int((np.asarray(m, bool) & ~f).sum()) for m, f in zip(candidates, frozen)],
        sparsity,
        selection=selection,
    )
    got = sum(int(k.sum()) for k in out)
    if got != want:
        raise ValueError(
            f"{name}.select_channels kept {got} channels; a level of sparsity "
            f"{sparsity} with {selection} selection keeps {want}."
        )
    return out
