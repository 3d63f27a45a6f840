r"""Sparsifiers side by side: gradual magnitude pruning and DPF, nested and not.

For every configuration and seed, in one run, with the same architecture,
initial weights, data, epochs, optimizer, in-level schedule, selection and
BatchNormalization re-estimation (`elsa-train`'s defaults otherwise):

* ELSA with gradual magnitude pruning (`sparsifier="gradual_magnitude"`);
* ELSA with Dynamic Pruning with Feedback (`sparsifier="dpf"`);
* each method as independent one-level models trained by elsa_tf
  (`--baseline=independent_elsa`: the paper's own comparison);
* tfmot's `prune_low_magnitude` on tf_keras, one model per level
  (`--baseline=independent`; it ranks weights per layer).

The table gives per level the mean +- std test accuracy over the seeds, the
differences that issue 10's goal is about (ELSA minus the independent models
of the same sparsifier; ELSA minus tfmot), the training time of each, for
DPF the weights it brought back (reactivations), and for ELSA with gradual
magnitude pruning the share of each level's kept weights that are exactly
zero (`summary`'s `zero_share`: capacity held but unused, dead units). Step
time over plain Keras is `benchmarks/training_cost.py`'s figure.

Configurations (offline): `digits` (the main job's digits CNN) and `mnist1d`
(MNIST-1D generated locally, the 1-D CNN at half width). `cifar10` (ResNet-20)
runs when tensorflow-datasets finds it in `--data_dir`, and is skipped (and
said so) otherwise.

Command used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/sparsifiers.py --out=/tmp/elsa_benchmarks/sparsifiers.json

A quick smoke run:

    python benchmarks/sparsifiers.py --configs=digits --seeds=0 --epochs_per_level=1
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _configs import (  # noqa: E402
    CIFAR10_RESNET20,
    DIGITS,
    MNIST1D,
    run_configs_in_temporary_directory,
)
from _output import mean_std, write_json  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["digits", "mnist1d", "cifar10"], "Configurations.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run of each per config.")
flags.DEFINE_integer("epochs_per_level", None, "Override every config's epochs.")
flags.DEFINE_list(
    "carry", [], "Also run DPF with these carry options (zero, feedback)."
)
flags.DEFINE_string("optimizer", None, "Override every config's optimizer.")
flags.DEFINE_float("learning_rate", None, "Override every config's learning rate.")
flags.DEFINE_enum(
    "selection",
    None,
    ["global", "per_layer", "lamp"],
    "Override the selection of ELSA and of its independent models.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")

# Each configuration: the Config fields that differ from elsa-train's defaults.
CONFIGS = {
    "digits": DIGITS,
    "mnist1d": MNIST1D,
    "cifar10": CIFAR10_RESNET20,
}
COMMON = {"export_tflite": False, "augment": False}
# The runs of a seed: (label, sparsifier, baselines trained beside it).
RUNS = (
    ("gradual_magnitude", "gradual_magnitude", ("independent_elsa", "independent")),
    ("dpf", "dpf", ("independent_elsa",)),
)


def _level_summary(workdir: str) -> list[dict]:
    import keras

    import elsa_tf

    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    return elsa_tf.summary(model)


def run_config(
    name, seeds, workdir, *, epochs=None, data_dir=None, carry=(), overrides=None
):
    """Every run of every seed; returns the per-seed figures."""
    from elsa_tf.experiments import run
    from elsa_tf.experiments.config import Config

    fields = {**COMMON, **CONFIGS[name], "data_dir": data_dir}
    if epochs is not None:
        fields["epochs_per_level"] = epochs
    fields.update(overrides or {})
    runs = list(RUNS)
    runs += [(f"dpf_carry_{c}", ("dpf", c), ()) for c in carry]
    out = []
    for seed in seeds:
        per_seed = {}
        for label, sparsifier, baselines in runs:
            directory = os.path.join(workdir, f"{name}_{label}_seed{seed}")
            carry_option = None
            if isinstance(sparsifier, tuple):
                sparsifier, carry_option = sparsifier
            config = Config(
                **fields, seed=seed, sparsifier=sparsifier, baseline=baselines
            )
            if carry_option is None:
                report = run.train_and_evaluate(config, directory, verbose=0)
            else:
                report = _train_with_carry(config, directory, carry_option)
            rows = _level_summary(directory)
            per_seed[label] = {
                "accuracy": [row["accuracy"] for row in report["levels"]],
                "seconds": report["training_seconds"]["elsa"],
                "reactivations": [int(row["reactivations"]) for row in rows],
                # Kept weights that are exactly zero: capacity a level holds
                # but does not use (dead units).
                "zero_share": [float(row["zero_share"]) for row in rows],
                "baselines": {
                    b: {
                        "accuracy": [
                            row["baselines"][b]["accuracy"] for row in report["levels"]
                        ],
                        "seconds": report["training_seconds"]["baselines"][b],
                    }
                    for b in baselines
                },
            }
            print(f"{name} seed {seed} {label}: done", flush=True)
        out.append(per_seed)
    return {
        "fields": {k: v for k, v in fields.items() if k != "data_dir"},
        "sparsities": list(fields["sparsities"]),
        "seeds": list(seeds),
        "runs": out,
    }


def _train_with_carry(config, directory, carry):
    """`run.train_and_evaluate` with a DPF sparsifier of the given carry."""
    from unittest import mock

    import elsa_tf
    from elsa_tf.experiments import run

    real_embed = elsa_tf.embed

    def embed(model, sparsities, **kwargs):
        kwargs["sparsifier"] = elsa_tf.DynamicPruningWithFeedback(
            carry=carry, selection=kwargs.pop("selection")
        )
        return real_embed(model, sparsities, **kwargs)

    with mock.patch.object(run.elsa_tf, "embed", embed):
        return run.train_and_evaluate(config, directory, verbose=0)


def summarize(result: dict) -> dict:
    """Mean and std over seeds of every column of the table."""
    runs = result["runs"]
    num_levels = len(result["sparsities"])
    columns = {}
    for label in runs[0]:
        columns[f"elsa_{label}"] = [r[label]["accuracy"] for r in runs]
        for b in runs[0][label]["baselines"]:
            name = "tfmot" if b == "independent" else f"independent_{label}"
            columns[name] = [r[label]["baselines"][b]["accuracy"] for r in runs]
    levels = []
    for k in range(num_levels):
        row = {"level": k, "sparsity": result["sparsities"][k]}
        for name, values in columns.items():
            row[name] = mean_std([100 * v[k] for v in values])
        for label in ("gradual_magnitude", "dpf"):
            elsa = columns[f"elsa_{label}"]
            for other, name in (
                (f"independent_{label}", "independent"),
                ("tfmot",) * 2,
            ):
                row[f"{label}_vs_{name}"] = mean_std(
                    [100 * (e[k] - o[k]) for e, o in zip(elsa, columns[other])]
                )
        row["dpf_reactivations"] = mean_std(
            [r["dpf"]["reactivations"][k] for r in runs]
        )
        row["gradual_magnitude_zero_share"] = mean_std(
            [
                100 * r["gradual_magnitude"].get("zero_share", [np.nan] * num_levels)[k]
                for r in runs
            ]
        )
        levels.append(row)

    def seconds_of(label, baseline=None):
        return mean_std(
            [
                r[label]["seconds"]
                if baseline is None
                else r[label]["baselines"][baseline]["seconds"]
                for r in runs
            ]
        )

    seconds = {
        "elsa_gradual_magnitude": seconds_of("gradual_magnitude"),
        "elsa_dpf": seconds_of("dpf"),
        "independent_gradual_magnitude": seconds_of(
            "gradual_magnitude", "independent_elsa"
        ),
        "independent_dpf": seconds_of("dpf", "independent_elsa"),
        "tfmot": seconds_of("gradual_magnitude", "independent"),
    }
    return {"levels": levels, "seconds": seconds}


def format_table(name: str, result: dict) -> str:
    pm = "\u00b1"
    s = result["summary"]
    f = result["fields"]

    def cell(x):
        return f"{x['mean']:.2f} {pm} {x['std']:.2f}"

    def diff(x):
        return f"{x['mean']:+.2f} {pm} {x['std']:.2f}"

    carry_cols = [c for c in s["levels"][0] if c.startswith("elsa_dpf_carry_")]
    lines = [
        f"#### {name}: {f.get('model', 'auto')} (width {f.get('width', 1.0)}), "
        f"{f['epochs_per_level']} epochs per level, optimizer "
        f"{f.get('optimizer', 'adam')} (learning rate {f.get('learning_rate', 3e-3)}),"
        f" seeds {result['seeds']}",
        "",
        "| level | sparsity | ELSA gradual | independent gradual | ELSA DPF "
        "| independent DPF | tfmot | ELSA gradual − independent | ELSA DPF − "
        "independent | ELSA gradual − tfmot | ELSA DPF − tfmot | DPF reactivations "
        "| ELSA gradual zero weights (%) "
        + "".join(f"| {c[5:]} " for c in carry_cols)
        + "|",
        "|" + "---:|" * (13 + len(carry_cols)),
    ]
    for r in s["levels"]:
        cells = [cell(r[c]) for c in ("elsa_gradual_magnitude",)]
        cells += [cell(r[c]) for c in ("independent_gradual_magnitude", "elsa_dpf")]
        cells += [cell(r[c]) for c in ("independent_dpf", "tfmot")]
        cells += [
            diff(r[c])
            for c in (
                "gradual_magnitude_vs_independent",
                "dpf_vs_independent",
                "gradual_magnitude_vs_tfmot",
                "dpf_vs_tfmot",
            )
        ]
        cells.append(f"{r['dpf_reactivations']['mean']:.0f}")
        cells.append(f"{r['gradual_magnitude_zero_share']['mean']:.1f}")
        cells += [cell(r[c]) for c in carry_cols]
        lines.append(
            f"| {r['level']} | {r['sparsity']:.0%} | " + " | ".join(cells) + " |"
        )
    t = s["seconds"]
    lines += [
        "",
        "Training time, all levels (s): "
        + ", ".join(f"{k} {v['mean']:.1f}" for k, v in t.items())
        + ".",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    results = run_configs_in_temporary_directory(
        "elsa_sparsifiers_",
        FLAGS.configs,
        CONFIGS,
        FLAGS.data_dir,
        lambda name, workdir: run_config(
            name,
            [int(s) for s in FLAGS.seeds],
            workdir,
            epochs=FLAGS.epochs_per_level,
            data_dir=FLAGS.data_dir,
            carry=FLAGS.carry,
            overrides={
                k: v
                for k, v in (
                    ("optimizer", FLAGS.optimizer),
                    ("learning_rate", FLAGS.learning_rate),
                    ("selection", FLAGS.selection),
                )
                if v is not None
            },
        ),
        summarize,
        format_table,
    )
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
