"""Pairing a level's tensors with the densest file's, on graphs small enough
to write by hand (no TensorFlow: this runs on the device environments too)."""

import pytest

from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite._pairing import GraphMismatch, pair_tensors

# Buffer 0 is empty (what activations read); 1 to 3 hold constants.
BUFFERS = tuple(fb.BufferRef(i, 0, 0 if i == 0 else 4) for i in range(4))


def model(buffers_of_tensors, output=-1) -> fb.ModelRef:
    """One subgraph whose tensor `i` reads buffer `buffers_of_tensors[i]`;
    tensor 0 is its input and tensor `output` (the last) its output."""
    tensors = tuple(
        fb.TensorRef(0, i, f"t{i}", 0, (1, 2), buffer, False)
        for i, buffer in enumerate(buffers_of_tensors)
    )
    return fb.ModelRef(BUFFERS, tensors, {}, ((0,),), ((range(len(tensors))[output],),))


def op(index, inputs, outputs, opcode=0) -> fb.OperatorRef:
    return fb.OperatorRef(0, index, opcode, tuple(inputs), tuple(outputs), 0)


# x (t0) + c1 (t1) -> t2; t2 * c2 (t3) -> t4.
DENSE = model([0, 1, 0, 2, 0])
DENSE_OPS = (op(0, [0, 1], [2]), op(1, [2, 3], [4]))


def test_the_same_graph_pairs_every_tensor_with_itself():
    mapping = pair_tensors(DENSE, DENSE, DENSE_OPS, DENSE_OPS)
    assert mapping == {(0, i): i for i in range(5)}


def test_equal_constants_merged_by_the_level_pair_with_one_tensor():
    # The level holds c1 and c2 as one tensor (t1), so it has 4 tensors.
    level = model([0, 1, 0, 0])
    level_ops = (op(0, [0, 1], [2]), op(1, [2, 1], [3]))
    mapping = pair_tensors(DENSE, level, DENSE_OPS, level_ops)
    assert mapping == {(0, 0): 0, (0, 1): 1, (0, 2): 2, (0, 3): 1, (0, 4): 3}


def test_a_tensor_the_level_splits_is_refused():
    # The densest file shares c (t1) between both operators; the level
    # gives each its own constant.
    dense = model([0, 1, 0, 0])
    dense_ops = (op(0, [0, 1], [2]), op(1, [2, 1], [3]))
    with pytest.raises(GraphMismatch, match="tensor 1 of subgraph 0 is the level's"):
        pair_tensors(dense, DENSE, dense_ops, DENSE_OPS)


def test_merged_activations_are_refused():
    level = model([0, 1, 0, 2], output=2)
    level_ops = (op(0, [0, 1], [2]), op(1, [2, 3], [2]))  # t4 became t2
    with pytest.raises(GraphMismatch, match=r"tensors \[2, 4\] of subgraph 0, not all"):
        pair_tensors(DENSE, level, DENSE_OPS, level_ops)


@pytest.mark.parametrize(
    "level_ops, message",
    [
        ((op(0, [0, 1], [2]),), "1 operators against 2"),
        ((op(0, [0, 1], [2]), op(1, [2, 3], [4], opcode=1)), "operator 1 of"),
        ((op(0, [0, 1], [2]), op(1, [2], [4])), "operator 1 of subgraph 0 differs"),
        ((op(0, [0, 1], [2]), op(1, [2, 3], [9])), "the level has no tensor 9"),
        ((op(0, [0, -1], [2]), op(1, [2, 3], [4])), "operator 0 of subgraph 0"),
    ],
)
def test_other_graphs_are_refused(level_ops, message):
    with pytest.raises(GraphMismatch, match=message):
        pair_tensors(DENSE, DENSE, DENSE_OPS, level_ops)


def test_other_inputs_or_outputs_are_refused():
    level = fb.ModelRef(DENSE.buffers, DENSE.tensors, {}, ((0,),), ((4, 2),))
    with pytest.raises(GraphMismatch, match="other inputs or outputs in subgraph 0"):
        pair_tensors(DENSE, level, DENSE_OPS, DENSE_OPS)
    two = fb.ModelRef(DENSE.buffers, DENSE.tensors, {}, ((0,), (0,)), ((4,), (4,)))
    with pytest.raises(GraphMismatch, match="2 subgraphs against 1"):
        pair_tensors(DENSE, two, DENSE_OPS, DENSE_OPS)


def test_an_output_paired_otherwise_by_the_subgraph_is_refused():
    # The operators agree, but the subgraph's output is another tensor.
    level = model([0, 1, 0, 2, 0], output=2)
    with pytest.raises(GraphMismatch, match="tensor 4 of subgraph 0 is the level's"):
        pair_tensors(DENSE, level, DENSE_OPS, DENSE_OPS)
