"""Which tensor of a level's file each tensor of the densest file becomes.

A channel bundle edits the densest file into each level's narrower file
(`elsa_tf.lite.channel_bundle`). The two files are one graph with other
widths, operator for operator, with one exception: the converter stores
equal constants once, so where a level's narrower constants happen to be
equal (a Dense layer's width of 2 beside an axis constant 2), its file has
one tensor where the densest has two. Both of the densest file's tensors
then take that tensor's value, and the level made from the bundle computes
what the level's file computes. The reverse, a level that splits a tensor
the densest file shares, cannot be made in place, and is refused; the
export therefore makes its bundles of a densest file in which each small
integer constant (a shape) has one copy per reader
(`elsa_tf.export_channels.unshare_constants`).

`pair_tensors` finds the pairing by walking both files' operators side by
side (pure: `_flatbuffer` references in, a dict out).
"""

from __future__ import annotations

import collections

from elsa_tf.lite import _flatbuffer as fb


class GraphMismatch(ValueError):
    """The level's file is not the densest file's graph with other widths."""


def pair_tensors(
    dense: fb.ModelRef,
    level: fb.ModelRef,
    dense_ops: tuple[fb.OperatorRef, ...],
    level_ops: tuple[fb.OperatorRef, ...],
) -> dict[tuple[int, int], int]:
    """(subgraph, densest tensor index) -> the level's tensor index.

    Every tensor an operator or a subgraph's inputs and outputs name is
    paired by position; tensors nothing names are left out.

    Raises:
        GraphMismatch: naming the first difference: other operators, other
            inputs or outputs, a densest tensor that is two of the level's
            tensors, or several densest tensors, not all constants, that are
            one of the level's.
    """
    if len(level.inputs) != len(dense.inputs):
        raise GraphMismatch(
            f"{len(level.inputs)} subgraphs against {len(dense.inputs)}"
        )
    pairs = []
    for s, (a, b) in enumerate(zip(level.inputs, dense.inputs)):
        c, d = level.outputs[s], dense.outputs[s]
        if len(a) != len(b) or len(c) != len(d):
            raise GraphMismatch(f"other inputs or outputs in subgraph {s}")
        pairs += [(s, x, y) for x, y in zip(b + d, a + c)]
    if len(level_ops) != len(dense_ops):
        raise GraphMismatch(f"{len(level_ops)} operators against {len(dense_ops)}")
    for a, b in zip(level_ops, dense_ops):
        same = (a.subgraph, a.opcode_index, a.options_type) == (
            b.subgraph,
            b.opcode_index,
            b.options_type,
        )
        names = list(zip(b.inputs + b.outputs, a.inputs + a.outputs))
        if (
            not same
            or (len(a.inputs), len(a.outputs)) != (len(b.inputs), len(b.outputs))
            or any((x < 0) != (y < 0) for x, y in names)
        ):
            raise GraphMismatch(f"operator {b.index} of subgraph {b.subgraph} differs")
        pairs += [(b.subgraph, x, y) for x, y in names if x >= 0]

    level_tensors = {(t.subgraph, t.index) for t in level.tensors}
    mapping: dict[tuple[int, int], int] = {}
    for s, d, ell in pairs:
        if (s, ell) not in level_tensors:
            raise GraphMismatch(f"subgraph {s} of the level has no tensor {ell}")
        if mapping.setdefault((s, d), ell) != ell:
            raise GraphMismatch(
                f"tensor {d} of subgraph {s} is the level's tensors "
                f"{mapping[s, d]} and {ell}"
            )
    merged = collections.defaultdict(list)
    for (s, d), ell in mapping.items():
        merged[s, ell].append(d)
    tensors = {(t.subgraph, t.index): t for t in dense.tensors}
    for (s, ell), ds in merged.items():
        if len(ds) > 1 and not all(
            dense.buffers[tensors[s, d].buffer].size for d in ds
        ):
            raise GraphMismatch(
                f"tensors {sorted(ds)} of subgraph {s}, not all constants, are "
                f"one tensor ({ell}) of the level"
            )
    return mapping
