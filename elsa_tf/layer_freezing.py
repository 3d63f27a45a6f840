"""SpFDE's progressive layer freezing, inside each ELSA level.

Yuan et al. ("Layer Freezing & Data Sieving", NeurIPS 2022) split a network
into blocks, front to back, and from some epoch on freeze one more block
every `interval` epochs until the planned training FLOPs saved reach a
target. A frozen block still runs forward; what is saved is its backward
pass: no gradient is computed through a frozen front block, since nothing in
front of it trains.

Here this happens inside a level and only for its duration: the blocks a
level froze train again at the next level. That is unrelated to ELSA's own,
permanent, freezing of finished levels (`FreezingOptimizer`), which keeps
every finished level's weights exact at all times, whether a block is frozen
or not.

The module has three parts:

* Pure planning (no Keras objects): the FLOPs model (`training_cost`,
  `saving`) and the epoch-by-epoch plan (`plan`, `planned_share`,
  `start_epoch`).
* The block split of a Keras model (`split_blocks`) and the per-block forward
  cost it is planned with.
* `LayerFreezing`, the serializable option `LevelScheduler` takes, and
  `BlockFreezer`, which sets and restores the layers' `trainable` flags.

The FLOPs model, per training example, with `F[i]` block `i`'s forward
multiply-adds: a block's backward pass computes its weight gradient (about
`F[i]`) and the gradient of its input (about `F[i]` again), except the first
block, whose input (the data) needs none. So a step costs
`3 * sum(F) - F[0]`. Freezing the first `n` blocks drops their weight
gradients and every input gradient up to and including block `n`'s (block
`n` now starts the backward pass):
`saving(n) = sum(F[:n]) + sum(F[1:n + 1])`. Elementwise layers
(normalization, activations, pooling, additions) are counted as one
multiply-add per output value, forward and backward alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import keras
import numpy as np

from elsa_tf import _checks, _keras_compat
from elsa_tf import channels as channels_lib

# At most this many blocks in an automatic split. ELSA's levels are a few
# epochs long and at most one block is frozen per epoch once the masks are
# fixed, so finer blocks could not be used; 4 still freezes up to 3/4 of the
# network, past SpFDE's "about 2/3 of the layers".
DEFAULT_MAX_BLOCKS = 4


def check_share(share) -> float:
    """`share` as a float; ValueError naming it unless it is in [0, 1)."""
    return _checks.check_share(share, "layer freezing")


def check_interval(interval) -> int:
    """`interval` as an int; ValueError naming it unless it is an int >= 1."""
    return _checks.check_interval(interval, "layer freezing")


def _check_start(start) -> float | None:
    if start is None:
        return None
    if (
        isinstance(start, bool)
        or not isinstance(start, numbers.Real)
        or not 0.0 <= float(start) <= 1.0
    ):
        raise ValueError(
            "start must be None or a fraction of the level's epochs in [0, 1]. "
            f"Received: start={start!r}"
        )
    return float(start)


def _check_max_blocks(max_blocks) -> int:
    if not _checks.is_int_at_least(max_blocks, 2):
        raise ValueError(
            "max_blocks must be an int of at least 2 (one block always trains). "
            f"Received: max_blocks={max_blocks!r}"
        )
    return int(max_blocks)


def _check_blocks(blocks) -> list[list[str]] | None:
    if blocks is None:
        return None
    message = (
        "blocks must be None or a list of at least two non-empty lists of layer "
        f"names, front to back. Received: blocks={blocks!r}"
    )
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise ValueError(message)
    result = []
    for block in blocks:
        if isinstance(block, (str, bytes)) or not isinstance(block, Sequence):
            raise ValueError(message)
        names = list(block)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(message)
        result.append(names)
    if len(result) < 2:
        raise ValueError(message)
    flat = [n for names in result for n in names]
    repeated = sorted({n for n in flat if flat.count(n) > 1})
    if repeated:
        raise ValueError(
            f"Layers {repeated} appear in more than one block. Received: "
            f"blocks={blocks!r}"
        )
    return result


# -- planning (pure) --------------------------------------------------------------


def training_cost(forward: Sequence[float]) -> float:
    """Multiply-adds of one training step, per example: `3 * sum(F) - F[0]`.

    Args:
        forward: each block's forward multiply-adds, front to back.

    Example:

    >>> training_cost([1.0, 1.0, 1.0, 1.0])
    11.0
    """
    forward = [float(f) for f in forward]
    return 3.0 * sum(forward) - forward[0] if forward else 0.0


def saving(forward: Sequence[float], n: int) -> float:
    """Multiply-adds one step saves with the first `n` blocks frozen.

    Their weight gradients, and every input gradient up to and including the
    first trainable block's: `sum(F[:n]) + sum(F[1:n + 1])`.

    Example:

    >>> saving([1.0, 2.0, 3.0, 4.0], 2)
    8.0
    """
    forward = [float(f) for f in forward]
    return sum(forward[:n]) + sum(forward[1 : n + 1]) if n > 0 else 0.0


def planned_share(forward: Sequence[float], frozen: Sequence[int]) -> float:
    """The share of a level's training multiply-adds saved by a freezing plan.

    Args:
        forward: each block's forward multiply-adds, front to back.
        frozen: the number of front blocks frozen at each epoch of the level.
    """
    total = len(frozen) * training_cost(forward)
    if total <= 0:
        return 0.0
    return sum(saving(forward, n) for n in frozen) / total


def start_epoch(
    epochs: int,
    start: float,
    last_mask_update: int | None,
    steps_per_epoch: int,
) -> int:
    """The first epoch of a level at which a block may be frozen.

    No earlier than `start` of the level's epochs (rounded up), and no earlier
    than the epoch after the one holding the level's last mask update, so
    that a frozen block's masks never change.

    Args:
        epochs: the level's epochs.
        start: fraction of the level's epochs before which nothing freezes.
        last_mask_update: the level's last step (from 0) at which the masks
            update, or None when they never do.
        steps_per_epoch: steps in an epoch.

    Returns:
        An epoch index; `epochs` or more when nothing can freeze.

    Example:

    >>> start_epoch(8, 0.5, last_mask_update=44, steps_per_epoch=10)
    5
    """
    first = math.ceil(start * epochs - 1e-9)
    if last_mask_update is not None:
        first = max(first, last_mask_update // steps_per_epoch + 1)
    return max(first, 0)


def plan(
    forward: Sequence[float],
    epochs: int,
    start: int,
    interval: int,
    share: float,
) -> list[int]:
    """How many front blocks are frozen at each epoch of a level.

    Block `i` (from 0) is frozen from epoch `start + i * interval` to the
    level's end. Blocks are added one at a time until the planned saving
    (`planned_share`) reaches `share`, and only while they can still be
    frozen inside the level; the last block always trains.

    Args:
        forward: each block's forward multiply-adds, front to back.
        epochs: the level's epochs.
        start: the first epoch at which a block may be frozen (`start_epoch`).
        interval: epochs between one block's freezing and the next's.
        share: the target share of the level's training multiply-adds saved.

    Returns:
        `epochs` counts of frozen front blocks, one per epoch.

    Example:

    >>> plan([1.0, 1.0, 1.0, 1.0], epochs=4, start=1, interval=1, share=0.2)
    [0, 1, 2, 2]
    """
    share = check_share(share)
    interval = check_interval(interval)
    freezable = 0
    while freezable < len(forward) - 1 and start + freezable * interval < epochs:
        freezable += 1

    def counts(n):
        return [
            sum(1 for i in range(n) if start + i * interval <= e) for e in range(epochs)
        ]

    for n in range(freezable + 1):
        frozen = counts(n)
        if planned_share(forward, frozen) >= share:
            return frozen
    return counts(freezable)


# -- blocks of a Keras model ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """Consecutive layers that are frozen together.

    Attributes:
        layers: the names of its layers, in the model's order.
        forward: its forward multiply-adds per example (see the module's
            docstring; a parameter count where the model has no graph).
    """

    layers: tuple[str, ...]
    forward: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _has_trainable_weights(layer) -> bool:
    return layer.trainable and any(v.trainable for v in layer.weights)


def _has_trainable_kernel(layer) -> bool:
    return layer.trainable and any(
        v.trainable and len(v.shape) >= 2 for v in layer.weights
    )


def _elements(shape) -> int:
    return int(np.prod([d or 1 for d in shape[1:]], dtype=np.int64))


def _node_cost(node) -> float:
    """Forward multiply-adds of one layer call, per example.

    Each kernel (a weight of rank 2 or more) costs its size once per output
    position (every axis of the output but the batch and the last), which is
    exact for Dense, convolutions and depthwise convolutions; every layer
    also costs one per output value (a bias, a normalization, an activation,
    an embedding lookup). The model's inputs cost nothing.
    """
    outputs = [t for t in node.output_tensors if hasattr(t, "shape")]
    if not outputs or isinstance(node.operation, keras.layers.InputLayer):
        return 0.0
    shape = outputs[0].shape
    cost = float(sum(_elements(t.shape) for t in outputs))
    if isinstance(node.operation, keras.layers.Embedding):
        return cost
    positions = _elements(shape) // max(shape[-1] or 1, 1) if len(shape) > 1 else 1
    for w in node.operation.weights:
        if len(w.shape) >= 2:
            cost += float(np.prod(w.shape)) * positions
    return cost


def _graph_atoms(model) -> list[tuple[list, float]] | None:
    """The graph's layers cut where a single tensor crosses, with their costs.

    None when the model has no graph (subclassed).
    """
    try:
        nodes = channels_lib.graph_nodes(model)  # the one graph walker
    except ValueError:
        return None
    end = len(nodes)
    last_use: dict[int, int] = {}
    produced: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for t in node.output_tensors:
            produced[id(t)] = i
        for t in node.input_tensors:
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
    for t in model.outputs:
        last_use[id(t)] = end
    # crossing[i]: tensors made at or before node i and used after it.
    crossing = np.zeros(end + 1, np.int64)
    for key, p in produced.items():
        if key in last_use and last_use[key] > p:
            crossing[p] += 1
            crossing[last_use[key]] -= 1
    crossing = np.cumsum(crossing)
    segments, current = [], []
    for i, node in enumerate(nodes):
        current.append(node)
        if i < end - 1 and crossing[i] == 1:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    # A layer called in several segments (shared) joins everything between.
    last: dict[int, int] = {}
    for s, segment in enumerate(segments):
        for node in segment:
            last[id(node.operation)] = s
    merged, s = [], 0
    while s < len(segments):
        stop, j = s, s
        while j <= stop:
            stop = max([stop] + [last[id(n.operation)] for n in segments[j]])
            j += 1
        merged.append([n for segment in segments[s : stop + 1] for n in segment])
        s = stop + 1
    atoms = []
    for segment in merged:
        layers, seen = [], set()
        for node in segment:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            layers.append(layer)
        atoms.append((layers, sum(_node_cost(n) for n in segment)))
    return atoms


def _layer_costs(model) -> dict[int, float]:
    """`id(layer)` -> forward cost, from the graph, or parameter counts."""
    try:
        nodes = channels_lib.graph_nodes(model)
    except ValueError:
        return {
            id(layer): float(sum(np.prod(w.shape) for w in layer.weights))
            for layer in _keras_compat.sublayers(model)
        }
    costs: dict[int, float] = {}
    for node in nodes:
        key = id(node.operation)
        costs[key] = costs.get(key, 0.0) + _node_cost(node)
    return costs


def _group(costs: Sequence[float], max_groups: int) -> list[int]:
    """Each item's group: contiguous groups of about equal total cost.

    Item `j` goes to group `floor(G * midpoint_j / total)`, where `midpoint_j`
    is the cost before it plus half its own, renumbered from 0.

    Example:

    >>> _group([1.0, 1.0, 1.0, 1.0, 4.0], 2)
    [0, 0, 0, 0, 1]
    """
    total = float(sum(costs))
    if total <= 0:
        raw = [j * max_groups // len(costs) for j in range(len(costs))]
    else:
        raw, before = [], 0.0
        for c in costs:
            mid = before + c / 2.0
            raw.append(min(int(max_groups * mid / total), max_groups - 1))
            before += c
    renumber = {g: i for i, g in enumerate(sorted(set(raw)))}
    return [renumber[g] for g in raw]


def split_blocks(
    model, blocks=None, max_blocks: int = DEFAULT_MAX_BLOCKS
) -> list[tuple[Block, list]]:
    """Splits a Keras model into blocks, front to back.

    Automatically (`blocks=None`): a Functional or Sequential model's layers
    are cut wherever a single tensor crosses from the layers before to the
    layers after, so a residual block (whose shortcut crosses beside its
    branch) is never cut; a subclassed model's are its top-level sublayers,
    in the order it tracks them (normally the order `__init__` makes them,
    assumed to be the order it calls them). Each piece holding a trainable
    kernel (a weight of rank 2 or more) starts a new piece; the others
    (normalization, activations, pooling) join the piece before them (or the
    first one, when they come first). The pieces are then grouped, in order,
    into at most `max_blocks` blocks of about equal forward cost.

    Args:
        model: the (inner, user's) Keras model.
        blocks: None, or a list of lists of layer names, front to back, to
            use as they are.
        max_blocks: the most blocks an automatic split makes.

    Returns:
        `(Block, layers)` pairs, front to back.

    Raises:
        ValueError: for a name no layer of the model has, a name two layers
            share, a given block without trainable weights, or a model that
            splits into fewer than two blocks with trainable kernels.
    """
    blocks = _check_blocks(blocks)
    max_blocks = _check_max_blocks(max_blocks)
    if blocks is not None:
        return _named_blocks(model, blocks)
    atoms = _graph_atoms(model)
    if atoms is None:
        costs = _layer_costs(model)
        atoms = [([lay], costs[id(lay)]) for lay in _keras_compat.sublayers(model)]
    # A piece with a trainable kernel starts a new piece; the others
    # (normalization, activations, pooling) join the one before them, or the
    # first such piece when they come first.
    pieces: list[tuple[list, float]] = []
    pending, pending_cost = [], 0.0
    for layers, cost in atoms:
        if any(_has_trainable_kernel(layer) for layer in layers):
            pieces.append((pending + layers, pending_cost + cost))
            pending, pending_cost = [], 0.0
        elif pieces:
            before, before_cost = pieces.pop()
            pieces.append((before + layers, before_cost + cost))
        else:
            pending, pending_cost = pending + layers, pending_cost + cost
    if len(pieces) < 2:
        raise ValueError(
            f"Model {model.name!r} splits into {len(pieces)} block(s) with "
            "trainable kernels, too few to freeze any: layer freezing needs at "
            "least two (the last always trains). Pass blocks=[[...], [...]] "
            "with layer names."
        )
    groups = _group([c for _, c in pieces], max_blocks)
    result: list[tuple[list, float]] = []
    for g, (layers, cost) in zip(groups, pieces):
        if g == len(result):
            result.append(([], 0.0))
        merged_layers, merged_cost = result[g]
        result[g] = (merged_layers + layers, merged_cost + cost)
    return [
        (Block(tuple(layer.name for layer in layers), cost), layers)
        for layers, cost in result
    ]


def _named_blocks(model, blocks: list[list[str]]) -> list[tuple[Block, list]]:
    by_name: dict[str, list] = {}
    for layer in _keras_compat.walk(model):
        by_name.setdefault(layer.name, []).append(layer)
    unknown = [n for names in blocks for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"blocks names layers that model {model.name!r} does not have: "
            f"{unknown}. Received: blocks={blocks!r}"
        )
    ambiguous = [n for names in blocks for n in names if len(by_name[n]) > 1]
    if ambiguous:
        raise ValueError(
            f"Several layers of model {model.name!r} are named {ambiguous}; "
            f"name them apart to freeze them. Received: blocks={blocks!r}"
        )
    costs = _layer_costs(model)
    result = []
    for names in blocks:
        layers = [by_name[n][0] for n in names]
        if not any(_has_trainable_weights(layer) for layer in layers):
            raise ValueError(
                f"Block {names} has no trainable weights, so freezing it would "
                f"save nothing. Received: blocks={blocks!r}"
            )
        cost = sum(
            costs.get(id(layer), float(sum(np.prod(w.shape) for w in layer.weights)))
            for layer in layers
        )
        result.append((Block(tuple(names), float(cost)), layers))
    return result


# -- the option and the Keras side ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LevelFreezing:
    """What layer freezing planned and did in one level.

    Attributes:
        level: the level.
        blocks: the blocks, front to back.
        start_epoch: the first epoch a block could freeze at.
        frozen: the number of front blocks frozen at each epoch of the level.
        planned_share: the share of the level's training multiply-adds saved
            by the plan (the FLOPs model of the module's docstring).
        planned_saving: the multiply-adds saved, per training example seen in
            every epoch of the level.
    """

    level: int
    blocks: tuple[Block, ...]
    start_epoch: int
    frozen: tuple[int, ...]
    planned_share: float
    planned_saving: float

    def saved_share(self, n: int) -> float:
        """The share of a training step's multiply-adds saved with the first
        `n` blocks frozen."""
        return planned_share([b.forward for b in self.blocks], [n])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@keras.saving.register_keras_serializable(package="elsa_tf")
class LayerFreezing:
    """SpFDE's progressive layer freezing, inside every level.

    From `start` of a level on, one more front block is frozen every
    `interval` epochs until the planned saving reaches `share` of the level's
    training FLOPs (see `elsa_tf.layer_freezing` for the FLOPs model). A
    frozen block's layers are set non-trainable, so no gradient is computed
    for them or through them, their weights and masks stay fixed, and their
    BatchNormalization layers run in inference mode (as Keras runs a frozen
    one). Every block is released at the level's end: the next level trains
    them all again. Pass it to `LevelScheduler(layer_freezing=...)`.

    Args:
        share: target share of each level's training FLOPs to save, in
            [0, 1); 0.2, the freezing half of SpFDE's "20% + 20%" setting,
            which kept MEST's accuracy at 90% sparsity.
        interval: epochs between one block's freezing and the next's; 1,
            since ELSA's levels are only a few epochs long.
        start: fraction of a level's epochs before which no block freezes,
            or None to start as early as the masks allow. Either way no block
            freezes before the epoch after the level's last mask update (with
            the default `LevelSchedule`, 75% into the level), so that a
            frozen block's masks never change: a sparsifier whose masks update
            until the level's end (an `update_interval`, gates) freezes
            nothing.
        blocks: None to split the model automatically (`split_blocks`), or
            a list of lists of layer names, front to back.
        max_blocks: the most blocks an automatic split makes.

    Raises:
        ValueError: for a share outside [0, 1), an interval below 1, a start
            outside [0, 1], malformed blocks, or max_blocks below 2.

    Example:

    >>> freezing = LayerFreezing(share=0.3, interval=2)
    >>> LayerFreezing.from_config(freezing.get_config()).interval
    2
    """

    def __init__(
        self,
        share: float = 0.2,
        interval: int = 1,
        start: float | None = None,
        blocks: list[list[str]] | None = None,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ):
        self.share = check_share(share)
        self.interval = check_interval(interval)
        self.start = _check_start(start)
        self.blocks = _check_blocks(blocks)
        self.max_blocks = _check_max_blocks(max_blocks)

    def split(self, model) -> list[tuple[Block, list]]:
        """`split_blocks` of `model` with this option's blocks."""
        return split_blocks(model, self.blocks, self.max_blocks)

    def plan_level(
        self,
        blocks: Sequence[Block],
        level: int,
        epochs: int,
        steps_per_epoch: int,
        mask_updates: Sequence[int],
    ) -> LevelFreezing:
        """The plan of one level.

        Args:
            blocks: the model's blocks.
            level: the level.
            epochs: the level's epochs.
            steps_per_epoch: steps in an epoch.
            mask_updates: the steps of the level at which its masks update.
        """
        forward = [b.forward for b in blocks]
        first = start_epoch(
            epochs,
            self.start or 0.0,
            max(mask_updates) if len(mask_updates) else None,
            steps_per_epoch,
        )
        frozen = plan(forward, epochs, first, self.interval, self.share)
        return LevelFreezing(
            level=level,
            blocks=tuple(blocks),
            start_epoch=first,
            frozen=tuple(frozen),
            planned_share=planned_share(forward, frozen),
            planned_saving=sum(saving(forward, n) for n in frozen),
        )

    def get_config(self) -> dict:
        return {
            "share": self.share,
            "interval": self.interval,
            "start": self.start,
            "blocks": self.blocks,
            "max_blocks": self.max_blocks,
        }

    @classmethod
    def from_config(cls, config: dict) -> LayerFreezing:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, LayerFreezing) and self.get_config() == other.get_config()
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"LayerFreezing({args})"


class BlockFreezer:
    """Sets the first blocks of a model non-trainable, and back.

    Each frozen layer's `trainable` flag, its sublayers' and its variables'
    are recorded first and restored exactly on release (`layer.trainable =
    False` sets them all).

    Args:
        blocks: the layers of each block, front to back (`split_blocks`).
    """

    def __init__(self, blocks: Sequence[Sequence]):
        self.blocks = [list(layers) for layers in blocks]
        self.frozen = 0
        self._saved: list[list[tuple]] = []

    def set_frozen(self, n: int) -> bool:
        """Freezes exactly the first `n` blocks. Returns whether that changed
        any flag (then the train function must be rebuilt)."""
        if not 0 <= n < len(self.blocks):
            raise ValueError(
                f"Between 0 and {len(self.blocks) - 1} of {len(self.blocks)} "
                f"blocks can be frozen. Received: n={n!r}"
            )
        changed = n != self.frozen
        while self.frozen > n:
            self._restore(self._saved.pop())
            self.frozen -= 1
        while self.frozen < n:
            self._saved.append(self._freeze(self.blocks[self.frozen]))
            self.frozen += 1
        return changed

    def release(self) -> bool:
        """Unfreezes every block. Returns whether any was frozen."""
        return self.set_frozen(0)

    @staticmethod
    def _freeze(layers) -> list[tuple]:
        saved = []
        for layer in layers:
            inner = [layer, *_keras_compat.walk(layer)]
            saved.append(
                (
                    [(sub, sub.trainable) for sub in inner],
                    [(v, v.trainable) for v in layer.weights],
                )
            )
            layer.trainable = False
        return saved

    @staticmethod
    def _restore(saved: list[tuple]) -> None:
        for flags, variables in reversed(saved):
            # Outer layers first: the setter also sets every sublayer's flag.
            for sub, flag in flags:
                sub.trainable = flag
            for v, flag in variables:
                v.trainable = flag
