"""Channel groups as data: which slices of which variables a group's
channels index (`Member`, `ChannelGroup`), and where (`member_indices`).

Pure: NumPy and dataclasses, no Keras objects. `elsa_tf.channels` finds the
groups of a model; `elsa_tf.physical` and `elsa_tf.channel_levels` use them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ROLES = ("out", "in")


@dataclasses.dataclass(frozen=True)
class Member:
    """One slice of one variable, indexed by a group's channels.

    Channel `c` of the group is index `offset + c + j*stride` along `axis`
    of the variable, for `j` in `range(repeat)`: `offset` is a Concatenate's
    position, `stride` and `repeat` a Flatten of `H x W x C` maps (`stride=C`,
    `repeat=H*W`).

    Attributes:
        path: the Keras variable's `.path`.
        axis: the variable's axis that the channels index (non-negative).
        role: "out" for the variables that produce or follow the channel (a
            kernel's output axis, a bias, BatchNormalization's parameters and
            statistics, a depthwise kernel); "in" for a consumer's kernel
            input axis.
        offset: where the group's channels start along `axis`.
        stride: distance between repeats; 0 when `repeat` is 1.
        repeat: how many times the channels recur along `axis`.
    """

    path: str
    axis: int
    role: str
    offset: int = 0
    stride: int = 0
    repeat: int = 1

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(
                f"Member.role must be one of {ROLES}. Received: role={self.role!r} "
                f"(path={self.path!r})"
            )
        if self.axis < 0 or self.offset < 0 or self.stride < 0 or self.repeat < 1:
            raise ValueError(
                "Member needs axis, offset, stride >= 0 and repeat >= 1. Received: "
                f"axis={self.axis}, offset={self.offset}, stride={self.stride}, "
                f"repeat={self.repeat} (path={self.path!r})"
            )
        if self.repeat > 1 and self.stride == 0:
            raise ValueError(
                "A Member that repeats needs a stride. Received: stride=0, "
                f"repeat={self.repeat} (path={self.path!r})"
            )


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or dropped together, everywhere at once.

    Attributes:
        size: the number of channels.
        members: every variable slice the channels index, in graph order.
        layers: the names of the layers whose outputs carry these channels;
            for attention heads, which no output carries, the attention
            layer's.
        pinned: why the width must be kept (a model input or output, a
            `keep_whole` layer, a layer the graph cannot narrow through), or
            None when channels may be dropped.
    """

    size: int
    members: tuple[Member, ...]
    layers: tuple[str, ...]
    pinned: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def member_indices(member: Member, channels) -> np.ndarray:
    """The indices along `member.axis` of the given channels of its group.

    Pure: `offset + c + j*stride` for each `j` in `range(repeat)` (outer) and
    each `c` in `channels` (inner), so sorted channels give sorted indices.

    Args:
        member: a `Member` of a `ChannelGroup`.
        channels: 1-D non-negative integer channel indices.

    Returns:
        An int64 array of `len(channels) * member.repeat` indices.

    Raises:
        ValueError: if `channels` is not 1-D, not integer or has a negative
            entry.

    Example:
        >>> m = Member("dense/kernel", axis=0, role="in", stride=4, repeat=2)
        >>> member_indices(m, [1, 3]).tolist()
        [1, 3, 5, 7]
    """
    array = np.asarray(channels)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "channels must be a 1-D array of integer channel indices. "
            f"Received: channels={channels!r} (path={member.path!r})"
        )
    if array.size and array.min() < 0:
        raise ValueError(
            f"channels must be non-negative. Received: channels={channels!r} "
            f"(path={member.path!r})"
        )
    repeats = np.arange(member.repeat, dtype=np.int64)[:, None] * member.stride
    return (member.offset + array.astype(np.int64)[None, :] + repeats).reshape(-1)
