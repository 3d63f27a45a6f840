"""What freezing front blocks saves in a training step: planned and measured.

An embedded model (`elsa_tf.embed`) is trained as `LevelScheduler` trains it
(a `FreezingOptimizer`, raw training) with its first `n` blocks
(`elsa_tf.layer_freezing.split_blocks`) frozen, for every `n` from 0 to the
number of blocks less one. One train function is traced per `n` (with that
many blocks set non-trainable, as `LevelScheduler` does it); then, round
after round, each takes one `train_on_batch` on the same batch, in a
shuffled order, so that every configuration sees the same machine state.
The figure is the median over rounds of the paired ratio
`step time with n frozen / step time with none`, set beside the FLOPs
model's planned saving `saving(F, n) / training_cost(F)`.

Beside it, the structure: how many convolution gradient ops
(`Conv2DBackpropInput`, `Conv2DBackpropFilter`) and matrix products the
loss's gradient with respect to the trainable variables needs (traced apart,
as `train_step` computes it; see `_gradient_ops`). With the front blocks
frozen, none for them, and none for the first trainable block's input, is
left.

Command used (repository root, 2 CPU cores, no GPU):

    python benchmarks/layer_freezing_cost.py --model=resnet20 --rounds=40
    python benchmarks/layer_freezing_cost.py --model=cnn --batch_size=256 \\
        --rounds=100
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import elsa_tf  # noqa: E402
from elsa_tf import layer_freezing, model_ops  # noqa: E402
from elsa_tf.experiments import zoo  # noqa: E402

_SHAPES = {"cnn": (8, 8, 1), "resnet20": (32, 32, 3), "cnn1d": (40,)}

MODEL = flags.DEFINE_enum("model", "resnet20", list(_SHAPES), "zoo model.")
BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per step.")
ROUNDS = flags.DEFINE_integer("rounds", 40, "Timed rounds (one step of each).")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed rounds first.")
SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def _gradient_ops(model, x, y, loss) -> dict[str, int]:
    """Gradient ops that the returned gradients need, by type.

    The loss's gradient with respect to the trainable variables, traced as a
    `tf.function` apart from the train step. The tape still records the
    frozen blocks' ops (their variables are watched), so the traced graph
    holds their gradient ops too; only those the returned gradients depend
    on (walked back from the function's outputs, as TensorFlow prunes a
    function's dead stateless ops) are counted.
    """
    variables = model.trainable_variables

    @tf.function
    def grads(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, variables)

    graph = grads.get_concrete_function(
        tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype)
    ).graph
    needed, stack = set(), [t.op for t in graph.outputs]
    while stack:
        op = stack.pop()
        if op.name in needed:
            continue
        needed.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    counts = {"conv_backprop_input": 0, "conv_backprop_filter": 0, "matmul": 0}
    for op in graph.get_operations():
        if op.name not in needed:
            continue
        if op.type.startswith("Conv2DBackpropInput"):
            counts["conv_backprop_input"] += 1
        elif op.type.startswith("Conv2DBackpropFilter"):
            counts["conv_backprop_filter"] += 1
        elif op.type in ("MatMul", "BatchMatMulV2"):
            counts["matmul"] += 1
    return counts


def run(name: str, batch_size: int, rounds: int, warmup: int, seed: int):
    """Measures every frozen count: one dict per count, and the blocks."""
    keras.utils.set_random_seed(seed)
    shape = _SHAPES[name]
    model = elsa_tf.embed(zoo.build(name, shape, 10), sparsities=[0.9, 0.0])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=loss)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, *shape)).astype("float32")
    y = rng.integers(0, 10, batch_size)
    # As LevelScheduler trains: raw weights, the optimizer built on them all.
    model_ops.set_raw_training(model, True)
    model.optimizer.build(model.trainable_variables)
    blocks = layer_freezing.split_blocks(model.inner_model)
    forward = [block.forward for block, _ in blocks]
    freezer = layer_freezing.BlockFreezer([layers for _, layers in blocks])
    functions, structure = {}, {}
    with elsa_tf.constraints.internal_training():
        for n in range(len(blocks)):
            freezer.set_frozen(n)
            model.make_train_function(force=True)
            model.train_on_batch(x, y)  # traces with n blocks frozen
            functions[n] = model.train_function
            structure[n] = _gradient_ops(model, x, y, loss)
            freezer.release()
        times = {n: [] for n in functions}
        order = list(functions)
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for n in order:
                model.train_function = functions[n]
                start = time.perf_counter()
                model.train_on_batch(x, y)
                if r >= warmup:
                    times[n].append(time.perf_counter() - start)
    base = np.array(times[0])
    rows = []
    for n in functions:
        ratio = float(np.median(np.array(times[n]) / base))
        rows.append(
            {
                "frozen": n,
                "layers": sum(len(b.layers) for b, _ in blocks[:n]),
                "planned": layer_freezing.saving(forward, n)
                / layer_freezing.training_cost(forward),
                "measured": 1.0 - ratio,
                "ms": 1e3 * float(np.median(times[n])),
                **structure[n],
            }
        )
    return rows, blocks


def main(argv):
    del argv
    rows, blocks = run(MODEL.value, BATCH.value, ROUNDS.value, WARMUP.value, SEED.value)
    print(f"\n{MODEL.value}, batch {BATCH.value}, {ROUNDS.value} rounds\n")
    print("| block | layers | forward multiply-adds / example |")
    print("|---|---|---|")
    for i, (block, _) in enumerate(blocks):
        print(
            f"| {i} | {block.layers[0]} .. {block.layers[-1]} | {block.forward:,.0f} |"
        )
    print()
    print(
        "| frozen blocks | frozen layers | planned step saving | measured step "
        "time saved (median paired) | median step ms | conv grad-input ops | "
        "conv grad-filter ops | matmuls |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['frozen']} | {r['layers']} | {r['planned']:.1%} | "
            f"{r['measured']:.1%} | {r['ms']:.1f} | {r['conv_backprop_input']} | "
            f"{r['conv_backprop_filter']} | {r['matmul']} |"
        )


if __name__ == "__main__":
    app.run(main)
