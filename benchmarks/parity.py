r"""Parity: ELSA's nested levels against one separately pruned model per level.

For every configuration and seed, `elsa_tf.experiments.run.train_and_evaluate`
trains the embedded model (every level `epochs_per_level` epochs, sparsest
first) and, with `baseline="independent"`, one tf_keras model per level
pruned by tfmot's `prune_low_magnitude` with the same architecture, initial
weights, epochs, optimizer and in-level schedule. Both are measured in the
same run. The table gives, per level, the mean +- std test accuracy of each
over the seeds and their difference, then the total training time of each
and the total storage of each: the ELSA bundle (one TFLite file holding every
level) against the sum of the separate models' TFLite files. The goal is a
difference of at most 0.5 points at every level.

ELSA ranks weights within each layer here (`selection="per_layer"`), as
tfmot does, so that the two differ only in nesting and freezing.

Configurations (offline): `digits` (the README's main job: the digits CNN,
five levels) and `mnist1d` (MNIST-1D generated locally, a 1-D CNN narrowed to
a size where sparsity costs accuracy). `fashion_mnist` and `cifar10` run when
tensorflow-datasets finds them in `--data_dir`, and are skipped (and said so)
otherwise.

Commands used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/parity.py --out=benchmarks/parity_results.json

A quick smoke run:

    python benchmarks/parity.py --configs=digits --seeds=0 --epochs_per_level=1
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _configs import CIFAR10_RESNET20, run_configs  # noqa: E402
from _output import write_json  # noqa: E402
from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "configs",
    ["digits", "mnist1d", "fashion_mnist", "cifar10"],
    "Configurations to run; the tensorflow-datasets ones are skipped when "
    "their data is not in --data_dir.",
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run of each per config.")
flags.DEFINE_integer(
    "epochs_per_level", None, "Override every config's epochs per level."
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("workdir", None, "Where runs go (a temporary directory if unset).")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")

# Each configuration: the Config fields that differ from the defaults.
CONFIGS = {
    "digits": {"dataset": "digits"},
    "mnist1d": {
        "dataset": "mnist1d",
        "model": "cnn1d",
        # Half the channels: small enough that sparsity costs accuracy
        # (about 25 points at 90%), so nesting has something to lose.
        "width": 0.5,
        # One copy of the BatchNormalization and bias weights per level: with
        # "freeze", every denser level normalizes with the 90%-sparse level's
        # statistics and scales (see the README's parity section).
        "shared": "per_level",
        "sparsities": (0.9, 0.75, 0.5, 0.0),
        "epochs_per_level": 20,
        "batch_size": 64,
        "learning_rate": 3e-3,
    },
    "fashion_mnist": {
        "dataset": "fashion_mnist",
        "model": "lenet5",
        "sparsities": (0.95, 0.9, 0.75, 0.5, 0.0),
        "epochs_per_level": 10,
        "batch_size": 128,
        "learning_rate": 1e-3,
    },
    "cifar10": CIFAR10_RESNET20,
}
COMMON = {"selection": "per_layer", "baseline": "independent", "export_tflite": True}


def run_config(name: str, seeds, workdir: str, *, epochs=None, data_dir=None) -> dict:
    """Trains ELSA and the baseline for every seed; returns the per-seed reports."""
    from elsa_tf.experiments import run
    from elsa_tf.experiments.config import Config

    fields = {**COMMON, **CONFIGS[name], "data_dir": data_dir}
    if epochs is not None:
        fields["epochs_per_level"] = epochs
    reports = []
    for seed in seeds:
        config = Config(**fields, seed=seed)
        reports.append(
            run.train_and_evaluate(
                config, os.path.join(workdir, f"{name}_seed{seed}"), verbose=0
            )
        )
        print(f"{name} seed {seed}: done", flush=True)
    return {"config": reports[0]["config"], "seeds": list(seeds), "reports": reports}


def summarize(result: dict) -> dict:
    """Mean and std over seeds of every figure the table shows."""
    reports = result["reports"]
    num_levels = len(reports[0]["levels"])

    def stats(values):
        values = np.asarray(values, dtype=np.float64)
        return {"mean": float(values.mean()), "std": float(values.std())}

    levels = []
    for k in range(num_levels):
        rows = [r["levels"][k] for r in reports]
        elsa = [row["accuracy"] for row in rows]
        base = [row["baselines"]["independent"]["accuracy"] for row in rows]
        levels.append(
            {
                "level": k,
                "sparsity": rows[0]["target_sparsity"],
                "elsa_accuracy": stats(elsa),
                "baseline_accuracy": stats(base),
                "difference": stats(np.subtract(elsa, base)),
            }
        )
    seconds = [r["training_seconds"] for r in reports]
    storage = [r["storage_bytes"] for r in reports]
    return {
        "levels": levels,
        "elsa_seconds": stats([s["elsa"] for s in seconds]),
        "baseline_seconds": stats([s["baselines"]["independent"] for s in seconds]),
        "time_ratio": stats(
            [s["elsa"] / s["baselines"]["independent"] for s in seconds]
        ),
        "elsa_bundle_bytes": stats([s["elsa_bundle"] for s in storage]),
        "baseline_bytes": stats([s["baselines"]["independent"] for s in storage]),
        "storage_ratio": stats(
            [s["elsa_bundle"] / s["baselines"]["independent"] for s in storage]
        ),
    }


def format_table(name: str, result: dict) -> str:
    summary = result["summary"]
    config = result["config"]
    pm = "\u00b1"
    lines = [
        f"### {name}: {config['model']} (width {config['width']}), "
        f"{config['epochs_per_level']} epochs per level, seeds {result['seeds']}",
        "",
        "| level | sparsity | ELSA accuracy | independent (tfmot) "
        "| ELSA - independent |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in summary["levels"]:
        e, b, d = row["elsa_accuracy"], row["baseline_accuracy"], row["difference"]
        lines.append(
            f"| {row['level']} | {row['sparsity']:.0%} "
            f"| {100 * e['mean']:.2f} {pm} {100 * e['std']:.2f} "
            f"| {100 * b['mean']:.2f} {pm} {100 * b['std']:.2f} "
            f"| {100 * d['mean']:+.2f} {pm} {100 * d['std']:.2f} |"
        )
    s = summary
    lines += [
        "",
        "| total | ELSA | independent | ratio |",
        "|---|---:|---:|---:|",
        f"| training time (s) | {s['elsa_seconds']['mean']:.1f} "
        f"| {s['baseline_seconds']['mean']:.1f} "
        f"| {s['time_ratio']['mean']:.2f} {pm} {s['time_ratio']['std']:.2f} |",
        f"| storage (KiB): bundle vs sum of models "
        f"| {s['elsa_bundle_bytes']['mean'] / 1024:.1f} "
        f"| {s['baseline_bytes']['mean'] / 1024:.1f} "
        f"| {s['storage_ratio']['mean']:.2f} |",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    seeds = [int(s) for s in FLAGS.seeds]
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="elsa_parity_")
    results = run_configs(
        FLAGS.configs,
        CONFIGS,
        FLAGS.data_dir,
        lambda name: run_config(
            name, seeds, workdir, epochs=FLAGS.epochs_per_level, data_dir=FLAGS.data_dir
        ),
        summarize,
        format_table,
    )
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
