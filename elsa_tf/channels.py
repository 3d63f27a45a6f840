"""Coupled channel groups of a Keras model, found from its layer graph.

A channel cannot be removed from one variable alone. Dropping filter `c` of a
convolution also drops row `c` of its bias, of the BatchNormalization that
follows it, of the depthwise convolution after that, and the input slice `c`
of every layer that reads it; where a residual addition joins two tensors,
channel `c` of both partners goes at once. DepGraph (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023; Torch-Pruning) finds these
couplings from the traced graph once. `channel_groups` does the same from a
Keras 3 Functional or Sequential model's graph: it walks the layer calls in
order and keeps, for every tensor, which group each position of its last
(channel) axis belongs to. Groups that meet at an elementwise merge are joined
(union-find).

The rules, layer by layer (only the exact classes named here; a subclass may
change `call`, so it is treated as unknown):

- `Dense`, `Conv1D`, `Conv2D`, `Conv3D` (channels_last, `groups=1`) produce a
  new group: the kernel's last axis and the bias ("out"). They consume their
  input's groups on the kernel's input axis ("in").
- `SeparableConv1D` / `SeparableConv2D` (`depth_multiplier=1`) produce a new
  group too, on their pointwise kernel's last axis and bias. Their input's
  channel `c` is their depthwise filter `c` ("out": what the layer computes
  from that channel, so a channel a level opens gets a fresh filter) and
  their pointwise kernel's input row `c` ("in").
- `BatchNormalization` on the last axis, and `DepthwiseConv1D` /
  `DepthwiseConv2D` with `depth_multiplier=1`, follow their input's groups:
  gamma, beta and the moving statistics, or the depthwise kernel's channel
  axis and its bias, join those groups as "out" members.
- Activations that act on each value alone, dropout and noise, pooling,
  padding, cropping, upsampling, `Identity` and a scalar `Rescaling` pass their
  input's groups through unchanged.
- `Add`, `Subtract`, `Multiply`, `Maximum`, `Minimum`, `Average` merge their
  inputs' groups into one: the partners must agree.
- Elementwise Keras operations recorded in the graph (`ELEMENTWISE_OPS`:
  `x + 3.0`, `keras.ops.relu6(x)`) pass their input's groups through when
  they take one tensor (and scalars), and merge them as `Add` does when
  they take several; a constant of more than one value (an argument, or an
  attribute such as `clip`'s bounds) pins them, and so does a division by a
  tensor (a dropped channel is zero). Operations that are infinite at zero,
  or whose gradient is (`log`, negative powers, `sqrt`), are not among them.
- `Concatenate` on the last axis lays its inputs' groups side by side: a
  consumer's member of the second input's group carries that input's offset.
  On any other axis the inputs' groups merge, as at an addition.
- `Flatten`, and a `Reshape` whose last output dimension is a multiple of its
  input's, interleave the channels with positions: of a flattened `H x W x C`
  map, channel `c` is row `c + C*j` of the next Dense kernel, for `j` in
  `range(H*W)` (`stride=C`, `repeat=H*W`).
- `MultiHeadAttention` has two kinds of channel. Its heads are a group of
  their own, of `num_heads` channels: head `h` is index `h` of axis 1 of the
  query, key and value kernels and axis 0 of their biases ("out"), and axis 0
  of the output projection's kernel ("in"). A head whose query, key and value
  weights are zero adds nothing to the output (its values are zero whatever
  its attention), so it is removed as a filter is. Its output projection
  produces a new group, as a `Dense` does; the query, key and value inputs
  are consumed on axis 0 of their kernels. Attention masks keep their width;
  a layer that returns its attention scores keeps all of its heads (the
  scores have a heads axis).

Everything else pins (keeps whole) the groups it touches, with a reason that
names the layer: layers and ops whose channels the rules above cannot follow
(`Lambda`, other attention layers, `LayerNormalization`, transposes, other
reshapes, nested models, a layer with weights it does not
declare, such as attention with `use_gate=True`), channels_first layers, a
softmax activation (it mixes channels), `depth_multiplier > 1`, grouped
convolutions, a merge that broadcasts along channels, and attention with a
multi-axis `output_shape`. Model inputs (their channels are data, never
pruned), model outputs and the outputs of the `keep_whole` layers are pinned
too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np

ROLES = ("out", "in")

# The layers that create channels, and the constructor argument holding their
# width: what `physical.narrow` rewrites.
PRODUCERS: dict[type, str] = {
    keras.layers.Dense: "units",
    keras.layers.Conv1D: "filters",
    keras.layers.Conv2D: "filters",
    keras.layers.Conv3D: "filters",
}

DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

# Depthwise then pointwise in one layer: produce channels from their
# pointwise kernel (`filters`).
SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)

# The layers whose weights follow their input's channels.
FOLLOWERS = (keras.layers.BatchNormalization, *DEPTHWISE)

# Weightless layers that act on every channel alone and keep the last axis.
# Each registry is tested class by class (tests/physical_test.py).
_RANKED = ("MaxPooling", "AveragePooling", "GlobalMaxPooling", "GlobalAveragePooling")
_RANKED += ("ZeroPadding", "Cropping", "UpSampling", "SpatialDropout")
PASS_THROUGH: tuple[type, ...] = tuple(
    getattr(keras.layers, name)
    for name in (
        *("Activation", "ReLU", "LeakyReLU", "ELU", "Identity", "Rescaling"),
        *("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout"),
        "ActivityRegularization",
        *(f"{kind}{rank}D" for kind in _RANKED for rank in (1, 2, 3)),
    )
)

MERGES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Average,
)

# Layers whose heads are a channel group (the rule in the module docstring).
ATTENTION = (keras.layers.MultiHeadAttention,)

# Keras operations (not layers) that a Functional model records where it was
# built with `keras.ops` or Python operators (`x + 3.0` in MobileNetV3's hard
# sigmoid): elementwise, by class name in `keras.ops`' modules.
ELEMENTWISE_OPS = {
    "keras.src.ops.numpy": frozenset(
        {
            *("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum"),
            *("Minimum", "Negative", "Abs", "Absolute", "Square", "Exp", "Tanh"),
            *("Clip", "Sign"),
        }
    ),
    "keras.src.ops.nn": frozenset(
        {
            *("Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSilu", "Silu"),
            *("Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Mish"),
        }
    ),
}

# Layers that rearrange channels: side by side, or interleaved with positions.
RESHAPES = (keras.layers.Concatenate, keras.layers.Flatten, keras.layers.Reshape)

# Activations whose output in one channel depends on the other channels.
_MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax"})


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


def check_keep_whole(keep_whole) -> list[str]:
    """`keep_whole` as a list of layer names.

    Raises:
        ValueError: for a string or a sequence holding anything but names.
    """
    if isinstance(keep_whole, str) or not all(
        isinstance(name, str) for name in keep_whole
    ):
        raise ValueError(
            "keep_whole must be a sequence of layer names. "
            f"Received: keep_whole={keep_whole!r}"
        )
    return list(keep_whole)


def channel_groups(
    model: keras.Model, keep_whole: Sequence[str] = ()
) -> list[ChannelGroup]:
    """The coupled channel groups of a Functional or Sequential model.

    See the module docstring for the rules. Every position of every tensor's
    last axis belongs to exactly one group, so the groups also tell the width
    of each layer's output (but for an attention layer's heads, a group that
    no tensor carries, listed under the layer's name). A `keep_whole`
    attention layer keeps its heads too.

    Args:
        model: a built Keras 3 Functional or Sequential model.
        keep_whole: names of layers whose output width must be kept (for
            example the layers of a residual stream).

    Returns:
        The groups, in the order the graph first produces them.

    Raises:
        ValueError: for a subclassed or unbuilt model, an unknown `keep_whole`
            name, or a model where every group is pinned.

    Example:
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(3, name="hidden")(inputs)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="out")(hidden))
        >>> [(g.size, g.pinned is None) for g in channel_groups(model)]
        [(4, False), (3, True), (2, False)]
    """
    keep_whole = check_keep_whole(keep_whole)
    nodes = _graph_nodes(model)
    names = {node.operation.name for node in nodes}
    unknown = sorted(set(keep_whole) - names)
    if unknown:
        raise ValueError(
            f"keep_whole names layers that model {model.name!r} does not have. "
            f"Received: keep_whole={list(keep_whole)!r}, unknown={unknown}"
        )

    tracer = _Tracer()
    layouts: dict[int, _Layout] = {}
    producers: dict[int, str] = {}
    for node in nodes:
        op = node.operation
        inputs = [layouts[id(t)] for t in node.input_tensors]
        outputs = tracer.visit(op, node, inputs)
        for tensor, layout in zip(node.outputs, outputs):
            layouts[id(tensor)] = layout
            producers[id(tensor)] = op.name
            tracer.carry(layout, op.name)
            if op.name in keep_whole:
                tracer.pin(layout, f"keep_whole layer {op.name!r}")
        if op.name in keep_whole and tracer.heads(op) is not None:
            tracer.pin(tracer.heads(op), f"keep_whole layer {op.name!r}")
    for tensor in model.outputs:
        tracer.pin(layouts[id(tensor)], f"model output {producers[id(tensor)]!r}")

    groups = tracer.groups()
    if all(group.pinned for group in groups):
        reasons = sorted({group.pinned for group in groups})
        raise ValueError(
            f"No layer of model {model.name!r} can be narrowed: every channel "
            f"group is kept whole. Received: {len(groups)} groups, pinned by "
            f"{reasons}"
        )
    return groups


# -- the graph ------------------------------------------------------------------


def _graph_nodes(model) -> list:
    """The layer calls of `model`'s graph, each once, inputs before users.

    Keras 3 has no public API for a Functional model's nodes. This walks the
    same private links `keras.Function` itself walks (`KerasTensor.
    _keras_history`, `Operation._inbound_nodes`), and only here.
    """
    is_graph = isinstance(model, keras.Model)
    try:
        outputs = list(model.outputs) if is_graph else []
    except (AttributeError, ValueError):
        outputs = []
    if not outputs:
        raise ValueError(
            "channel_groups reads the layer graph of a Functional or Sequential "
            f"model built on keras.Input; model {getattr(model, 'name', model)!r} "
            f"({type(model).__name__}) is subclassed or unbuilt and has none. "
            "Rebuild it as a Functional model."
        )

    def node_of(tensor):
        history = tensor._keras_history
        return history.operation._inbound_nodes[history.node_index]

    order, done, stack = [], set(), [(node_of(t), False) for t in outputs]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for tensor in reversed(node.input_tensors):
            parent = node_of(tensor)
            if id(parent) not in done:
                stack.append((parent, False))
    return order


# -- tracing ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What a tensor's last axis holds: groups side by side (`segments`, each
    (group id, offset)), `channels` wide, recurring `repeat` times."""

    segments: tuple[tuple[int, int], ...]
    channels: int
    repeat: int = 1

    def members(self, path: str, axis: int, role: str):
        """(group id, Member) for each segment, on `path`'s `axis`."""
        stride = self.channels if self.repeat > 1 else 0
        return [
            (group, Member(path, axis, role, offset, stride, self.repeat))
            for group, offset in self.segments
        ]


class _Tracer:
    """Union-find over groups, with their members, layers and pin reasons."""

    def __init__(self):
        self._parent: list[int] = []
        self._size: list[int] = []
        self._members: list[dict[Member, int]] = []
        self._layers: list[dict[str, int]] = []
        self._pinned: list[list[str]] = []
        self._clock = 0  # registration order, so merged groups list in graph order
        self._seen: dict[int, tuple[list[_Layout], list[_Layout]]] = {}
        self._heads: dict[int, _Layout] = {}  # attention layer -> its heads

    # -- groups --
    def new(self, size: int, reason: str | None = None) -> _Layout:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._members.append({})
        self._layers.append({})
        self._pinned.append([reason] if reason else [])
        return _Layout(((len(self._parent) - 1, 0),), size)

    def find(self, group: int) -> int:
        while self._parent[group] != group:
            self._parent[group] = self._parent[self._parent[group]]
            group = self._parent[group]
        return group

    def _union(self, a: int, b: int) -> None:
        a, b = sorted((self.find(a), self.find(b)))
        if a == b:
            return
        self._parent[b] = a
        self._members[a].update(self._members[b])
        self._layers[a].update(self._layers[b])
        self._pinned[a].extend(r for r in self._pinned[b] if r not in self._pinned[a])

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def add(self, pairs) -> None:
        for group, member in pairs:
            self._members[self.find(group)].setdefault(member, self._tick())

    def carry(self, layout: _Layout, layer: str) -> None:
        for group, _ in layout.segments:
            self._layers[self.find(group)].setdefault(layer, self._tick())

    def pin(self, layout: _Layout, reason: str) -> None:
        for group, _ in layout.segments:
            reasons = self._pinned[self.find(group)]
            if reason not in reasons:
                reasons.append(reason)

    def _shape(self, layout: _Layout):
        sizes = tuple((self._size[self.find(g)], o) for g, o in layout.segments)
        return sizes, layout.channels, layout.repeat

    def unify(self, layouts: list[_Layout], reason: str) -> _Layout:
        """Merges partners position by position; pins them all when their
        layouts differ."""
        first = layouts[0]
        if any(self._shape(x) != self._shape(first) for x in layouts[1:]):
            for layout in layouts:
                self.pin(layout, reason)
            return first
        for layout in layouts[1:]:
            for (a, _), (b, _) in zip(first.segments, layout.segments):
                self._union(a, b)
        return first

    def groups(self) -> list[ChannelGroup]:
        roots = sorted({self.find(g) for g in range(len(self._parent))})
        return [
            ChannelGroup(
                size=self._size[root],
                members=tuple(sorted(self._members[root], key=self._members[root].get)),
                layers=tuple(sorted(self._layers[root], key=self._layers[root].get)),
                pinned="; ".join(self._pinned[root]) or None,
            )
            for root in roots
        ]

    # -- layers --
    def visit(self, op, node, inputs: list[_Layout]) -> list[_Layout]:
        """The layouts of `node`'s outputs, registering its members."""
        if isinstance(op, keras.layers.InputLayer):
            reason = f"model input {op.name!r}"
            return [self.new(_width(t), reason) for t in node.outputs]
        why = _unsupported(op, node)
        if why is None and _is_elementwise(op):
            if len(node.input_tensors) == 1:
                return [inputs[0]]
            return [self._merge(op, node, inputs)]
        if why is None:
            kind = type(op)
            if kind in PRODUCERS or kind in SEPARABLE:
                return [self._produce(op, inputs[0])]
            if kind in FOLLOWERS:
                return [self._follow(op, inputs[0])]
            if kind in PASS_THROUGH:
                if _activation(op) in _MIXING_ACTIVATIONS:
                    reason = _reason(op, f"applies {_activation(op)}, mixing channels")
                    self.pin(inputs[0], reason)
                return [inputs[0]]
            if kind in (keras.layers.Flatten, keras.layers.Reshape):
                width = node.input_tensors[0].shape[-1]
                out = node.outputs[0].shape[-1]
                if out is not None and width and out % width == 0:
                    layout = inputs[0]
                    return [
                        _Layout(
                            layout.segments,
                            layout.channels,
                            layout.repeat * out // width,
                        )
                    ]
                why = f"reshapes a last axis of {width} into {out}, not a multiple"
            elif kind in MERGES:
                return [self._merge(op, node, inputs)]
            elif kind in ATTENTION:
                return self._attend(op, node, inputs)
            elif kind is keras.layers.Concatenate:
                layout = self._concatenate(op, node, inputs)
                if layout is not None:
                    return [layout]
                why = "concatenates flattened channels"
        # A layer the rules cannot follow: its inputs and outputs keep their width.
        reason = _reason(op, why)
        for layout in inputs:
            self.pin(layout, reason)
        return [self.new(_width(t), reason) for t in node.outputs]

    def _shared(self, op, inputs: list[_Layout]) -> list[_Layout]:
        """The input layouts of a layer with channel-indexed weights: a shared
        layer's calls must agree, since one variable serves them all."""
        if id(op) not in self._seen:
            return inputs
        first = self._seen[id(op)][0]
        return [
            self.unify(
                [a, b], _reason(op, "is shared by inputs with different channels")
            )
            for a, b in zip(first, inputs)
        ]

    def _produce(self, op, layout: _Layout) -> _Layout:
        """A layer that makes new channels from its input's: a Dense layer or
        a convolution reads them with its kernel, a separable convolution
        with its depthwise filters ("out") and its pointwise kernel."""
        (layout,) = self._shared(op, [layout])
        if id(op) in self._seen:
            return self._seen[id(op)][1][0]
        if type(op) in SEPARABLE:
            kernel = op.pointwise_kernel
            reads = [(op.depthwise_kernel, "out"), (kernel, "in")]
        else:
            kernel = op.kernel
            reads = [(kernel, "in")]
        for variable, role in reads:
            self.add(layout.members(variable.path, len(variable.shape) - 2, role))
        out = self.new(kernel.shape[-1])
        ((group, _),) = out.segments
        self.add([(group, Member(kernel.path, len(kernel.shape) - 1, "out"))])
        if op.bias is not None:
            self.add([(group, Member(op.bias.path, 0, "out"))])
        if _activation(op) in _MIXING_ACTIVATIONS:
            self.pin(out, _reason(op, f"applies {_activation(op)}, mixing channels"))
        self._seen[id(op)] = ([layout], [out])
        return out

    def _follow(self, op, layout: _Layout) -> _Layout:
        (layout,) = self._shared(op, [layout])
        if id(op) not in self._seen:
            if isinstance(op, DEPTHWISE):
                weights = [(op.kernel, len(op.kernel.shape) - 2), (op.bias, 0)]
            else:
                names = ("gamma", "beta", "moving_mean", "moving_variance")
                weights = [(getattr(op, name), 0) for name in names]
            for variable, axis in weights:
                if variable is not None:
                    self.add(layout.members(variable.path, axis, "out"))
            self._seen[id(op)] = ([layout], [layout])
        return layout

    def _attend(self, op, node, inputs: list[_Layout]) -> list[_Layout]:
        """A MultiHeadAttention call: its heads are a group, its output
        projection produces another (see the module docstring)."""
        by_tensor = {id(t): layout for t, layout in zip(node.input_tensors, inputs)}
        query, value, key = (
            _argument(node, position, name)
            for position, name in enumerate(("query", "value", "key"))
        )
        key = value if key is None else key
        projected = [id(query), id(key), id(value)]
        for tensor, layout in zip(node.input_tensors, inputs):
            if id(tensor) not in projected:
                self.pin(layout, _reason(op, "takes it as an attention mask"))
        layouts = self._shared(op, [by_tensor[i] for i in projected])
        if id(op) in self._seen:
            outputs = self._seen[id(op)][1][:1]
            return outputs + self._scores(op, node)
        heads = self.new(op.num_heads)
        self._heads[id(op)] = heads
        ((head, _),) = heads.segments
        projections = (op.query_dense, op.key_dense, op.value_dense)
        for dense, layout in zip(projections, layouts):
            self.add(layout.members(dense.kernel.path, 0, "in"))
            self.add([(head, Member(dense.kernel.path, 1, "out"))])
            if dense.bias is not None:
                self.add([(head, Member(dense.bias.path, 0, "out"))])
        output = op.output_dense
        self.add([(head, Member(output.kernel.path, 0, "in"))])
        self.carry(heads, op.name)
        out = self.new(output.kernel.shape[-1])
        ((group, _),) = out.segments
        self.add([(group, Member(output.kernel.path, 2, "out"))])
        if output.bias is not None:
            self.add([(group, Member(output.bias.path, 0, "out"))])
        self._seen[id(op)] = (layouts, [out])
        return [out] + self._scores(op, node)

    def _scores(self, op, node) -> list[_Layout]:
        """The attention scores a call returns (none or one tensor), whose
        heads axis pins the layer's heads."""
        if len(node.outputs) == 1:
            return []
        reason = _reason(op, "returns its attention scores, which have a heads axis")
        self.pin(self._heads[id(op)], reason)
        return [self.new(_width(t), reason) for t in node.outputs[1:]]

    def heads(self, op) -> _Layout | None:
        """The heads group of an attention layer already visited, or None."""
        return self._heads.get(id(op))

    def _merge(self, op, node, inputs: list[_Layout]) -> _Layout:
        width = node.outputs[0].shape[-1]
        full = []
        for tensor, layout in zip(node.input_tensors, inputs):
            if tensor.shape[-1] == width:
                full.append(layout)
            else:
                self.pin(layout, _reason(op, "broadcasts its input along channels"))
        if not full:
            return self.new(width, _reason(op, "broadcasts every input"))
        return self.unify(full, _reason(op, "merges inputs with different channels"))

    def _concatenate(self, op, node, inputs: list[_Layout]) -> _Layout | None:
        rank = len(node.outputs[0].shape)
        if op.axis % rank != rank - 1:
            return self.unify(
                inputs, _reason(op, "joins inputs with different channels")
            )
        if any(layout.repeat != 1 for layout in inputs):
            return None
        segments, start = [], 0
        for layout in inputs:
            segments.extend(
                (group, start + offset) for group, offset in layout.segments
            )
            start += layout.channels
        return _Layout(tuple(segments), start)


def _width(tensor) -> int:
    width = tensor.shape[-1] if len(tensor.shape) else 1
    return 1 if width is None else width


def _argument(node, position: int, name: str):
    """The call argument at `position` or named `name` of `node`, or None."""
    args = node.arguments.args
    return args[position] if len(args) > position else node.arguments.kwargs.get(name)


def _reason(op, why: str) -> str:
    return f"layer {op.name!r} ({type(op).__name__}) {why}"


def _activation(op) -> str | None:
    activation = getattr(op, "activation", None)
    return getattr(activation, "__name__", None)


def _declared(op) -> list:
    """The variables a known layer is expected to hold, by attribute."""
    kind = type(op)
    if kind in PRODUCERS or kind in DEPTHWISE:
        return [op.kernel, op.bias]
    if kind in SEPARABLE:
        return [op.depthwise_kernel, op.pointwise_kernel, op.bias]
    if kind is keras.layers.BatchNormalization:
        return [op.gamma, op.beta, op.moving_mean, op.moving_variance]
    if kind in ATTENTION:
        dense = (op.query_dense, op.key_dense, op.value_dense, op.output_dense)
        return [v for layer in dense for v in (layer.kernel, layer.bias)]
    return []


def _is_elementwise(op) -> bool:
    kind = type(op)
    return kind.__name__ in ELEMENTWISE_OPS.get(kind.__module__, ())


def _unsupported(op, node) -> str | None:
    """Why the rules cannot follow `op`'s channels, or None when they can."""
    kind = type(op)
    if _is_elementwise(op):
        arguments = [*node.arguments.args, *node.arguments.kwargs.values()]
        # Python operators keep constants as arguments; `clip`, `leaky_relu`
        # and the like as attributes.
        attributes = [v for k, v in vars(op).items() if not k.startswith("_")]
        constants = [
            a
            for a in keras.tree.flatten([*arguments, *attributes])
            if not isinstance(a, (keras.KerasTensor, str)) and np.size(a) != 1
        ]
        if constants:
            return "applies a constant of more than one value"
        if kind.__name__ in ("Divide", "TrueDivide") and (
            len(node.input_tensors) != 1
            or not isinstance(node.arguments.args[0], keras.KerasTensor)
        ):
            # A dropped channel is zero, and dividing by it is not.
            return "divides by a tensor"
        if any(len(t.shape) < 2 for t in node.input_tensors):
            return "has an input without a channel axis"
        return None
    known = (*PRODUCERS, *SEPARABLE, *FOLLOWERS, *PASS_THROUGH, *MERGES, *RESHAPES)
    known += ATTENTION
    if isinstance(op, keras.Model):
        return "is a nested model, which channel_groups does not look inside"
    if kind not in known:
        return "is not a layer whose channels channel_groups can follow"
    if kind in ATTENTION:
        shape = op.get_config()["output_shape"]
        if shape is not None and np.size(shape) != 1:
            return f"has a multi-axis output_shape={shape!r}"
    elif kind not in MERGES and kind is not keras.layers.Concatenate:
        if len(node.input_tensors) != 1:
            return f"takes {len(node.input_tensors)} tensor inputs"
        if len(node.input_tensors[0].shape) < 2:
            return "has an input without a channel axis"
    if getattr(op, "data_format", "channels_last") != "channels_last":
        return f"has data_format={op.data_format!r}"
    try:
        declared = {id(v) for v in _declared(op) if v is not None}
    except (AttributeError, ValueError):  # a quantized or LoRA kernel, for one
        declared = set()
    held = {id(v) for v in op.weights}
    if held != declared:
        extra = sorted(v.path for v in op.weights if id(v) not in declared)
        return f"holds weights it does not declare: {extra}"
    if getattr(op, "groups", 1) != 1:
        return f"is a grouped convolution (groups={op.groups})"
    if kind in (*DEPTHWISE, *SEPARABLE) and op.depth_multiplier != 1:
        return f"has depth_multiplier={op.depth_multiplier}"
    if kind is keras.layers.BatchNormalization:
        rank = len(node.input_tensors[0].shape)
        if op.axis % rank != rank - 1:
            return f"normalizes axis {op.axis}, not the channel axis"
    if kind is keras.layers.Rescaling:
        if np.size(op.scale) != 1 or np.size(op.offset) != 1:
            return "rescales each channel differently"
    return None
