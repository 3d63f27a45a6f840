"""Which keras.applications models the channel rules can narrow, and whether
every narrowed copy computes what zeroing the same channels computes.

Torch-Pruning's dependency graph (DepGraph, CVPR 2023), issue 11's anchor,
prunes 81 of 85 torchvision models. This asks the same of elsa_tf's channel
rules (`elsa_tf.channels.channel_groups`) across keras.applications. Each
model is built with `weights=None` (no download), 10 classes, at
`--size`x`--size` inputs (or its default size where it accepts no other),
with logits out (`classifier_activation=None`: a softmax of random weights
is near uniform, and would hide differences) and random weights (`randomize`),
and:

- its channel groups are found: how many, how many are free (not pinned),
  the share of all their channels that are free, and the share of the
  model's parameters that free groups index (the parameters a level can
  remove);
- why the others are pinned, counted by reason (the layer class and what it
  does, without the layer's name);
- a random half of every free group's channels (at least one) is kept, and
  `elsa_tf.physical.narrow` builds the narrower model; on one random input
  (inference mode) its output is compared with the full model's with every
  dropped channel's parameters zeroed, as the largest difference over the
  largest output. The narrowed copy must equal the zeroed model: that is
  what makes a channel level physically smaller without changing it.

A model counts as narrowed when some group is free and the difference is
under `TOLERANCE`. Timings are not measured.

Command used (from the repository root; one model per family by default,
`--models=all` for every model keras.applications has):

    python benchmarks/channel_coverage.py --models=all \
        --out=/tmp/elsa_benchmarks/channel_coverage_all.json

(About 6 minutes on 2 CPU cores; the default 14 families take 77 s.)
"""

from __future__ import annotations

import collections
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _output import write_json  # noqa: E402
from absl import app, flags  # noqa: E402

# One model per family of keras.applications.
FAMILIES = (
    "VGG16",
    "ResNet50",
    "ResNet50V2",
    "Xception",
    "InceptionV3",
    "InceptionResNetV2",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "DenseNet121",
    "NASNetMobile",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "ConvNeXtTiny",
)
# Of the largest output: float32 through a deep network.
TOLERANCE = 1e-4

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(FAMILIES), "keras.applications model names, or 'all'.")
flags.DEFINE_integer("size", 96, "Input height and width.", lower_bound=32)
flags.DEFINE_integer("random_seed", 0, "Seed for the kept channels and the input.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


def all_models() -> list[str]:
    import keras

    return sorted(
        name
        for name in dir(keras.applications)
        if name[0].isupper() and callable(getattr(keras.applications, name))
    )


def build(name: str, size: int):
    """The model at `size`, or at its default size if it accepts no other."""
    import keras

    constructor = getattr(keras.applications, name)
    # Logits: a softmax of random weights is near uniform and hides changes.
    options = {"weights": None, "classes": 10, "classifier_activation": None}
    try:
        return constructor(input_shape=(size, size, 3), **options)
    except ValueError:
        return constructor(**options)


def randomize(model, rng) -> None:
    """Weights away from their initial values, which can hide a difference
    (ConvNeXt's layer scales start at 1e-6, normalization at the identity):
    kernels He-scaled normal, scales and variances in [0.5, 1.5], other
    vectors normal times 0.1."""
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith(("moving_variance", "gamma", "variance")):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) > 1:
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        else:
            value = rng.normal(size=shape) * 0.1
        variable.assign(value.astype(variable.dtype))


def reason_kinds(groups) -> dict[str, int]:
    """Pinned groups by reason, layer names left out."""
    counts = collections.Counter()
    for group in groups:
        for reason in (group.pinned or "").split("; "):
            if reason:
                counts[re.sub(r"'[^']*'", "'…'", reason)] += 1
    return dict(counts.most_common())


def zeroed(model, groups, keep):
    """A copy of `model` with the dropped channels' trainable parameters
    zero (as `tests/physical_test.py` builds it)."""
    import keras

    from elsa_tf import physical

    copy = keras.models.clone_model(model)
    shapes = {v.path: tuple(v.shape) for v in model.weights}
    slices = physical.kept_indices(groups, keep, shapes)
    # By position, as physical.narrow pairs them (clone_model may rename).
    for source, variable in zip(model.weights, copy.weights):
        value = keras.ops.convert_to_numpy(source.value)
        if variable.trainable:
            for axis, kept in slices.get(source.path, {}).items():
                mask = np.zeros(value.shape[axis], bool)
                mask[kept] = True
                shape = [1] * value.ndim
                shape[axis] = -1
                value = value * mask.reshape(shape)
        variable.assign(value)
    return copy


def measure(name: str, size: int, rng) -> dict:
    import keras

    from elsa_tf import channels, physical

    start = time.perf_counter()
    model = build(name, size)
    randomize(model, rng)
    row = {"model": name, "input_shape": list(model.inputs[0].shape[1:])}
    try:
        groups = channels.channel_groups(model)
    except ValueError as e:
        return {**row, "error": str(e), "narrowed": False}
    free = [g for g in groups if g.pinned is None]
    members = {m.path for g in free for m in g.members}
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    indexed = sum(int(np.prod(v.shape)) for v in model.weights if v.path in members)
    keep = {}
    for index, group in enumerate(groups):
        if group.pinned is None:
            mask = rng.random(group.size) < 0.5
            mask[rng.integers(group.size)] = True
            keep[index] = mask
    try:
        small = physical.narrow(model, groups, keep)
    except (ValueError, RuntimeError) as e:  # A finding, not a crash.
        return {**row, "error": f"narrow: {e}", "narrowed": False}
    x = rng.normal(size=(1, *row["input_shape"])).astype("float32")
    want = keras.ops.convert_to_numpy(zeroed(model, groups, keep)(x, training=False))
    got = keras.ops.convert_to_numpy(small(x, training=False))
    full = keras.ops.convert_to_numpy(model(x, training=False))
    scale = max(np.abs(want).max(), 1e-30)
    difference = float(np.abs(got - want).max() / scale)
    # Not vacuous: dropping the channels changes the output.
    change = float(np.abs(full - want).max() / scale)
    return {
        **row,
        "groups": len(groups),
        "free_groups": len(free),
        "free_channel_share": sum(g.size for g in free) / sum(g.size for g in groups),
        "parameters": int(model.count_params()),
        "free_parameter_share": indexed / total,
        "kept_parameter_share": small.count_params() / model.count_params(),
        "relative_difference": difference,
        "relative_change": change,
        "pinned_by": reason_kinds(groups),
        "narrowed": bool(free) and difference < TOLERANCE < change,
        "seconds": time.perf_counter() - start,
    }


def format_table(rows) -> str:
    lines = [
        "| model | input | groups | free | free channels | parameters | "
        "indexed by free groups | kept at half the channels | "
        "narrowed − zeroed | zeroed − full |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | refused: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['model']} | {r['input_shape'][0]} | {r['groups']} | "
            f"{r['free_groups']} | {r['free_channel_share']:.1%} | "
            f"{r['parameters'] / 1e6:.1f} M | {r['free_parameter_share']:.1%} | "
            f"{r['kept_parameter_share']:.1%} | {r['relative_difference']:.1e} | "
            f"{r['relative_change']:.1e} |"
        )
    narrowed = sum(r["narrowed"] for r in rows)
    lines += [
        "",
        "Differences are the largest over the output, of the zeroed model's "
        "largest output.",
        f"Narrowed, equal to zeroing within {TOLERANCE:g} (and zeroing changed "
        f"the output by more): {narrowed} of {len(rows)} models.",
    ]
    reasons = collections.Counter()
    for r in rows:
        for reason, count in r.get("pinned_by", {}).items():
            if not reason.startswith(("model input", "model output")):
                reasons[reason] += count
    if reasons:
        lines += ["", "Groups pinned by a layer, over all models:"]
        lines += [f"- {count} × {reason}" for reason, count in reasons.most_common()]
    return "\n".join(lines)


def main(argv):
    del argv
    names = all_models() if FLAGS.models == ["all"] else FLAGS.models
    rng = np.random.default_rng(FLAGS.random_seed)
    start = time.perf_counter()
    rows = []
    for name in names:
        rows.append(measure(name, FLAGS.size, rng))
        print(f"{name}: done in {rows[-1].get('seconds', 0):.0f} s", flush=True)
    print(format_table(rows))
    print(f"\nTotal time after imports: {time.perf_counter() - start:.0f} s.")
    if FLAGS.out:
        write_json(FLAGS.out, {"size": FLAGS.size, "models": rows})


if __name__ == "__main__":
    app.run(main)
