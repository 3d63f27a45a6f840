"""How long exporting every level takes, against one plain TFLite conversion.

For each model, in one run: the time of one plain conversion of the model
(`model.export` to a SavedModel, then `tf.lite.TFLiteConverter
.from_saved_model`, float32, the path that also takes keras_hub's dict
inputs; the faster of two, one before and one after the exports), and the
time of `elsa_tf.export_tflite` writing every level and the bundle of the same
model embedded at `--sparsities`: by default (dense storage: the densest
level converted once, the others patched from it and checked against Keras),
with its phases, and with `sparse_encoding=True` (each level also traced and
converted with sparse storage, and both forms timed). The ratio of the
default export to one conversion is the figure issue 9 sets a goal for (at
most 2x).

Models in `--per_level_models` get a second row, embedded with
`shared="per_level_statistics"`: each level has its own BatchNormalization
statistics, which the export rewrites into the densest level's file (folded
into the convolutions as the converter folds them) instead of converting
every level; that row also times the export with patching turned off
(every level converted, as before per-level weights were patched).

No training: each level is finished through the library's own machinery
after giving the free weights new random values, as `benchmarks/tflite.py`
does; export time does not depend on how the weights were trained. In
per-level rows every shared weight (and each level's statistics) is drawn at
random too, as training gives them values.

Command used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/export_time.py --out=/tmp/elsa_benchmarks/export_time.json
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _output import write_json  # noqa: E402
from absl import app, flags, logging  # noqa: E402

MODELS = ("digits_cnn", "mobilenet_v2", "bert")

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models: {', '.join(MODELS)}.")
flags.DEFINE_list("sparsities", ["0.9", "0.75", "0.5", "0.0"], "The levels.")
flags.DEFINE_integer("mobilenet_size", 96, "MobileNetV2 input height and width.")
flags.DEFINE_list(
    "per_level_models",
    ["digits_cnn"],
    "Models also exported embedded with shared='per_level_statistics'.",
)
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


def build(name, mobilenet_size=96):
    """A model of the benchmark, freshly initialised, never trained."""
    import keras

    keras.utils.set_random_seed(0)
    if name == "digits_cnn":
        from elsa_tf.experiments import zoo

        return zoo.build("cnn", (8, 8, 1), 10)
    if name == "mobilenet_v2":
        return keras.applications.MobileNetV2(
            input_shape=(mobilenet_size, mobilenet_size, 3),
            alpha=0.35,
            weights=None,
            classes=10,
        )
    if name == "bert":
        import keras_hub

        return keras_hub.models.BertBackbone(
            vocabulary_size=1000,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            intermediate_dim=256,
            max_sequence_length=32,
        )
    raise ValueError(f"models must be among {MODELS}. Received: {name!r}")


def _finish_levels(model, rng):
    """Every level made as training would: fresh free weights, then finished."""
    import keras

    from elsa_tf import model_ops

    owner = model_ops.owner(model)
    for _ in model_ops.sparsities(model):
        for weight, level_map in zip(owner.prunable_weights, owner.level_maps):
            free = level_map.numpy() == owner.current_level
            value = keras.ops.convert_to_numpy(weight.value).copy()
            value[free] = rng.normal(0.0, 0.05, int(free.sum()))
            weight.assign(value)
        model_ops.finish_level(model)


def _shared_values(model, rng):
    """Every shared weight and every level's banked copy drawn as training
    would leave them: normalization scales and variances about 1, the rest
    small, each different."""
    from elsa_tf import model_ops

    owner = model_ops.owner(model)
    for w in [*owner.shared_weights, *owner.banks]:
        shape = tuple(w.shape)
        if w.name.endswith(("gamma", "variance")):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        w.assign(value.astype("float32"))


def _plain_conversion_seconds(model) -> float:
    import tensorflow as tf

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        model.export(directory, format="tf_saved_model", verbose=False)
        tf.lite.TFLiteConverter.from_saved_model(directory).convert()
    return time.perf_counter() - t0


# The functions export_tflite calls, wrapped where it looks them up, and the
# phase each one's time counts for. elsa_tf internals, some private, used only
# to attribute time; one that has moved is skipped, its time under "other".
PHASES = (
    ("elsa_tf.embedding", "extract", "extract"),
    ("elsa_tf.export", "_saved_model", "tracing"),
    ("elsa_tf.export", "_convert", "conversion"),
    ("elsa_tf.export", "_find_buffers", "mapping"),
    ("elsa_tf.export", "_patch", "patching"),
    ("elsa_tf.export", "_verify", "checking"),
    ("elsa_tf.export", "choose_storage", "storage_timing"),
    ("elsa_tf.export", "_bundle", "bundle"),
)


def _timed_phases():
    """Wraps the export's steps to time them; returns (totals, restore)."""
    import importlib

    totals, originals = {}, []

    def wrap(phase, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - t0

        return timed

    for module_name, name, phase in PHASES:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            originals.append((module, name, getattr(module, name)))
            setattr(module, name, wrap(phase, getattr(module, name)))

    def restore():
        for module, name, fn in originals:
            setattr(module, name, fn)

    return totals, restore


def _timed_export(model, *, patching=True, **kwargs):
    """(seconds, manifest, phases) of one export_tflite into a scratch dir;
    without `patching`, every level is converted on its own."""
    import elsa_tf
    from elsa_tf import export

    if not patching:
        mapping = export._find_buffers
        export._find_buffers = lambda *args: (None, "per_level_weights")
    phases, restore = _timed_phases()
    try:
        with tempfile.TemporaryDirectory() as directory:
            t0 = time.perf_counter()
            manifest = elsa_tf.export_tflite(
                model, os.path.join(directory, "x"), **kwargs
            )
            seconds = time.perf_counter() - t0
    finally:
        restore()
        if not patching:
            export._find_buffers = mapping
    phases["other"] = seconds - sum(phases.values())
    return seconds, manifest, phases


def run(
    models=MODELS,
    *,
    sparsities=(0.9, 0.75, 0.5, 0.0),
    mobilenet_size=96,
    per_level_models=("digits_cnn",),
):
    """Export time over one plain conversion, per model, measured in one run."""
    import elsa_tf

    # The first conversion in a process sets up TensorFlow and the converter:
    # done untimed here, so that no model's plain conversion carries it.
    _plain_conversion_seconds(build("digits_cnn"))
    results = {"sparsities": list(sparsities), "models": {}}
    rows = [(name, "freeze") for name in models]
    rows += [(name, "per_level_statistics") for name in per_level_models]
    for name, shared in rows:
        base = build(name, mobilenet_size)
        plain = [_plain_conversion_seconds(base)]
        model = elsa_tf.embed(base, sparsities=list(sparsities), shared=shared)
        _finish_levels(model, np.random.default_rng(0))
        row = {}
        if shared != "freeze":
            _shared_values(model, np.random.default_rng(1))
            row["reconverted_s"] = _timed_export(model, patching=False)[0]
        seconds, manifest, phases = _timed_export(model)
        sparse_seconds, sparse_manifest, sparse_phases = _timed_export(
            model, sparse_encoding=True
        )
        plain.append(_plain_conversion_seconds(base))
        levels = manifest["levels"]
        key = name if shared == "freeze" else f"{name} ({shared})"
        results["models"][key] = {
            **row,
            "shared": shared,
            "params": int(base.count_params()),
            "plain_conversion_s": min(plain),
            "plain_conversions_s": plain,
            "export_s": seconds,
            "ratio": seconds / min(plain),
            "levels": len(levels),
            "patched": sum(r["made_by"] == "patched" for r in levels),
            "patch_fallbacks": [r["patch_fallback"] for r in levels],
            "phases_s": phases,
            "sparse_export_s": sparse_seconds,
            "sparse_ratio": sparse_seconds / min(plain),
            "stored_sparse": sum(
                r["sparse_encoding"] for r in sparse_manifest["levels"]
            ),
            "sparse_phases_s": sparse_phases,
        }
    return results


def format_table(results) -> str:
    lines = [
        f"Levels {results['sparsities']}, float32: export of every level and the "
        "bundle over one plain conversion (SavedModel + TFLiteConverter).",
        "",
        "| model | params | one conversion s | export_tflite s | **ratio** | "
        "levels patched | extract s | tracing s | conversion s | mapping s | "
        "patching s | checking s | bundle s | other s | "
        "sparse_encoding=True s (ratio, stored sparse) | "
        "every level converted s (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        p = r["phases_s"]
        cells = [
            name,
            f"{r['params']:,}",
            f"{r['plain_conversion_s']:.2f}",
            f"{r['export_s']:.2f}",
            f"**{r['ratio']:.2f}**",
            f"{r['patched']} of {r['levels']}",
            *(
                f"{p.get(k, 0):.2f}"
                for k in (
                    "extract",
                    "tracing",
                    "conversion",
                    "mapping",
                    "patching",
                    "checking",
                    "bundle",
                    "other",
                )
            ),
            f"{r['sparse_export_s']:.1f} ({r['sparse_ratio']:.1f}, "
            f"{r['stored_sparse']} of {r['levels']})",
            (
                f"{r['reconverted_s']:.2f} "
                f"({r['reconverted_s'] / r['plain_conversion_s']:.2f})"
                if "reconverted_s" in r
                else "-"
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the converter logs at INFO
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = run(
        FLAGS.models,
        sparsities=[float(s) for s in FLAGS.sparsities],
        mobilenet_size=FLAGS.mobilenet_size,
        per_level_models=FLAGS.per_level_models,
    )
    print(format_table(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
