r"""Accuracy of channel levels: polarized gates, magnitude, and narrow networks.

Issue 11's accuracy comparison. For every configuration and seed, in one run,
with the same architecture, data, epochs, optimizer, in-level schedule and
BatchNormalization re-estimation (`elsa-train`'s defaults otherwise):

* channel ELSA with polarized gates (`granularity="channel"`,
  `sparsifier="polarized_gates"`, `elsa_tf.PolarizedGates`'s defaults);
* channel ELSA with magnitude channel selection (`granularity="channel"`,
  `sparsifier="gradual_magnitude"`: channels ranked by the root mean square
  of their weights);
* separately trained narrow networks: for every level, the plain network
  with exactly the widths that level keeps (`elsa_tf.extract(model, level,
  physical=True)` of the trained ELSA model, re-initialized with
  `keras.models.clone_model`), trained from scratch for as many epochs as
  one ELSA level, by `elsa_tf.fit` as a single dense level (the same driver,
  optimizer and re-estimation as ELSA; `baseline.train_independent_elsa`
  at sparsity 0). This is what slimmable networks are compared against. All
  narrow networks together train as many epochs as one ELSA run. With
  `--narrow_whole_run`, every narrow network is also trained for as many
  epochs as the whole ELSA run (every level's): ELSA's denser levels have
  trained through the sparser levels before them, so one level's epochs
  undercount what they got.

Both ELSA runs use `--selection` (`per_layer` by default: every unpinned
channel group keeps its share of channels; `global`: one ranking across
groups). A level's sparsity is the share of channels it removes from every
channel group that can be narrowed; the model's inputs and its logits keep
their width. Both runs use elsa_tf's default `shared` for channels
(`per_level_statistics`). Where the two methods keep different widths (only
possible with `global`), each gets narrow networks of its own widths.

Default levels remove 75%, 50%, 30% and 0% of the channels. The 30% level
keeps about half of the multiply-adds, which is where the seed paper (Zhi et
al. 2023) leads users to expect "about 50% of connections removed for under
1 point of accuracy".

Tables per configuration: test accuracy (%) per level, mean +- std over the
seeds, of each method and the differences ELSA minus narrow (paired by
seed); what each level keeps: channels, prunable weights (`summary`'s kept
over total), parameters (all of the narrowed model's, normalization and
biases included) and multiply-adds (Conv, DepthwiseConv and Dense layers of
the narrowed model), each over the full-width model; and each level's
accuracy minus the full-width network's (ELSA's own densest level; for
narrow networks the one trained at full width). Gates still undecided when a
level was hardened (`summary`'s `undecided_gates`) are given per level.

Configurations (offline): `digits` (the main job's digits CNN: conv 16, conv
32, fc 64, with BatchNormalization) and `mnist1d` (MNIST-1D generated
locally, the 1-D CNN at half width), with the epochs, batch size and width
of the other accuracy benchmarks (`benchmarks/_configs.py`). `cifar10`
(ResNet-20) runs when tensorflow-datasets finds it in `--data_dir`, and is
skipped (and said so) otherwise.

Command used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/channel_accuracy.py --narrow_whole_run \
        --out=/tmp/elsa_benchmarks/channel_accuracy.json

A quick smoke run:

    python benchmarks/channel_accuracy.py --configs=digits --seeds=0 \
        --epochs_per_level=1 --sparsities=0.5,0.0
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
from _counts import multiply_adds  # noqa: E402
from _output import mean_std, write_json  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["digits", "mnist1d", "cifar10"], "Configurations.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, one run of each per config.")
flags.DEFINE_list(
    "sparsities",
    ["0.75", "0.5", "0.3", "0.0"],
    "Levels: the share of channels each removes from every unpinned group.",
)
flags.DEFINE_integer(
    "epochs_per_level",
    None,
    "Override every config's epochs per ELSA level (and so per narrow network).",
)
flags.DEFINE_enum(
    "selection", "per_layer", ["per_layer", "global"], "Both ELSA runs' selection."
)
flags.DEFINE_bool(
    "narrow_whole_run",
    False,
    "Also train every narrow network for a whole ELSA run's epochs (every "
    "level's), beside one level's.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")

# The accuracy benchmarks' configurations (benchmarks/_configs.py), with
# channel levels instead of their weight levels (--sparsities).
CONFIGS = {
    name: {k: v for k, v in fields.items() if k != "sparsities"}
    for name, fields in (
        ("digits", DIGITS),
        ("mnist1d", MNIST1D),
        ("cifar10", CIFAR10_RESNET20),
    )
}
COMMON = {"granularity": "channel", "export_tflite": False, "augment": False}
# The ELSA runs of a seed: (label, sparsifier).
METHODS = (("gates", "polarized_gates"), ("magnitude", "gradual_magnitude"))


def _widths(model) -> list[list]:
    """[layer name, filters or units] of every layer that has a width."""
    out = []
    for layer in model.layers:
        width = getattr(layer, "filters", None) or getattr(layer, "units", None)
        if width is not None:
            out.append([layer.name, int(width)])
    return out


def _levels(directory: str) -> tuple[dict, list]:
    """The trained ELSA model's figures per level, and its narrowed levels."""
    import keras

    import elsa_tf

    model = keras.saving.load_model(os.path.join(directory, "model.keras"))
    rows = elsa_tf.summary(model)
    narrowed = [elsa_tf.extract(model, k, physical=True) for k in range(len(rows))]
    figures = {
        "undecided_gates": [int(row["undecided_gates"]) for row in rows],
        "kept_channels": [int(row["kept_channels"]) for row in rows],
        "total_channels": int(rows[0]["total_channels"]),
        "kept_weights": [int(row["kept"]) for row in rows],
        "total_weights": int(rows[0]["total"]),
        "widths": [_widths(m) for m in narrowed],
        "parameters": [int(m.count_params()) for m in narrowed],
        "multiply_adds": [multiply_adds(m) for m in narrowed],
    }
    return figures, narrowed


def train_narrow(config, data, model, epochs: int) -> dict:
    """`model`'s architecture, freshly initialized, trained as one dense
    level for `epochs` epochs; its accuracy and seconds."""
    import keras

    import elsa_tf
    from elsa_tf.experiments import baseline, optimizers, run

    (row,) = baseline.train_independent_elsa(
        lambda: keras.models.clone_model(model),
        data,
        [0.0],
        epochs=epochs,
        batch_size=config.batch_size,
        optimizer=optimizers.factory(
            config.optimizer, config.learning_rate, config.weight_decay
        ),
        schedule=elsa_tf.LevelSchedule(config.schedule),
        seed=config.seed,
        augment=config.augment,
        # The examples ELSA's own run re-estimates its statistics on (the
        # training program keeps that choice private to its run module).
        recalibration_data=run._recalibration_data(config, data),
    )
    return {"accuracy": row["accuracy"], "seconds": row["train_seconds"]}


def narrow_budgets(epochs_per_level: int, num_levels: int, whole_run: bool) -> dict:
    """Epochs of each narrow network, by column: one ELSA level's, and with
    `whole_run` also a whole ELSA run's (every level's)."""
    budgets = {"narrow": epochs_per_level}
    if whole_run:
        budgets["narrow_run"] = epochs_per_level * num_levels
    return budgets


def run_config(
    name, seeds, workdir, *, sparsities, selection, epochs, data_dir, whole_run
):
    """Every ELSA run and narrow network of every seed; the per-seed figures."""
    from elsa_tf.experiments import datasets, run, zoo
    from elsa_tf.experiments.config import Config

    fields = {
        **COMMON,
        **CONFIGS[name],
        "sparsities": tuple(sparsities),
        "selection": selection,
        "data_dir": data_dir,
    }
    if epochs is not None:
        fields["epochs_per_level"] = epochs
    budgets = narrow_budgets(fields["epochs_per_level"], len(sparsities), whole_run)
    out = []
    for seed in seeds:
        per_seed, narrowed = {}, {}
        for label, sparsifier in METHODS:
            config = Config(**fields, seed=seed, sparsifier=sparsifier).resolved()
            directory = os.path.join(workdir, f"{name}_{label}_seed{seed}")
            report = run.train_and_evaluate(config, directory, verbose=0)
            figures, narrowed[label] = _levels(directory)
            per_seed[label] = {
                "accuracy": [row["accuracy"] for row in report["levels"]],
                "seconds": report["training_seconds"]["elsa"],
                **figures,
            }
            print(f"{name} seed {seed} ELSA {label}: done", flush=True)
        # One narrow network per budget and distinct set of widths (the
        # methods keep the same widths under per-layer selection).
        data = datasets.load(config.dataset, data_dir=data_dir, seed=seed)
        trained = {}
        for budget, budget_epochs in budgets.items():
            per_seed[budget] = {}
            for label, _ in METHODS:
                rows = []
                for model, widths in zip(narrowed[label], per_seed[label]["widths"]):
                    key = (budget, repr(widths))
                    if key not in trained:
                        trained[key] = train_narrow(config, data, model, budget_epochs)
                    rows.append(trained[key])
                per_seed[budget][label] = {
                    "accuracy": [r["accuracy"] for r in rows],
                    "seconds": [r["seconds"] for r in rows],
                }
            per_seed[f"{budget}_seconds"] = sum(
                r["seconds"] for (b, _), r in trained.items() if b == budget
            )
        print(f"{name} seed {seed} narrow networks: done", flush=True)
        out.append(per_seed)
    full = zoo.build(
        config.model, data.input_shape, data.num_classes, width=config.width
    )
    return {
        "fields": {k: v for k, v in config.to_dict().items() if k != "data_dir"},
        "sparsities": [float(s) for s in sparsities],
        "narrow_epochs": budgets,
        "seeds": list(seeds),
        "full_width": {
            "widths": _widths(full),
            "parameters": int(full.count_params()),
            "multiply_adds": multiply_adds(full),
        },
        "runs": out,
    }


def summarize(result: dict) -> dict:
    """Mean and std over seeds of every column of the tables.

    Accuracy columns: `gates`, `magnitude`, and `<budget>_<method>` for the
    narrow networks of each budget with that method's widths.
    """
    runs, full = result["runs"], result["full_width"]
    sparsities = result["sparsities"]
    dense = sparsities.index(0.0) if 0.0 in sparsities else None
    labels = [label for label, _ in METHODS]
    columns = {label: (label,) for label in labels}
    for budget in result["narrow_epochs"]:
        columns.update({f"{budget}_{label}": (budget, label) for label in labels})

    def accuracy(column, r, k):
        for key in columns[column]:
            r = r[key]
        return 100 * r["accuracy"][k]

    def paired(a, b, k, k_b=None):
        k_b = k if k_b is None else k_b
        return mean_std([accuracy(a, r, k) - accuracy(b, r, k_b) for r in runs])

    levels = []
    for k, sparsity in enumerate(sparsities):
        row = {"level": k, "sparsity": sparsity}
        for c in columns:
            row[c] = mean_std([accuracy(c, r, k) for r in runs])
            if dense is not None:
                row[f"{c}_change"] = paired(c, c, k, dense)
        for budget in result["narrow_epochs"]:
            for label in labels:
                row[f"{label}_vs_{budget}"] = paired(label, f"{budget}_{label}", k)
        row["gates_vs_magnitude"] = paired("gates", "magnitude", k)
        undecided = [r["gates"]["undecided_gates"][k] for r in runs]
        row["undecided_gates"] = {
            "mean": float(np.mean(undecided)),
            "max": max(undecided),
        }
        for label in labels:
            row[f"{label}_kept"] = {
                "channels": mean_std(
                    [
                        r[label]["kept_channels"][k] / r[label]["total_channels"]
                        for r in runs
                    ]
                ),
                "weights": mean_std(
                    [
                        r[label]["kept_weights"][k] / r[label]["total_weights"]
                        for r in runs
                    ]
                ),
                "parameters": mean_std(
                    [r[label]["parameters"][k] / full["parameters"] for r in runs]
                ),
                "multiply_adds": mean_std(
                    [r[label]["multiply_adds"][k] / full["multiply_adds"] for r in runs]
                ),
            }
        row["same_widths"] = all(
            r["gates"]["widths"][k] == r["magnitude"]["widths"][k] for r in runs
        )
        row["widths"] = runs[0]["gates"]["widths"][k]
        levels.append(row)
    seconds = {
        "elsa_gates": mean_std([r["gates"]["seconds"] for r in runs]),
        "elsa_magnitude": mean_std([r["magnitude"]["seconds"] for r in runs]),
    }
    for budget in result["narrow_epochs"]:
        # Every distinct narrow network of the budget once.
        seconds[budget] = mean_std([r[f"{budget}_seconds"] for r in runs])
    return {"levels": levels, "dense_level": dense, "seconds": seconds}


def _nearest_half(levels, key) -> dict:
    """The level whose kept share of multiply-adds is nearest one half."""
    return min(
        levels, key=lambda row: abs(row[f"{key}_kept"]["multiply_adds"]["mean"] - 0.5)
    )


def format_table(name: str, result: dict) -> str:
    pm = "\u00b1"
    s, f, full = result["summary"], result["fields"], result["full_width"]
    budgets = result["narrow_epochs"]

    def cell(x):
        return f"{x['mean']:.2f} {pm} {x['std']:.2f}"

    def diff(x):
        return f"{x['mean']:+.2f} {pm} {x['std']:.2f}"

    def share(x):
        return f"{100 * x['mean']:.1f}%"

    def narrow(budget):
        return f"narrow {budgets[budget]} ep."

    same = all(row["same_widths"] for row in s["levels"])
    widths = ", ".join(f"{n} {w}" for n, w in full["widths"])
    header = "| level | channels removed | ELSA gates | ELSA magnitude |"
    header += "".join(f" {narrow(b)} |" for b in budgets)
    for b in budgets:
        header += f" gates − {narrow(b)} | magnitude − {narrow(b)} |"
    header += " gates − magnitude | undecided gates (mean, max) |"
    lines = [
        f"#### {name}: {f['model']} (width {f['width']}: {widths}), "
        f"{f['epochs_per_level']} epochs per level, narrow networks "
        f"{' and '.join(str(e) for e in budgets.values())} epochs, "
        f"optimizer {f['optimizer']} (learning rate {f['learning_rate']}), "
        f"selection {f['selection']}, shared {f['shared']}, seeds {result['seeds']}",
        "",
        "Test accuracy (%), mean ± std over seeds. Channels removed: the share of "
        "channels a level removes from every unpinned channel group (inputs and "
        "logits keep their width). Narrow: the plain network of the level's "
        "widths trained from scratch for that many epochs"
        + (
            ""
            if same
            else " (of the gates' widths; magnitude's differences are "
            "to narrow networks of its own widths)"
        )
        + ". Differences are paired by seed.",
        "",
        header,
        "|" + "---:|" * (6 + 3 * len(budgets)),
    ]
    for r in s["levels"]:
        cells = [cell(r["gates"]), cell(r["magnitude"])]
        cells += [cell(r[f"{b}_gates"]) for b in budgets]
        for b in budgets:
            cells += [diff(r[f"gates_vs_{b}"]), diff(r[f"magnitude_vs_{b}"])]
        cells += [
            diff(r["gates_vs_magnitude"]),
            f"{r['undecided_gates']['mean']:.1f}, {r['undecided_gates']['max']}",
        ]
        lines.append(
            f"| {r['level']} | {r['sparsity']:.0%} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "What each level keeps, over the full-width model "
        f"({full['parameters']:,} parameters, {full['multiply_adds']:,} "
        "multiply-adds per example): channels of the unpinned groups, prunable "
        "weights (`summary`'s kept / total), all parameters of the narrowed "
        "model (normalization and biases included), multiply-adds (Conv, "
        "DepthwiseConv, Dense)"
        + ("" if same else "; gates' levels (magnitude's differ)")
        + ".",
        "",
        "| level | channels removed | widths | channels | weights | parameters "
        "| multiply-adds |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in s["levels"]:
        kept = r["gates_kept"]
        widths = ", ".join(str(w) for _, w in r["widths"])
        lines.append(
            f"| {r['level']} | {r['sparsity']:.0%} | {widths} | "
            f"{share(kept['channels'])} | {share(kept['weights'])} | "
            f"{share(kept['parameters'])} | {share(kept['multiply_adds'])} |"
        )
    if s["dense_level"] is not None:
        lines += [
            "",
            "Each level's accuracy minus the full-width network's (points, paired "
            "by seed; negative: a loss): for ELSA its own densest level, for "
            "narrow networks the one of the same budget trained at full width.",
            "",
            "| level | channels removed | multiply-adds kept | ELSA gates "
            "| ELSA magnitude |" + "".join(f" {narrow(b)} |" for b in budgets),
            "|" + "---:|" * (5 + len(budgets)),
        ]
        for r in s["levels"]:
            lines.append(
                f"| {r['level']} | {r['sparsity']:.0%} | "
                f"{share(r['gates_kept']['multiply_adds'])} | "
                f"{diff(r['gates_change'])} | {diff(r['magnitude_change'])} | "
                + " | ".join(diff(r[f"{b}_gates_change"]) for b in budgets)
                + " |"
            )
        half = _nearest_half(s["levels"], "gates")
        lines += [
            "",
            f"Seed paper (about 50% of connections removed for under 1 point): "
            f"level {half['level']} keeps {share(half['gates_kept']['multiply_adds'])}"
            f" of the multiply-adds and {share(half['gates_kept']['weights'])} of "
            f"the weights; its accuracy minus full width: "
            f"{half['gates_change']['mean']:+.2f} points with gates, "
            f"{half['magnitude_change']['mean']:+.2f} with magnitude, "
            + ", ".join(
                f"{half[f'{b}_gates_change']['mean']:+.2f} as a narrow network "
                f"({budgets[b]} epochs)"
                for b in budgets
            )
            + ".",
        ]
    t = s["seconds"]
    lines += [
        "",
        "Training time per seed, all levels (s): "
        + ", ".join(f"{k} {v['mean']:.1f}" for k, v in t.items())
        + ".",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    results = run_configs_in_temporary_directory(
        "elsa_channel_accuracy_",
        FLAGS.configs,
        CONFIGS,
        FLAGS.data_dir,
        lambda name, workdir: run_config(
            name,
            [int(s) for s in FLAGS.seeds],
            workdir,
            sparsities=[float(s) for s in FLAGS.sparsities],
            selection=FLAGS.selection,
            epochs=FLAGS.epochs_per_level,
            data_dir=FLAGS.data_dir,
            whole_run=FLAGS.narrow_whole_run,
        ),
        summarize,
        format_table,
    )
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
