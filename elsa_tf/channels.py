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

from collections.abc import Sequence

import keras

from elsa_tf.channel_members import ROLES, ChannelGroup, Member, member_indices
from elsa_tf.channel_rules import (
    ATTENTION,
    DEPTHWISE,
    ELEMENTWISE_OPS,
    FOLLOWERS,
    MERGES,
    PASS_THROUGH,
    PRODUCERS,
    RESHAPES,
    SEPARABLE,
)
from elsa_tf.channel_tracing import Layout, Tracer

__all__ = [
    "ATTENTION",
    "DEPTHWISE",
    "ELEMENTWISE_OPS",
    "FOLLOWERS",
    "MERGES",
    "PASS_THROUGH",
    "PRODUCERS",
    "RESHAPES",
    "ROLES",
    "SEPARABLE",
    "ChannelGroup",
    "Member",
    "channel_groups",
    "check_keep_whole",
    "graph_nodes",
    "member_indices",
]


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
    nodes = graph_nodes(model)
    names = {node.operation.name for node in nodes}
    unknown = sorted(set(keep_whole) - names)
    if unknown:
        raise ValueError(
            f"keep_whole names layers that model {model.name!r} does not have. "
            f"Received: keep_whole={list(keep_whole)!r}, unknown={unknown}"
        )

    tracer = Tracer()
    layouts: dict[int, Layout] = {}
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


def graph_nodes(model) -> list:
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
