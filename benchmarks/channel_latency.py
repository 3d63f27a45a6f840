"""Latency of physically narrower channel levels, against their multiply-adds.

Two models are embedded with `granularity="channel"` (per-layer selection, so
every unpinned channel group of a level keeps the same share of its
channels; default levels keep 25%, 50%, 75% and 100%: sparsities 0.75, 0.5,
0.25, 0.0) and exported with `elsa_tf.export_tflite` (float32), which writes
every level as `extract(model, level, physical=True)` converted on its own:
keras.applications MobileNetV2 (224x224x3, alpha 1.0, 1000 classes, built
with `weights=None`, no download) and the model zoo's CIFAR ResNet-20
(`zoo.build("resnet20", (32, 32, 3), 10)`).

No training: every level is finished on the untrained weights with
`elsa_tf.finish_level`, which keeps each level's share of channels by their
initial magnitudes. Latency depends on how many channels a level keeps, not
on which.

Per level it reports the kept share of channels, the parameter count and
file size (from the export's manifest), the multiply-adds of one example,
counted from the narrowed Keras model's layer shapes (every Conv*D,
DepthwiseConv*D and Dense layer: output positions times kernel size;
BatchNormalization is folded by the converter, and activations, additions,
padding and pooling are not counted), and the median latency of one
`invoke` with `ai_edge_litert` (its default XNNPACK delegate), batch 1, on 1
thread and on all of the machine's cores. From these: the multiply-add
ratio dense/level, the measured speedup dense/level, and speedup over the
multiply-add ratio. The goals of issue 11: the level keeping 50% of the
channels runs at least 2.5x faster than the dense level on one thread, and
every level's speedup is at least 0.8 of its multiply-add ratio.

Reference rows are timed beside each model's levels: the plain model
built narrower by its own width multiplier (`--reference_widths`, by default
0.25, 0.5, 0.75 and 1.0; converted with
`tf.lite.TFLiteConverter.from_keras_model`), with ratios over the dense
level: keras.applications MobileNetV2's `alpha` (which rounds every width to
a multiple of 8) and the zoo's `width` (which rounds to the nearest
integer: ResNet-20 at width 0.5 has the widths of its level keeping 50%).
The project measured MobileNetV2 alpha 0.5 at 2.98x faster than alpha 1.0 on
one thread before.

A line `ms = fixed + per-MAC cost x MACs` is fitted to every row of a model
(levels and plain models, least squares) per thread count. Its fixed part is
what one inference costs whatever the widths (operator dispatch, memory
planning, the ops not counted); a level of MAC ratio `r` cannot beat
`(fixed + c*M) / (fixed + c*M/r) / r` of its ratio however it is narrowed,
and the report gives that bound for the sparsest level.

Latency: all files of a model (its levels and, for MobileNetV2, the
reference rows) are loaded once per thread count, warmed up, and timed in
`--rounds` rounds; every round runs each file for the same number of
consecutive invokes, in an order rotated from round to round, so that all
files see the same machine state. Medians are over all timed invokes.

Command used (from the repository root, 2 CPU cores, no GPU, nothing else
running):

    python benchmarks/channel_latency.py \
        --out=/tmp/elsa_benchmarks/channel_latency.json

A quick smoke run:

    python benchmarks/channel_latency.py --mobilenet_size=64 \
        --latency_budget_s=0.5 --rounds=2
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _counts import multiply_adds  # noqa: E402
from _output import write_json  # noqa: E402
from _timing import interleaved_invoke_ms  # noqa: E402
from absl import app, flags, logging  # noqa: E402

MODELS = ("mobilenet_v2", "resnet20")
LABELS = {"mobilenet_v2": "MobileNetV2", "resnet20": "ResNet-20 (zoo)"}
SPEEDUP_GOAL = 2.5  # For the level keeping half of the channels, on 1 thread.
EFFICIENCY_GOAL = 0.8  # Speedup over multiply-add ratio, every level.

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to measure: {', '.join(MODELS)}.")
flags.DEFINE_list(
    "sparsities", ["0.75", "0.5", "0.25", "0.0"], "Level sparsities (of channels)."
)
flags.DEFINE_enum(
    "selection", "per_layer", ["per_layer", "global"], "embed()'s selection."
)
flags.DEFINE_integer("mobilenet_size", 224, "MobileNetV2 input height and width.")
flags.DEFINE_list(
    "threads", ["1", "all"], "Interpreter thread counts; 'all': every CPU core."
)
flags.DEFINE_float(
    "latency_budget_s", 20.0, "Seconds of timed invokes per model and thread count."
)
flags.DEFINE_integer("rounds", 10, "Interleaved timing rounds.", lower_bound=1)
flags.DEFINE_list(
    "reference_widths",
    ["0.25", "0.5", "0.75", "1.0"],
    "Width multipliers of the plain reference models; empty for none.",
)
flags.DEFINE_integer("random_seed", 0, "Seed for the weights and the input.")
flags.DEFINE_string(
    "export_dir", None, "Keep the exports here; by default a temporary directory."
)
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


# -- models and counts -----------------------------------------------------------------


def build(name, *, mobilenet_size, width=1.0):
    """The plain Keras model `name`, freshly initialised, its widths
    multiplied by `width` (MobileNetV2's `alpha`)."""
    import keras

    if name == "mobilenet_v2":
        size = (mobilenet_size, mobilenet_size, 3)
        # keras.applications warns that no ImageNet weights match other sizes.
        with contextlib.redirect_stderr(io.StringIO()):
            return keras.applications.MobileNetV2(
                weights=None, input_shape=size, alpha=width, classes=1000
            )
    if name == "resnet20":
        from elsa_tf.experiments import zoo

        return zoo.build("resnet20", (32, 32, 3), 10, width=width)
    raise ValueError(f"Unknown model. Expected one of {MODELS}. Received: {name!r}")


def pinned_groups(model) -> list[dict]:
    """The channel groups `channel_groups` keeps whole, and why."""
    from elsa_tf.channels import channel_groups

    return [
        {"size": g.size, "layers": list(g.layers), "pinned": g.pinned}
        for g in channel_groups(model)
        if g.pinned
    ]


def make_levels(base, sparsities, selection):
    """`base` embedded at channel granularity, every level finished on its
    untrained weights."""
    import elsa_tf

    model = elsa_tf.embed(base, sparsities, granularity="channel", selection=selection)
    for _ in sparsities:
        elsa_tf.finish_level(model)
    return model


def convert_plain(model) -> bytes:
    """A plain Keras model through TFLiteConverter, float32."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the signature.
        return bytes(converter.convert())


# -- latency ---------------------------------------------------------------------------


def time_files(contents: dict, x, *, threads, budget_s, rounds) -> dict:
    """Median invoke times (ms) of every file, timed in interleaved rounds."""
    from ai_edge_litert.interpreter import Interpreter

    interpreters = {}
    for key, content in contents.items():
        interpreter = Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreters[key] = interpreter
    return interleaved_invoke_ms(interpreters, budget_s=budget_s, rounds=rounds)


# -- one model -------------------------------------------------------------------------


def run_model(
    name,
    *,
    sparsities,
    selection,
    mobilenet_size,
    threads,
    budget_s,
    rounds,
    reference_widths,
    workdir,
    rng,
) -> dict:
    """Embeds, exports and times one model; returns its rows."""
    import elsa_tf

    base = build(name, mobilenet_size=mobilenet_size)
    start = time.perf_counter()
    model = make_levels(base, sparsities, selection)
    levels_s = time.perf_counter() - start
    out_dir = os.path.join(workdir, name)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        manifest = elsa_tf.export_tflite(model, out_dir, overwrite=True)
    export_s = time.perf_counter() - start
    contents, rows = {}, []
    for row in manifest["levels"]:
        level = row["level"]
        narrowed = elsa_tf.extract(model, level, physical=True)
        with open(os.path.join(out_dir, row["file"]), "rb") as f:
            contents[f"level{level}"] = f.read()
        rows.append(
            {
                "level": level,
                "target_sparsity": row["target_sparsity"],
                "kept_channels": row["kept_channels"],
                "total_channels": row["total_channels"],
                "parameters": row["parameters"],
                "bytes": row["bytes"],
                "multiply_adds": multiply_adds(narrowed),
                "made_by": row["made_by"],
            }
        )
    references = []
    for width in reference_widths:
        plain = build(name, mobilenet_size=mobilenet_size, width=width)
        content = convert_plain(plain)
        contents[f"width{width}"] = content
        references.append(
            {
                "width": width,
                "parameters": int(plain.count_params()),
                "bytes": len(content),
                "multiply_adds": multiply_adds(plain),
            }
        )
    shape = tuple(base.inputs[0].shape[1:])
    x = rng.normal(size=(1, *shape)).astype(np.float32)
    latency = {}
    for n in threads:
        latency[str(n)] = time_files(
            contents, x, threads=n, budget_s=budget_s, rounds=rounds
        )
    # Every ratio is over the dense level (the plain width 1.0 model is the
    # same network, converted without elsa_tf).
    dense = rows[-1]
    keys = [f"level{row['level']}" for row in rows]
    keys += [f"width{ref['width']}" for ref in references]
    for key, row in zip(keys, rows + references):
        row["mac_ratio"] = dense["multiply_adds"] / row["multiply_adds"]
        row["latency"] = {}
        for n, timed in latency.items():
            ms = timed[key]
            speedup = timed[f"level{dense['level']}"]["median_ms"] / ms["median_ms"]
            row["latency"][n] = {
                **ms,
                "speedup": speedup,
                "speedup_over_mac_ratio": speedup / row["mac_ratio"],
            }
    return {
        "label": LABELS[name],
        "input_shape": list(shape),
        "pinned_groups": pinned_groups(base),
        "total_channels": dense["total_channels"],
        "levels": rows,
        "references": references,
        "latency_fit": {n: latency_fit(rows + references, n) for n in latency},
        "levels_s": levels_s,
        "export_s": export_s,
    }


def run(
    models,
    *,
    sparsities,
    selection,
    mobilenet_size,
    threads,
    latency_budget_s,
    rounds,
    reference_widths,
    seed,
    export_dir,
) -> dict:
    """Measures every model; returns a JSON-serializable dict of results.

    Args:
        models: names from `MODELS`.
        sparsities: the levels' sparsities (shares of channels removed).
        selection: `embed`'s selection.
        mobilenet_size: MobileNetV2's input height and width.
        threads: interpreter thread counts.
        latency_budget_s: seconds of timed invokes per model and thread count.
        rounds: interleaved timing rounds.
        reference_widths: width multipliers of the plain reference models.
        seed: seed for the initial weights and the input.
        export_dir: where to keep the exports; None uses a temporary
            directory, removed at the end.
    """
    from importlib.metadata import version

    import keras
    import tensorflow as tf

    config = {
        "models": list(models),
        "sparsities": [float(s) for s in sparsities],
        "selection": selection,
        "mobilenet_size": mobilenet_size,
        "threads": list(threads),
        "latency_budget_s": latency_budget_s,
        "rounds": rounds,
        "reference_widths": list(reference_widths),
        "seed": seed,
        "batch_size": 1,
        "quantization": "float32",
        "multiply_adds": "from the narrowed Keras models' layer shapes: Conv*D, "
        "DepthwiseConv*D and Dense layers only",
    }
    environment = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": version("ai-edge-litert"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    workdir = export_dir or tempfile.mkdtemp(prefix="elsa_channel_latency_")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    try:
        results = {}
        for name in models:
            keras.utils.set_random_seed(seed)
            results[name] = run_model(
                name,
                sparsities=config["sparsities"],
                selection=selection,
                mobilenet_size=mobilenet_size,
                threads=threads,
                budget_s=latency_budget_s,
                rounds=rounds,
                reference_widths=reference_widths,
                workdir=workdir,
                rng=rng,
            )
    finally:
        if export_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": config,
        "environment": environment,
        "models": results,
        "wall_s": time.perf_counter() - start,
    }


# -- tables ----------------------------------------------------------------------------


def latency_fit(rows, threads: str) -> dict:
    """Least squares `ms = fixed_ms + ms_per_mmac * MMACs` over `rows` (the
    levels and the plain models), and, for each row, the efficiency that such
    a fixed cost allows at its MAC count: what no network of that size can
    beat on this runtime, however it is narrowed."""
    macs = np.array([r["multiply_adds"] / 1e6 for r in rows])
    ms = np.array([r["latency"][threads]["median_ms"] for r in rows])
    design = np.stack([np.ones_like(macs), macs], axis=1)
    (fixed, per_mmac), *_ = np.linalg.lstsq(design, ms, rcond=None)
    predicted = design @ [fixed, per_mmac]
    r2 = 1 - np.sum((ms - predicted) ** 2) / np.sum((ms - ms.mean()) ** 2)
    dense = fixed + per_mmac * macs.max()
    bounds = [
        (dense / (fixed + per_mmac * m)) / (macs.max() / m) for m in macs.tolist()
    ]
    return {
        "fixed_ms": float(fixed),
        "ms_per_mmac": float(per_mmac),
        "r2": float(r2),
        "efficiency_bound": [float(b) for b in bounds],
    }


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def format_tables(results) -> str:
    cfg, env = results["config"], results["environment"]
    threads = [str(n) for n in cfg["threads"]]
    lines = [
        f"## Channel levels: TFLite latency against multiply-adds "
        f"(float32, batch 1, ai_edge_litert {env['ai_edge_litert']}, "
        f"{env['cpu_count']} CPU cores, selection={cfg['selection']})",
    ]
    for res in results["models"].values():
        shape = "x".join(map(str, res["input_shape"]))
        lines += [
            "",
            f"### {res['label']} ({shape}), {res['total_channels']:,} channels "
            f"in its unpinned groups",
            "",
            "MACs: multiply-adds of one example (Conv, DepthwiseConv, Dense), "
            "from the narrowed Keras model; ratio = dense / level; "
            "eff. = speedup / MAC ratio.",
            "",
        ]
        header = "| level | channels kept | params | file MB | MMACs | MAC ratio |"
        rule = "|---|---|---|---|---|---|"
        for n in threads:
            header += f" {n}-thread ms | speedup | eff. |"
            rule += "---|---|---|"
        lines += [header, rule]
        multiplier = "alpha" if res["label"].startswith("MobileNetV2") else "width"
        names = [
            (f"{row['level']}", f"{row['kept_channels'] / row['total_channels']:.0%}")
            for row in res["levels"]
        ] + [(f"plain {multiplier}={ref['width']}", "") for ref in res["references"]]
        for (name, kept), row in zip(names, res["levels"] + res["references"]):
            cells = (
                f"| {name} | {kept} | {row['parameters']:,} | "
                f"{row['bytes'] / 1e6:.2f} | {row['multiply_adds'] / 1e6:.1f} | "
                f"{row['mac_ratio']:.2f} |"
            )
            for n in threads:
                t = row["latency"][n]
                cells += (
                    f" {t['median_ms']:.3f} | {t['speedup']:.2f} | "
                    f"{t['speedup_over_mac_ratio']:.2f} |"
                )
            lines.append(cells)
        lines.append("")
        half = [r for r in res["levels"] if abs(r["target_sparsity"] - 0.5) < 1e-9]
        if half and "1" in threads:
            speedup = half[0]["latency"]["1"]["speedup"]
            ok = _mark(speedup >= SPEEDUP_GOAL)
            lines.append(
                f"- Level keeping 50% of the channels, 1 thread: "
                f"{speedup:.2f}x (goal >= {SPEEDUP_GOAL}) {ok}"
            )
        for n in threads:
            worst = min(
                r["latency"][n]["speedup_over_mac_ratio"] for r in res["levels"]
            )
            lines.append(
                f"- Every level's speedup / MAC ratio, {n} thread(s): lowest "
                f"{worst:.2f} (goal >= {EFFICIENCY_GOAL}) "
                f"{_mark(worst >= EFFICIENCY_GOAL)}"
            )
        for n in threads:
            fit = res["latency_fit"][n]
            sparsest = min(res["levels"], key=lambda r: r["multiply_adds"])
            share = fit["fixed_ms"] / sparsest["latency"][n]["median_ms"]
            bound = fit["efficiency_bound"][res["levels"].index(sparsest)]
            lines.append(
                f"- {n} thread(s): latency = {fit['fixed_ms']:.3f} ms + "
                f"{fit['ms_per_mmac'] * 1e3:.2f} us per MMAC fits every row "
                f"(R^2 = {fit['r2']:.3f}); the fixed part is {share:.0%} of the "
                f"sparsest level's time, and limits its eff. to about {bound:.2f}."
            )
        pinned = res["pinned_groups"]
        described = "; ".join(
            f"{g['size']} channels of {', '.join(g['layers'][:3])}"
            f"{', ...' if len(g['layers']) > 3 else ''} ({g['pinned']})"
            for g in pinned
        )
        lines.append(
            f"- Kept whole (pinned) by `channel_groups`: {described or 'nothing'}."
        )
        lines.append(
            f"- Levels made in {res['levels_s']:.1f} s, exported in "
            f"{res['export_s']:.1f} s."
        )
    lines.append("")
    lines.append(f"Total benchmark time after imports: {results['wall_s']:.0f} s.")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        # TensorFlow logs every SavedModel the converter writes at INFO.
        logging.set_verbosity(logging.WARNING)
    threads = []
    for n in FLAGS.threads:
        count = os.cpu_count() if n == "all" else int(n)
        if count not in threads:
            threads.append(count)
    results = run(
        FLAGS.models,
        sparsities=[float(s) for s in FLAGS.sparsities],
        selection=FLAGS.selection,
        mobilenet_size=FLAGS.mobilenet_size,
        threads=threads,
        latency_budget_s=FLAGS.latency_budget_s,
        rounds=FLAGS.rounds,
        reference_widths=[float(w) for w in FLAGS.reference_widths],
        seed=FLAGS.random_seed,
        export_dir=FLAGS.export_dir,
    )
    print(format_tables(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
