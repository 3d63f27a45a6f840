"""The loop the accuracy benchmarks share: one configuration after another,
skipping those whose tensorflow-datasets data is not there."""

from __future__ import annotations

from absl import app

# The offline configurations of the accuracy benchmarks: the main job's
# digits CNN, and MNIST-1D (generated locally) with the 1-D CNN at half width.
DIGITS = {
    "dataset": "digits",
    "sparsities": (0.95, 0.9, 0.75, 0.0),
    "epochs_per_level": 6,
}
MNIST1D = {
    "dataset": "mnist1d",
    "model": "cnn1d",
    "width": 0.5,
    "sparsities": (0.9, 0.75, 0.5, 0.0),
    "epochs_per_level": 6,
    "batch_size": 64,
}

# CIFAR-10 with the zoo's ResNet-20 (when tensorflow-datasets has the data):
# the Config fields that differ from elsa-train's defaults.
CIFAR10_RESNET20 = {
    "dataset": "cifar10",
    "model": "resnet20",
    "sparsities": (0.9, 0.75, 0.5, 0.0),
    "epochs_per_level": 30,
    "batch_size": 128,
    "optimizer": "sgd",
    "learning_rate": 0.05,
    "weight_decay": 5e-4,
}


def data_unavailable(fields: dict, data_dir) -> str | None:
    """None if the configuration's data can be read, else why not."""
    from elsa_tf.experiments import datasets

    if fields["dataset"] not in datasets.TFDS_NAMES:
        return None
    try:
        datasets.load(fields["dataset"], data_dir=data_dir)
    except FileNotFoundError as e:
        return str(e).splitlines()[0]
    return None


def run_configs(names, configs: dict, data_dir, run_one, summarize, format_table):
    """Runs `run_one(name)` for every configuration; returns results by name.

    Each result gets its `summary`, and its table is printed as soon as it is
    done. A configuration whose data is missing is skipped, and said so.
    """
    results = {}
    for name in names:
        if name not in configs:
            raise app.UsageError(
                f"Unknown config. Expected some of {sorted(configs)}. "
                f"Received: --configs={name}"
            )
        missing = data_unavailable(configs[name], data_dir)
        if missing:
            print(f"{name}: skipped, no data ({missing})", flush=True)
            results[name] = {"skipped": missing}
            continue
        result = run_one(name)
        result["summary"] = summarize(result)
        results[name] = result
        print(format_table(name, result), flush=True)
    return results


def run_configs_in_temporary_directory(
    prefix: str, names, configs: dict, data_dir, run_one, summarize, format_table
) -> dict:
    """`run_configs`, with `run_one(name, workdir)` working in one temporary
    directory (removed afterwards) and only absl's errors logged."""
    import tempfile

    from absl import logging

    logging.set_verbosity(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        return run_configs(
            names,
            configs,
            data_dir,
            lambda name: run_one(name, workdir),
            summarize,
            format_table,
        )
