"""Accuracy and storage effect of `embed(..., shared=...)` on digits.

A model with BatchNormalization and biases is embedded and trained once with
each shared-weight mode, from the same initial weights, on the same data,
with the same epochs and optimizer (Adam): `shared="freeze"` (shared weights
trained with level 0, then frozen), `"per_level_statistics"` (the default:
frozen too, but every level keeps its own normalization statistics) and
`"per_level"` (every level trains its own copy). The test accuracy of every
level is reported side by side, with the difference from `"freeze"`, beside a
dense copy of the same model trained for the same total number of epochs.
`--model=cnn` is the main job's CNN on the 8x8 digits; `--model=mobilenetv2`
the model zoo's small MobileNetV2 (inverted residual blocks, depthwise
convolutions, BatchNormalization, ReLU6) on the digits scaled to 32x32x3.
It also reports the size of each embedded model's `.keras` file over the
plain model's, with and without optimizer state, and checks that each level
extracts and reloads unchanged.

scikit-learn's bundled digits (1,797 8x8 images) need no download.

Commands used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/shared_weights.py \
        --out=/tmp/elsa_benchmarks/shared_weights.json
    python benchmarks/shared_weights.py --model=mobilenetv2 \
        --sparsities=0.75,0.5,0.25,0 --epochs_per_level=3 \
        --shared=freeze,per_level_statistics \
        --out=/tmp/elsa_benchmarks/shared_weights_mobilenetv2.json

A quick smoke run:

    python benchmarks/shared_weights.py --epochs_per_level=1 \
        --seeds=0
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _output import write_json
from absl import app, flags  # noqa: E402

SHARED_MODES = ("freeze", "per_level_statistics", "per_level")
MODELS = ("cnn", "mobilenetv2")

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "cnn", list(MODELS), "The model to embed.")
flags.DEFINE_list("shared", list(SHARED_MODES), "The shared modes to compare.")
flags.DEFINE_list(
    "sparsities", ["0.95", "0.9", "0.75", "0.5", "0.0"], "ELSA level sparsities."
)
flags.DEFINE_integer("epochs_per_level", 8, "Epochs per level.")
flags.DEFINE_integer("batch_size", 32, "Training batch size.")
flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
flags.DEFINE_list(
    "seeds",
    ["0", "1", "2"],
    "Seeds (initial weights, split, data order), one run each.",
)
flags.DEFINE_float("test_fraction", 0.25, "Fraction of the digits held out.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


def load_digits(seed: int, test_fraction: float, model: str = "cnn"):
    """Digits in [0, 1], split with a fixed, stratified seed: 8x8x1 for the
    CNN, scaled to 32x32 and repeated to 3 channels for MobileNetV2."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    if model == "mobilenetv2":
        x = np.kron(x, np.ones((1, 4, 4, 3), "float32"))
    return train_test_split(
        x,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )


def build_model(seed: int, model: str = "cnn"):
    """The model zoo's `"cnn"` (Conv-BN-ReLU x2, pool, Dense(bias) x2: every
    kind of shared weight) or `"mobilenetv2"`, seeded."""
    import keras

    from elsa_tf.experiments import zoo

    keras.utils.set_random_seed(seed)
    shape = (8, 8, 1) if model == "cnn" else (32, 32, 3)
    return zoo.build(model, shape, 10)


def _copy(model):
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _logits(model, x):
    # A direct call, not predict(): no new tf.function for every model.
    import keras

    return keras.ops.convert_to_numpy(model(x, training=False))


def _accuracy(model, x, y):
    logits = _logits(model, x)
    return float(np.mean(np.argmax(logits, axis=-1) == y)), logits


def _file_sizes(model, directory, name):
    """Sizes of `model` saved as .keras, as trained and without optimizer.

    Returns the path of the first file and both sizes in bytes.
    """
    import keras

    path = os.path.join(directory, f"{name}.keras")
    model.save(path)
    # clone_model re-compiles its copy, so drop the optimizer by reloading
    # without compiling.
    bare_path = os.path.join(directory, f"{name}_no_optimizer.keras")
    keras.saving.load_model(path, compile=False).save(bare_path)
    return path, os.path.getsize(path), os.path.getsize(bare_path)


def run_seed(
    seed: int,
    *,
    sparsities,
    epochs_per_level: int,
    batch_size: int,
    learning_rate: float,
    test_fraction: float,
    workdir: str,
    model_name: str = "cnn",
    shared_modes=SHARED_MODES,
) -> dict:
    """Trains each shared mode and dense from one initialization; measures them."""
    import keras

    import elsa_tf

    x_train, x_test, y_train, y_test = load_digits(seed, test_fraction, model_name)
    base = build_model(seed, model_name)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    fit_kwargs = dict(batch_size=batch_size, verbose=0)
    result = {"seed": seed, "train_size": len(x_train), "test_size": len(x_test)}

    keras.utils.set_random_seed(seed)  # same data order for every model
    dense = _copy(base)
    dense.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    dense.fit(x_train, y_train, epochs=epochs_per_level * len(sparsities), **fit_kwargs)
    result["dense_accuracy"], _ = _accuracy(dense, x_test, y_test)
    _, dense_size, dense_bare = _file_sizes(dense, workdir, f"dense_{seed}")
    result["dense_file_bytes"] = {
        "with_optimizer": dense_size,
        "no_optimizer": dense_bare,
    }

    for shared in shared_modes:
        keras.utils.set_random_seed(seed)
        model = elsa_tf.embed(base, sparsities=list(sparsities), shared=shared)
        elsa_tf.fit(
            model,
            x_train,
            y_train,
            epochs_per_level=epochs_per_level,
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss,
            **fit_kwargs,
        )
        accuracy, extract_gap = [], []
        for level in range(len(sparsities)):
            acc, logits = _accuracy(elsa_tf.extract(model, level), x_test, y_test)
            accuracy.append(acc)
            elsa_tf.set_level(model, level)
            extract_gap.append(float(np.max(np.abs(_logits(model, x_test) - logits))))
        path, size, bare = _file_sizes(model, workdir, f"{shared}_{seed}")
        reloaded = keras.saving.load_model(path, compile=False)
        reload_gap = float(
            np.max(np.abs(_logits(reloaded, x_test) - _logits(model, x_test)))
        )
        result[shared] = {
            "accuracy": accuracy,
            "achieved_sparsity": [
                round(row["achieved_sparsity"], 4) for row in elsa_tf.summary(model)
            ],
            "extract_max_abs_logit_gap": max(extract_gap),
            "reload_max_abs_logit_gap": reload_gap,
            "file_bytes": {"with_optimizer": size, "no_optimizer": bare},
            "file_ratio": {
                "with_optimizer": size / dense_size,
                "no_optimizer": bare / dense_bare,
            },
        }
    return result


def run(
    seeds=(0, 1, 2),
    *,
    sparsities=(0.95, 0.9, 0.75, 0.5, 0.0),
    epochs_per_level: int = 8,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    test_fraction: float = 0.25,
    model: str = "cnn",
    shared_modes=SHARED_MODES,
) -> dict:
    """Compares the `shared` modes on digits.

    Args:
        seeds: one full comparison per seed (initial weights, split, data order).
        sparsities: the ELSA levels, sparsest first.
        epochs_per_level: epochs per level; the dense baseline trains for
            `epochs_per_level * len(sparsities)` epochs.
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        test_fraction: fraction of the digits held out for testing.
        model: `"cnn"` or `"mobilenetv2"`.
        shared_modes: the modes to train, `"freeze"` first (the others are
            compared with it).

    Returns:
        A JSON-serializable dict: the configuration, every seed's results, and
        per-level accuracy means over the seeds.
    """
    config = {
        "seeds": list(seeds),
        "sparsities": [float(s) for s in sparsities],
        "epochs_per_level": epochs_per_level,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "test_fraction": test_fraction,
        "model": model,
        "shared_modes": list(shared_modes),
    }
    if list(shared_modes)[:1] != ["freeze"] or not set(shared_modes) <= set(
        SHARED_MODES
    ):
        raise ValueError(
            f"shared_modes must start with 'freeze' and name modes of "
            f"{SHARED_MODES}. Received: shared_modes={shared_modes!r}"
        )
    with tempfile.TemporaryDirectory() as workdir:
        per_seed = [
            run_seed(
                seed,
                sparsities=config["sparsities"],
                epochs_per_level=epochs_per_level,
                batch_size=batch_size,
                learning_rate=learning_rate,
                test_fraction=test_fraction,
                workdir=workdir,
                model_name=model,
                shared_modes=shared_modes,
            )
            for seed in seeds
        ]
    summary = {
        "dense_accuracy_mean": float(np.mean([r["dense_accuracy"] for r in per_seed])),
        "dense_accuracy_std": float(np.std([r["dense_accuracy"] for r in per_seed])),
    }
    for shared in shared_modes:
        acc = np.array([r[shared]["accuracy"] for r in per_seed])
        summary[shared] = {
            "accuracy_mean": acc.mean(0).tolist(),
            "accuracy_std": acc.std(0).tolist(),
        }
        if shared != "freeze":
            diff = acc - np.array([r["freeze"]["accuracy"] for r in per_seed])
            summary[shared]["minus_freeze_mean"] = diff.mean(0).tolist()
            summary[shared]["minus_freeze_min"] = diff.min(0).tolist()
            summary[shared]["minus_freeze_max"] = diff.max(0).tolist()
    return {"config": config, "seeds": per_seed, "summary": summary}


def format_tables(results) -> str:
    """The results as markdown tables."""
    cfg, summary, per_seed = results["config"], results["summary"], results["seeds"]
    modes = cfg.get("shared_modes", ["freeze", "per_level"])
    others = modes[1:]
    n = len(per_seed)
    lines = [
        f"{cfg.get('model', 'cnn')} on digits, {per_seed[0]['train_size']} train / "
        f"{per_seed[0]['test_size']} test, {cfg['epochs_per_level']} epochs/level, "
        f"Adam({cfg['learning_rate']}), batch {cfg['batch_size']}, seeds "
        f"{cfg['seeds']}. Test accuracy, mean (± std) over {n} seed(s); the "
        f"dense model trains {cfg['epochs_per_level'] * len(cfg['sparsities'])} "
        "epochs.",
        "",
        "| level | sparsity | "
        + " | ".join(modes)
        + " | "
        + "".join(f"{m} − freeze (mean, min..max) | " for m in others)
        + "dense baseline |",
        "|---|---|" + "---|" * (len(modes) + len(others) + 1),
    ]
    dense = (
        f"{summary['dense_accuracy_mean']:.4f} ± {summary['dense_accuracy_std']:.4f}"
    )
    for k, sparsity in enumerate(cfg["sparsities"]):
        cells = [
            f"{summary[m]['accuracy_mean'][k]:.4f} ± "
            f"{summary[m]['accuracy_std'][k]:.4f}"
            for m in modes
        ] + [
            f"{summary[m]['minus_freeze_mean'][k]:+.4f} "
            f"({summary[m]['minus_freeze_min'][k]:+.4f}.."
            f"{summary[m]['minus_freeze_max'][k]:+.4f})"
            for m in others
        ]
        lines.append(f"| {k} | {sparsity:.2f} | {' | '.join(cells)} | {dense} |")
    lines += [
        "",
        "Per seed (test accuracy by level):",
        "",
        "| seed | " + " | ".join(modes) + " | dense |",
        "|---|" + "---|" * (len(modes) + 1),
    ]
    for r in per_seed:
        accs = [", ".join(f"{a:.4f}" for a in r[m]["accuracy"]) for m in modes]
        lines.append(
            f"| {r['seed']} | {' | '.join(accs)} | {r['dense_accuracy']:.4f} |"
        )
    r = per_seed[0]
    lines += [
        "",
        f"Saved .keras size over the plain (dense) model's, seed {r['seed']}:",
        "",
        "| model | with optimizer state: bytes | ratio | without optimizer: bytes "
        "| ratio |",
        "|---|---|---|---|---|",
        f"| plain dense | {r['dense_file_bytes']['with_optimizer']:,} | 1.000 | "
        f"{r['dense_file_bytes']['no_optimizer']:,} | 1.000 |",
    ]
    for shared in modes:
        s = r[shared]
        lines.append(
            f"| embedded, shared={shared} | {s['file_bytes']['with_optimizer']:,} | "
            f"{s['file_ratio']['with_optimizer']:.3f} | "
            f"{s['file_bytes']['no_optimizer']:,} | "
            f"{s['file_ratio']['no_optimizer']:.3f} |"
        )
    lines += ["", "Checks (largest over seeds and levels):", ""]
    for shared in modes:
        extract = max(x[shared]["extract_max_abs_logit_gap"] for x in per_seed)
        reload = max(x[shared]["reload_max_abs_logit_gap"] for x in per_seed)
        lines.append(
            f"- shared={shared}: achieved sparsity {r[shared]['achieved_sparsity']}; "
            f"max |logit| gap extract vs embedded {extract:.2e}, reloaded vs "
            f"in-memory {reload:.2e}."
        )
    return "\n".join(lines)


def main(argv):
    del argv
    results = run(
        [int(s) for s in FLAGS.seeds],
        sparsities=[float(s) for s in FLAGS.sparsities],
        epochs_per_level=FLAGS.epochs_per_level,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        test_fraction=FLAGS.test_fraction,
        model=FLAGS.model,
        shared_modes=FLAGS.shared,
    )
    print(format_tables(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
