r"""All levels for half the training: level budgets, data sieving and layer
freezing (issue 12).

For every configuration and seed, in one run, with the same architecture,
initial weights, data, optimizer, sparsifier and BatchNormalization
re-estimation (`elsa-train`'s defaults otherwise, and `--shared`, by default
`per_level_statistics`), ELSA trained with different budgets beside the
independent one-level models that elsa_tf trains for each level
(`--baseline=independent_elsa`, `--epochs` each):

* `full`: `--epochs` for every level (the independent models' epochs);
* `half`: half of them for every level;
* `front_loaded`: `elsa_tf.front_loaded(epochs, levels)`: the sparsest level
  trains as long as an independent model, every later one half as long;
* `front_loaded_halving`: the same with `decay=0.5`: each later level half
  as long as the one before it (half the independent models' epochs in all,
  for 4 levels);
* `front_loaded_freeze`: `front_loaded` under `shared="freeze"` (the
  library's default for single weights), whatever `--shared` says;
* `sieving`: `full`, with SpFDE's circular data sieving (`--sieving_share`
  held out of each epoch, swapped every `--sieving_interval` epochs);
* `front_loaded_sieving`: both;
* `freezing`: `full`, with SpFDE's progressive layer freezing aiming at
  `--freeze_share` of each level's training FLOPs (from where the level's
  masks are final: the last quarter of a level by default);
* `all`: `front_loaded_sieving` with layer freezing;
* an explicit budget, its epochs per level joined by `-` (`6-3-2-4`).

The table gives per level the mean +- std test accuracy over the seeds and
its difference from the independent models, then per method the total
training time of all levels (the run's own clock, saving and validation
excluded) over the independent models' total, the examples trained on over
theirs, and the training FLOPs over theirs: every example costs the same
forward and backward pass in every method, except where layer freezing saves
a share of an epoch's (the share its FLOPs model gives for the blocks
frozen). Issue 12's goal: a method at most 0.5x the independent models'
time, every level within 0.5 points of them.

Configurations (offline): `digits` and `mnist1d`, as in
`benchmarks/sparsifiers.py`; `cifar10` (ResNet-20) runs when
tensorflow-datasets finds it in `--data_dir`.

Command used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/training_budget.py --out=/tmp/elsa_benchmarks/budget.json

A quick smoke run:

    python benchmarks/training_budget.py --configs=digits --seeds=0 --epochs=2 \
        --methods=full,front_loaded
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _configs import (  # noqa: E402
    CIFAR10_RESNET20,
    DIGITS,
    MNIST1D,
    run_configs_in_temporary_directory,
)
from _output import mean_std, write_json  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = (
    "full",
    "half",
    "front_loaded_halving",
    "front_loaded",
    "front_loaded_freeze",
    "sieving",
    "front_loaded_sieving",
    "freezing",
    "all",
)

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["digits", "mnist1d", "cifar10"], "Configurations.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run of each per config.")
flags.DEFINE_list(
    "methods",
    list(METHODS),
    f"ELSA budgets to run, of {METHODS}, or epochs per level joined by '-'.",
)
flags.DEFINE_integer(
    "epochs", None, "Epochs of each independent model (default: the config's)."
)
flags.DEFINE_float("sieving_share", 0.2, "Share held out by data sieving.")
flags.DEFINE_integer("sieving_interval", 1, "Epochs between sieving swaps.")
flags.DEFINE_float(
    "freeze_share", 0.2, "Share of each level's FLOPs layer freezing aims to save."
)
flags.DEFINE_enum(
    "shared",
    "per_level_statistics",
    ["freeze", "per_level_statistics", "per_level"],
    "elsa_tf.embed's shared option, for ELSA and the independent models "
    "(front_loaded_freeze aside). per_level_statistics lets one traced "
    "training step serve every level.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")

CONFIGS = {"digits": DIGITS, "mnist1d": MNIST1D, "cifar10": CIFAR10_RESNET20}
COMMON = {"export_tflite": False, "augment": False}


def _is_budget(method: str) -> bool:
    """Whether `method` is an explicit budget: epochs per level, `6-3-2-4`."""
    return all(part.isdigit() for part in method.split("-"))


def method_fields(
    method, epochs, num_levels, sieving_share, sieving_interval, freeze_share
):
    """The Config fields of one ELSA method."""
    import elsa_tf

    sieving = {"sieving_share": sieving_share, "sieving_interval": sieving_interval}
    front_loaded = {"epochs_per_level": elsa_tf.front_loaded(epochs, num_levels)}
    if _is_budget(method):
        return {"epochs_per_level": [int(e) for e in method.split("-")]}
    fields = {
        "full": {"epochs_per_level": epochs},
        "half": {"epochs_per_level": max(round(epochs / 2), 1)},
        "front_loaded_halving": {
            "epochs_per_level": elsa_tf.front_loaded(epochs, num_levels, decay=0.5)
        },
        "front_loaded": front_loaded,
        "front_loaded_freeze": {**front_loaded, "shared": "freeze"},
        "sieving": {"epochs_per_level": epochs, **sieving},
        "front_loaded_sieving": {**front_loaded, **sieving},
        "freezing": {"epochs_per_level": epochs, "freeze_share": freeze_share},
        "all": {**front_loaded, **sieving, "freeze_share": freeze_share},
    }
    if method not in fields:
        raise app.UsageError(f"Unknown method. Expected one of {METHODS}: {method!r}")
    return fields[method]


def run_config(
    name,
    seeds,
    workdir,
    *,
    methods,
    epochs,
    sieving,
    freeze_share,
    shared=None,
    data_dir=None,
):
    """Every method of every seed; returns the per-seed figures."""
    from elsa_tf.experiments import datasets, run
    from elsa_tf.experiments.config import Config

    fields = {**COMMON, **CONFIGS[name], "data_dir": data_dir, "shared": shared}
    epochs = epochs or fields.pop("epochs_per_level")
    fields.pop("epochs_per_level", None)
    num_levels = len(fields["sparsities"])
    num_train = datasets.load(fields["dataset"], data_dir=data_dir).num_train
    out = []
    for seed in seeds:
        per_seed = {}
        for i, method in enumerate(methods):
            extra = method_fields(method, epochs, num_levels, *sieving, freeze_share)
            # The independent models train once per seed, beside the first.
            baselines = ("independent_elsa",) if i == 0 else ()
            config = Config(**{**fields, **extra}, seed=seed, baseline=baselines)
            directory = os.path.join(workdir, f"{name}_{method}_seed{seed}")
            report = run.train_and_evaluate(config, directory, verbose=0)
            level_epochs = config.level_epochs()
            examples = report.get("examples_per_epoch") or [num_train] * sum(
                level_epochs
            )
            saved = report.get("flops_saved_per_epoch") or [0.0] * len(examples)
            per_seed[method] = {
                "epochs_per_level": level_epochs,
                "accuracy": [row["accuracy"] for row in report["levels"]],
                "seconds": report["training_seconds"]["elsa"],
                "examples": int(sum(examples)),
                # Training FLOPs in examples' worth: layer freezing saves a
                # share of each epoch's.
                "flops": float(sum(n * (1 - f) for n, f in zip(examples, saved))),
            }
            if baselines:
                per_seed["independent"] = {
                    "epochs_per_level": [epochs] * num_levels,
                    "accuracy": [
                        row["baselines"]["independent_elsa"]["accuracy"]
                        for row in report["levels"]
                    ],
                    "seconds": report["training_seconds"]["baselines"][
                        "independent_elsa"
                    ],
                    "examples": epochs * num_levels * num_train,
                    "flops": float(epochs * num_levels * num_train),
                }
            print(f"{name} seed {seed} {method}: done", flush=True)
        out.append(per_seed)
    return {
        "fields": {k: v for k, v in fields.items() if k != "data_dir"},
        "epochs": epochs,
        "sieving": {"share": sieving[0], "interval": sieving[1]},
        "freeze_share": freeze_share,
        "sparsities": list(fields["sparsities"]),
        "seeds": list(seeds),
        "runs": out,
    }


def summarize(result: dict) -> dict:
    """Mean and std over seeds: accuracy per level, and each method's cost
    over the independent models'."""
    runs = result["runs"]
    methods = [m for m in runs[0] if m != "independent"]
    levels = []
    for k, sparsity in enumerate(result["sparsities"]):
        row = {"level": k, "sparsity": sparsity}
        for m in ("independent", *methods):
            row[m] = mean_std([100 * r[m]["accuracy"][k] for r in runs])
        for m in methods:
            row[f"{m}_vs_independent"] = mean_std(
                [
                    100 * (r[m]["accuracy"][k] - r["independent"]["accuracy"][k])
                    for r in runs
                ]
            )
        levels.append(row)
    cost = {}
    for m in ("independent", *methods):
        cost[m] = {
            "epochs_per_level": runs[0][m]["epochs_per_level"],
            "seconds": mean_std([r[m]["seconds"] for r in runs]),
            "time_ratio": mean_std(
                [r[m]["seconds"] / r["independent"]["seconds"] for r in runs]
            ),
            "examples_ratio": mean_std(
                [r[m]["examples"] / r["independent"]["examples"] for r in runs]
            ),
            "flops_ratio": mean_std(
                [
                    r[m].get("flops", r[m]["examples"]) / r["independent"]["examples"]
                    for r in runs
                ]
            ),
        }
    return {"levels": levels, "cost": cost}


def format_table(name: str, result: dict) -> str:
    pm = "\u00b1"
    s = result["summary"]
    f = result["fields"]
    methods = [m for m in s["cost"] if m != "independent"]
    sieve = result["sieving"]
    lines = [
        f"#### {name}: {f.get('model', 'auto')} (width {f.get('width', 1.0)}), "
        f"independent models {result['epochs']} epochs each, data sieving "
        f"{sieve['share']:.0%} every {sieve['interval']} epoch(s), seeds "
        f"{result['seeds']}",
        "",
        "| level | sparsity | independent | "
        + " | ".join(f"{m} | {m} − independent" for m in methods)
        + " |",
        "|" + "---:|" * (3 + 2 * len(methods)),
    ]
    for r in s["levels"]:
        cells = [f"{r['independent']['mean']:.2f} {pm} {r['independent']['std']:.2f}"]
        for m in methods:
            d = r[f"{m}_vs_independent"]
            cells += [
                f"{r[m]['mean']:.2f} {pm} {r[m]['std']:.2f}",
                f"{d['mean']:+.2f} {pm} {d['std']:.2f}",
            ]
        lines.append(
            f"| {r['level']} | {r['sparsity']:.0%} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "| method | epochs per level | training s | time / independent "
        "| examples / independent | training FLOPs / independent "
        "| worst level − independent |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m, c in s["cost"].items():
        worst = (
            "—"
            if m == "independent"
            else f"{min(r[f'{m}_vs_independent']['mean'] for r in s['levels']):+.2f}"
        )
        lines.append(
            f"| {m} | {c['epochs_per_level']} | {c['seconds']['mean']:.1f} | "
            f"{c['time_ratio']['mean']:.2f} {pm} {c['time_ratio']['std']:.2f} | "
            f"{c['examples_ratio']['mean']:.2f} | "
            f"{c['flops_ratio']['mean']:.2f} | {worst} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    methods = list(FLAGS.methods)
    for m in methods:
        if m not in METHODS and not _is_budget(m):
            raise app.UsageError(
                f"--methods takes {METHODS}, or epochs per level joined by "
                f"'-' (6-3-2-4). Received: {m!r}"
            )
    results = run_configs_in_temporary_directory(
        "elsa_budget_",
        FLAGS.configs,
        CONFIGS,
        FLAGS.data_dir,
        lambda name, workdir: run_config(
            name,
            [int(s) for s in FLAGS.seeds],
            workdir,
            methods=methods,
            epochs=FLAGS.epochs,
            sieving=(FLAGS.sieving_share, FLAGS.sieving_interval),
            freeze_share=FLAGS.freeze_share,
            shared=FLAGS.shared,
            data_dir=FLAGS.data_dir,
        ),
        summarize,
        format_table,
    )
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
