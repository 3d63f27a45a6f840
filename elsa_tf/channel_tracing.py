"""Tracing a layer graph into channel groups.

`Tracer`, a union-find over groups, visits each layer call in graph order
(`elsa_tf.channels.channel_groups` drives it), applies the rules of
`elsa_tf.channels`' docstring, and keeps, for every tensor, which group each
position of its last axis belongs to (`Layout`).
"""

from __future__ import annotations

import dataclasses

import keras

from elsa_tf import channel_rules as rules
from elsa_tf.channel_members import ChannelGroup, Member


@dataclasses.dataclass(frozen=True)
class Layout:
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


class Tracer:
    """Union-find over groups, with their members, layers and pin reasons."""

    def __init__(self):
        self._parent: list[int] = []
        self._size: list[int] = []
        self._members: list[dict[Member, int]] = []
        self._layers: list[dict[str, int]] = []
        self._pinned: list[list[str]] = []
        self._clock = 0  # registration order, so merged groups list in graph order
        self._seen: dict[int, tuple[list[Layout], list[Layout]]] = {}
        self._heads: dict[int, Layout] = {}  # attention layer -> its heads

    # -- groups --
    def new(self, size: int, reason: str | None = None) -> Layout:
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._members.append({})
        self._layers.append({})
        self._pinned.append([reason] if reason else [])
        return Layout(((len(self._parent) - 1, 0),), size)

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

    def carry(self, layout: Layout, layer: str) -> None:
        for group, _ in layout.segments:
            self._layers[self.find(group)].setdefault(layer, self._tick())

    def pin(self, layout: Layout, reason: str) -> None:
        for group, _ in layout.segments:
            reasons = self._pinned[self.find(group)]
            if reason not in reasons:
                reasons.append(reason)

    def _shape(self, layout: Layout):
        sizes = tuple((self._size[self.find(g)], o) for g, o in layout.segments)
        return sizes, layout.channels, layout.repeat

    def unify(self, layouts: list[Layout], reason: str) -> Layout:
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
    def visit(self, op, node, inputs: list[Layout]) -> list[Layout]:
        """The layouts of `node`'s outputs, registering its members."""
        if isinstance(op, keras.layers.InputLayer):
            reason = f"model input {op.name!r}"
            return [self.new(rules.width(t), reason) for t in node.outputs]
        why = rules.unsupported(op, node)
        if why is None and rules.is_elementwise(op):
            if len(node.input_tensors) == 1:
                return [inputs[0]]
            return [self._merge(op, node, inputs)]
        if why is None:
            kind = type(op)
            if kind in rules.PRODUCERS or kind in rules.SEPARABLE:
                return [self._produce(op, inputs[0])]
            if kind in rules.FOLLOWERS:
                return [self._follow(op, inputs[0])]
            if kind in rules.PASS_THROUGH:
                if rules.activation(op) in rules.MIXING_ACTIVATIONS:
                    reason = rules.reason(
                        op, f"applies {rules.activation(op)}, mixing channels"
                    )
                    self.pin(inputs[0], reason)
                return [inputs[0]]
            if kind in (keras.layers.Flatten, keras.layers.Reshape):
                width = node.input_tensors[0].shape[-1]
                out = node.outputs[0].shape[-1]
                if out is not None and width and out % width == 0:
                    layout = inputs[0]
                    return [
                        Layout(
                            layout.segments,
                            layout.channels,
                            layout.repeat * out // width,
                        )
                    ]
                why = f"reshapes a last axis of {width} into {out}, not a multiple"
            elif kind in rules.MERGES:
                return [self._merge(op, node, inputs)]
            elif kind in rules.ATTENTION:
                return self._attend(op, node, inputs)
            elif kind is keras.layers.Concatenate:
                layout = self._concatenate(op, node, inputs)
                if layout is not None:
                    return [layout]
                why = "concatenates flattened channels"
        # A layer the rules cannot follow: its inputs and outputs keep their width.
        reason = rules.reason(op, why)
        for layout in inputs:
            self.pin(layout, reason)
        return [self.new(rules.width(t), reason) for t in node.outputs]

    def _shared(self, op, inputs: list[Layout]) -> list[Layout]:
        """The input layouts of a layer with channel-indexed weights: a shared
        layer's calls must agree, since one variable serves them all."""
        if id(op) not in self._seen:
            return inputs
        first = self._seen[id(op)][0]
        return [
            self.unify(
                [a, b], rules.reason(op, "is shared by inputs with different channels")
            )
            for a, b in zip(first, inputs)
        ]

    def _produce(self, op, layout: Layout) -> Layout:
        """A layer that makes new channels from its input's: a Dense layer or
        a convolution reads them with its kernel, a separable convolution
        with its depthwise filters ("out") and its pointwise kernel."""
        (layout,) = self._shared(op, [layout])
        if id(op) in self._seen:
            return self._seen[id(op)][1][0]
        if type(op) in rules.SEPARABLE:
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
        if rules.activation(op) in rules.MIXING_ACTIVATIONS:
            self.pin(
                out,
                rules.reason(op, f"applies {rules.activation(op)}, mixing channels"),
            )
        self._seen[id(op)] = ([layout], [out])
        return out

    def _follow(self, op, layout: Layout) -> Layout:
        (layout,) = self._shared(op, [layout])
        if id(op) not in self._seen:
            if isinstance(op, rules.DEPTHWISE):
                weights = [(op.kernel, len(op.kernel.shape) - 2), (op.bias, 0)]
            else:
                names = ("gamma", "beta", "moving_mean", "moving_variance")
                weights = [(getattr(op, name), 0) for name in names]
            for variable, axis in weights:
                if variable is not None:
                    self.add(layout.members(variable.path, axis, "out"))
            self._seen[id(op)] = ([layout], [layout])
        return layout

    def _attend(self, op, node, inputs: list[Layout]) -> list[Layout]:
        """A MultiHeadAttention call: its heads are a group, its output
        projection produces another (the rule in `elsa_tf.channels`)."""
        by_tensor = {id(t): layout for t, layout in zip(node.input_tensors, inputs)}
        query, value, key = (
            rules.argument(node, position, name)
            for position, name in enumerate(("query", "value", "key"))
        )
        key = value if key is None else key
        projected = [id(query), id(key), id(value)]
        for tensor, layout in zip(node.input_tensors, inputs):
            if id(tensor) not in projected:
                self.pin(layout, rules.reason(op, "takes it as an attention mask"))
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

    def _scores(self, op, node) -> list[Layout]:
        """The attention scores a call returns (none or one tensor), whose
        heads axis pins the layer's heads."""
        if len(node.outputs) == 1:
            return []
        reason = rules.reason(
            op, "returns its attention scores, which have a heads axis"
        )
        self.pin(self._heads[id(op)], reason)
        return [self.new(rules.width(t), reason) for t in node.outputs[1:]]

    def heads(self, op) -> Layout | None:
        """The heads group of an attention layer already visited, or None."""
        return self._heads.get(id(op))

    def _merge(self, op, node, inputs: list[Layout]) -> Layout:
        width = node.outputs[0].shape[-1]
        full = []
        for tensor, layout in zip(node.input_tensors, inputs):
            if tensor.shape[-1] == width:
                full.append(layout)
            else:
                self.pin(
                    layout, rules.reason(op, "broadcasts its input along channels")
                )
        if not full:
            return self.new(width, rules.reason(op, "broadcasts every input"))
        return self.unify(
            full, rules.reason(op, "merges inputs with different channels")
        )

    def _concatenate(self, op, node, inputs: list[Layout]) -> Layout | None:
        rank = len(node.outputs[0].shape)
        if op.axis % rank != rank - 1:
            return self.unify(
                inputs, rules.reason(op, "joins inputs with different channels")
            )
        if any(layout.repeat != 1 for layout in inputs):
            return None
        segments, start = [], 0
        for layout in inputs:
            segments.extend(
                (group, start + offset) for group, offset in layout.segments
            )
            start += layout.channels
        return Layout(tuple(segments), start)
