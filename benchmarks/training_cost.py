"""Training cost of an embedded model: step time and peak memory.

Every figure is a ratio, or a side-by-side comparison, measured in one run:

* step time of the embedded model trained as a user trains it, over the plain
  Keras 3 model trained with plain `model.fit` and the same optimizer (Adam);
* beside it, the same ratio for tfmot's `prune_low_magnitude` on the same
  architecture built with tf_keras (Keras 2), over the plain tf_keras model;
* a breakdown of the embedded model's overhead: the wrappers alone (plain
  Adam, no scheduler), plus the `FreezingOptimizer`, plus the `LevelScheduler`,
  and the time spent inside the scheduler's hooks;
* peak resident memory (`ru_maxrss`) of a training run, embedded over plain,
  each measured in its own fresh process.

Step times are the differences between consecutive `on_train_batch_end`
calls of a timer appended last, so each includes the callbacks run before the
step (the scheduler's mask updates). The first epoch is warm-up and is not
measured; steps that span two `fit` calls are not either. The data are
random: only time is measured. The pruning schedule is active while measuring:
every level prunes over its first 75% of steps (about 20 mask updates each).

Commands used (from the repository root, 2 CPU cores, no GPU):

    /work/venv/bin/python benchmarks/training_cost.py \
        --out=/tmp/elsa_benchmarks/training_cost.json

A quick smoke run:

    /work/venv/bin/python benchmarks/training_cost.py --archs=mlp \
        --steps_per_epoch=8 --repeats=1 --nomemory
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_ARCHS = ("cnn", "mlp")
# Configurations timed for every architecture, in the order they run.
_MAIN = ("keras", "elsa_fit", "tf_keras", "tfmot")
# Extra configurations that split the embedded model's overhead into parts.
_PROFILE = ("elsa_wrappers", "elsa_freezing", "elsa_scheduler")
_LABELS = {
    "keras": "Keras 3, plain model, Adam",
    "elsa_fit": "elsa_tf.fit (FreezingOptimizer + LevelScheduler)",
    "tf_keras": "tf_keras, plain model, Adam",
    "tfmot": "tfmot prune_low_magnitude + UpdatePruningStep",
    "elsa_wrappers": "embedded, plain Adam, no scheduler",
    "elsa_freezing": "embedded, FreezingOptimizer, no scheduler",
    "elsa_scheduler": "embedded, FreezingOptimizer + LevelScheduler in model.fit",
}

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", list(_ARCHS), "Architectures to measure: cnn, mlp.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer(
    "steps_per_epoch", 25, "Steps per epoch; the data hold exactly this many batches."
)
flags.DEFINE_integer("epochs_per_level", 2, "Epochs per ELSA level.")
flags.DEFINE_list("sparsities", ["0.9", "0.5", "0.0"], "ELSA level sparsities.")
flags.DEFINE_integer(
    "repeats", 2, "Interleaved repeats of every configuration; step times are pooled."
)
flags.DEFINE_bool("profile", True, "Also time the overhead breakdown configurations.")
flags.DEFINE_bool("memory", True, "Also measure peak memory in fresh processes.")
flags.DEFINE_integer("seed", 0, "Seed for the data and the models.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


# -- models and data ------------------------------------------------------------


def _layers(keras_module, arch):
    """The benchmark architecture as a list of layers of `keras_module`."""
    L = keras_module.layers
    if arch == "cnn":
        return [
            L.Conv2D(16, 3, padding="same", name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.MaxPooling2D(),
            L.Conv2D(32, 3, padding="same", name="conv2"),
            L.BatchNormalization(name="bn2"),
            L.ReLU(),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(10, name="logits"),
        ]
    if arch == "mlp":
        return [
            L.Dense(300, activation="relu", name="fc1"),
            L.Dense(100, activation="relu", name="fc2"),
            L.Dense(10, name="logits"),
        ]
    raise ValueError(f"arch must be one of {_ARCHS}. Received: arch={arch!r}")


def _input_shape(arch):
    return (28, 28, 1) if arch == "cnn" else (784,)


def _build(keras_module, arch, seed):
    keras_module.utils.set_random_seed(seed)
    return keras_module.Sequential(
        [keras_module.Input(_input_shape(arch)), *_layers(keras_module, arch)],
        name=arch,
    )


def _data(arch, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *_input_shape(arch)), dtype=np.float32)
    y = rng.integers(0, 10, size=n)
    return x, y


# -- timing -----------------------------------------------------------------------


class _StepTimerMixin:
    """Records `perf_counter` at every batch end, across one or more `fit` calls."""

    def _init_timer(self):
        self.records = []  # (fit call, global epoch, perf_counter)
        self._call = -1
        self._epoch = -1

    def on_train_begin(self, logs=None):
        self._call += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch += 1

    def on_train_batch_end(self, batch, logs=None):
        self.records.append((self._call, self._epoch, time.perf_counter()))

    def step_times(self, warmup_epochs: int = 1):
        """Step durations in ms with the global epoch of each, after warm-up."""
        times, epochs = [], []
        for (c0, _, t0), (c1, e1, t1) in zip(self.records, self.records[1:]):
            if c0 == c1 and e1 >= warmup_epochs:
                times.append((t1 - t0) * 1e3)
                epochs.append(e1)
        return np.asarray(times), np.asarray(epochs)


def _timer(callback_base):
    cls = type("StepTimer", (_StepTimerMixin, callback_base), {})
    timer = cls()
    timer._init_timer()
    return timer


def _timed_level_scheduler(**kwargs):
    """A `LevelScheduler` that also times its own hooks."""
    import elsa_tf

    class TimedLevelScheduler(elsa_tf.LevelScheduler):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.hook_ms = {"on_train_batch_begin": [], "on_epoch_begin": [],
                            "on_epoch_end": []}

        def _timed(self, name, fn, *args):
            t0 = time.perf_counter()
            fn(*args)
            self.hook_ms[name].append((time.perf_counter() - t0) * 1e3)

        def on_train_batch_begin(self, batch, logs=None):
            self._timed("on_train_batch_begin", super().on_train_batch_begin, batch)

        def on_epoch_begin(self, epoch, logs=None):
            self._timed("on_epoch_begin", super().on_epoch_begin, epoch)

        def on_epoch_end(self, epoch, logs=None):
            self._timed("on_epoch_end", super().on_epoch_end, epoch)

    return TimedLevelScheduler(**kwargs)


def _prune_steps(steps_per_level):
    """Steps of a level at which the default `LevelSchedule` updates the masks."""
    import elsa_tf

    begin, end, frequency = elsa_tf.LevelSchedule().steps(steps_per_level)
    return set(range(begin, end + 1, frequency))


# -- one training run per configuration ----------------------------------------------


def _train(config, arch, x, y, *, batch_size, epochs_per_level, sparsities, seed):
    """Trains one configuration; returns the timer, wall time and extras."""
    num_epochs = epochs_per_level * len(sparsities)
    steps = len(x) // batch_size
    fit_kwargs = dict(batch_size=batch_size, verbose=0, shuffle=False)
    extra = {}
    if config in ("tf_keras", "tfmot"):
        import tf_keras

        model = _build(tf_keras, arch, seed)
        timer = _timer(tf_keras.callbacks.Callback)
        callbacks = [timer]
        if config == "tfmot":
            import tensorflow_model_optimization as tfmot

            # The same ramp as one ELSA level, stretched over the whole run so
            # that masks keep changing while steps are measured.
            begin, end, frequency = _level_schedule_steps(num_epochs * steps)
            model = tfmot.sparsity.keras.prune_low_magnitude(
                model,
                pruning_schedule=tfmot.sparsity.keras.PolynomialDecay(
                    initial_sparsity=0.0,
                    final_sparsity=max(sparsities),
                    begin_step=begin,
                    end_step=end,
                    frequency=frequency,
                ),
            )
            callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), timer]
        model.compile(
            optimizer=tf_keras.optimizers.Adam(1e-3),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        t0 = time.perf_counter()
        model.fit(x, y, epochs=num_epochs, callbacks=callbacks, **fit_kwargs)
        return timer, time.perf_counter() - t0, extra

    import keras

    import elsa_tf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _build(keras, arch, seed)
    timer = _timer(keras.callbacks.Callback)
    if config == "keras":
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        t0 = time.perf_counter()
        model.fit(x, y, epochs=num_epochs, callbacks=[timer], **fit_kwargs)
        return timer, time.perf_counter() - t0, extra

    model = elsa_tf.embed(model, sparsities=list(sparsities), shared="freeze")
    if config == "elsa_fit":
        t0 = time.perf_counter()
        elsa_tf.fit(
            model, x, y, epochs_per_level=epochs_per_level,
            optimizer=keras.optimizers.Adam(1e-3), loss=loss, callbacks=[timer],
            **fit_kwargs,
        )
        wall = time.perf_counter() - t0
        extra["achieved_sparsity"] = [
            round(row["achieved_sparsity"], 4) for row in elsa_tf.summary(model)
        ]
        return timer, wall, extra

    callbacks = [timer]
    if config == "elsa_wrappers":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = elsa_tf.FreezingOptimizer(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=optimizer, loss=loss)
    scheduler = None
    if config == "elsa_scheduler":
        # Built eagerly on purpose: built lazily inside the first traced step,
        # FreezingOptimizer records uninitialized slots and its reset() at the
        # start of level 1 fails (see the report). elsa_tf.fit is unaffected.
        model.optimizer.build(model.trainable_variables)
        scheduler = _timed_level_scheduler(epochs_per_level=epochs_per_level)
        callbacks = [scheduler, timer]
    t0 = time.perf_counter()
    model.fit(x, y, epochs=num_epochs, callbacks=callbacks, **fit_kwargs)
    wall = time.perf_counter() - t0
    if scheduler is not None:
        extra["hook_ms"] = scheduler.hook_ms
    return timer, wall, extra


def _level_schedule_steps(total_steps):
    import elsa_tf

    return elsa_tf.LevelSchedule().steps(total_steps)


# -- memory: one fresh process per configuration ---------------------------------------


def _max_rss_mib():
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _memory_worker(config, arch, kwargs):
    """Runs in a fresh process: peak RSS after imports and after training."""
    import keras  # noqa: F401  (imported before the baseline is taken)
    import tensorflow  # noqa: F401

    import elsa_tf  # noqa: F401

    x, y = _data(arch, kwargs["steps_per_epoch"] * kwargs["batch_size"], kwargs["seed"])
    before = _max_rss_mib()
    kwargs = {k: v for k, v in kwargs.items() if k != "steps_per_epoch"}
    _train(config, arch, x, y, **kwargs)
    return {
        "after_imports_mib": before,
        "peak_mib": _max_rss_mib(),
        "imported_tfmot": "tensorflow_model_optimization" in sys.modules,
    }


def _tfmot_import_worker():
    """Runs in a fresh process: what importing tfmot adds to a Keras 3 process."""
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    before = _max_rss_mib()
    t0 = time.perf_counter()
    import tensorflow_model_optimization  # noqa: F401

    return {"import_s": time.perf_counter() - t0, "added_mib": _max_rss_mib() - before}


def _in_fresh_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# -- the benchmark -----------------------------------------------------------------------


def _stats(times):
    return {
        "median_ms": float(np.median(times)),
        "mean_ms": float(np.mean(times)),
        "steps": int(len(times)),
    }


def run(
    archs=_ARCHS,
    *,
    batch_size: int = 128,
    steps_per_epoch: int = 25,
    epochs_per_level: int = 2,
    sparsities=(0.9, 0.5, 0.0),
    repeats: int = 2,
    profile: bool = True,
    memory: bool = True,
    seed: int = 0,
) -> dict:
    """Measures step time and peak memory of ELSA training against plain Keras.

    Args:
        archs: architectures to measure, from `("cnn", "mlp")`.
        batch_size: training batch size.
        steps_per_epoch: steps per epoch (the random data hold that many batches).
        epochs_per_level: epochs per ELSA level; every configuration trains for
            `epochs_per_level * len(sparsities)` epochs.
        sparsities: the ELSA levels.
        repeats: interleaved repeats of every configuration, pooled.
        profile: also time the configurations that break the overhead down.
        memory: also measure peak memory, each configuration in a fresh process.
        seed: seed for data and models.

    Returns:
        A JSON-serializable dict: the configuration, and per architecture the
        step statistics of every configuration, the ratios, the scheduler's
        hook times and the memory figures.
    """
    for arch in archs:
        if arch not in _ARCHS:
            raise ValueError(f"archs must be among {_ARCHS}. Received: archs={archs!r}")
    sparsities = tuple(float(s) for s in sparsities)
    train_kwargs = dict(
        batch_size=batch_size,
        epochs_per_level=epochs_per_level,
        sparsities=sparsities,
        seed=seed,
    )
    configs = _MAIN + (_PROFILE if profile else ())
    steps_per_level = epochs_per_level * steps_per_epoch
    prune_steps = _prune_steps(steps_per_level)
    results = {
        "config": {
            "archs": list(archs), "steps_per_epoch": steps_per_epoch,
            "repeats": repeats, "profile": profile, "memory": memory,
            **train_kwargs, "sparsities": list(sparsities),
            "mask_updates_per_level": len(prune_steps),
        },
        "archs": {},
    }
    for arch in archs:
        x, y = _data(arch, steps_per_epoch * batch_size, seed)
        pooled = {c: [] for c in configs}
        per_level = {c: [[] for _ in sparsities] for c in configs}
        boundary = {c: [] for c in configs}
        walls = {c: [] for c in configs}
        extras = {}
        for _ in range(repeats):
            for config in configs:
                timer, wall, extra = _train(config, arch, x, y, **train_kwargs)
                times, epochs = timer.step_times()
                pooled[config].extend(times)
                walls[config].append(wall)
                for t, e in zip(times, epochs):
                    per_level[config][e // epochs_per_level].append(t)
                # Steps whose preceding batch end lies in the previous epoch.
                starts = np.flatnonzero(np.diff(epochs, prepend=epochs[0] - 1) != 0)
                boundary[config].extend(times[starts])
                extras.setdefault(config, []).append(extra)
        stats = {}
        for config in configs:
            stats[config] = {
                **_stats(pooled[config]),
                "per_level_median_ms": [
                    float(np.median(v)) if v else None for v in per_level[config]
                ],
                "epoch_start_step_ms": float(np.median(boundary[config])),
                "wall_s": float(np.median(walls[config])),
            }
        arch_result = {"steps": stats, "ratios": _ratios(stats, profile)}
        if "achieved_sparsity" in extras["elsa_fit"][0]:
            arch_result["achieved_sparsity"] = extras["elsa_fit"][0]["achieved_sparsity"]
        if profile:
            arch_result["scheduler_hooks"] = _hook_summary(
                extras["elsa_scheduler"], steps_per_epoch, epochs_per_level,
                len(sparsities), prune_steps,
            )
        if memory:
            arch_result["memory"] = _memory(arch, steps_per_epoch, train_kwargs)
        results["archs"][arch] = arch_result
    if memory:
        results["tfmot_import"] = _in_fresh_process(_tfmot_import_worker)
    return results


def _ratios(stats, profile):
    def ratio(a, b, key):
        return stats[a][key] / stats[b][key]

    out = {}
    for key, name in (("median_ms", "median"), ("mean_ms", "mean"), ("wall_s", "wall")):
        out[f"elsa_fit/keras ({name})"] = ratio("elsa_fit", "keras", key)
        out[f"tfmot/tf_keras ({name})"] = ratio("tfmot", "tf_keras", key)
        if profile:
            for config in _PROFILE:
                out[f"{config}/keras ({name})"] = ratio(config, "keras", key)
    return out


def _hook_summary(extras, steps_per_epoch, epochs_per_level, num_levels, prune_steps):
    """Mean time of the scheduler's hooks, mask-update batches apart from others."""
    update, other, epoch_begin, level_end, epoch_end = [], [], [], [], []
    for extra in extras:
        hooks = extra["hook_ms"]
        batch_ms = hooks["on_train_batch_begin"]
        for i, ms in enumerate(batch_ms):
            step_in_level = i % (steps_per_epoch * epochs_per_level)
            (update if step_in_level in prune_steps else other).append(ms)
        for epoch, ms in enumerate(hooks["on_epoch_end"]):
            ends_level = (epoch + 1) % epochs_per_level == 0
            (level_end if ends_level else epoch_end).append(ms)
        epoch_begin.extend(hooks["on_epoch_begin"])
    total_steps = steps_per_epoch * epochs_per_level * num_levels
    return {
        "mask_update_ms": float(np.mean(update)),
        "mask_updates": len(update) // len(extras),
        "other_batch_begin_ms": float(np.mean(other)),
        "level_end_ms": float(np.mean(level_end)),
        "other_epoch_end_ms": float(np.mean(epoch_end)) if epoch_end else None,
        "epoch_begin_ms": [float(v) for v in extras[-1]["hook_ms"]["on_epoch_begin"]],
        "mask_update_ms_per_step": float(np.sum(update)) / len(extras) / total_steps,
    }


def _memory(arch, steps_per_epoch, train_kwargs):
    kwargs = dict(train_kwargs, steps_per_epoch=steps_per_epoch)
    out = {}
    for config in ("keras", "elsa_fit"):
        out[config] = _in_fresh_process(_memory_worker, config, arch, kwargs)
    plain, elsa = out["keras"], out["elsa_fit"]
    out["peak_ratio"] = elsa["peak_mib"] / plain["peak_mib"]
    added = {
        c: out[c]["peak_mib"] - out[c]["after_imports_mib"] for c in ("keras", "elsa_fit")
    }
    out["added_by_training_mib"] = added
    out["added_ratio"] = (
        added["elsa_fit"] / added["keras"] if added["keras"] > 0 else None
    )
    return out


# -- printing -------------------------------------------------------------------------


def format_table(results) -> str:
    """Markdown tables of the results."""
    cfg = results["config"]
    lines = [
        f"Batch {cfg['batch_size']}, {cfg['steps_per_epoch']} steps/epoch, "
        f"{cfg['epochs_per_level']} epochs/level, sparsities {cfg['sparsities']} "
        f"({cfg['mask_updates_per_level']} mask updates/level), "
        f"{cfg['repeats']} repeat(s) pooled; first epoch not measured.",
        "",
        "| arch | configuration | median step ms | mean step ms | per-level median ms "
        "| epoch-start step ms | wall s | median ratio | mean ratio | wall ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {"tfmot": "tf_keras", "tf_keras": "tf_keras"}
    for arch, res in results["archs"].items():
        for config, s in res["steps"].items():
            base = res["steps"][baseline.get(config, "keras")]
            levels = ", ".join("-" if v is None else f"{v:.1f}" for v in s["per_level_median_ms"])
            lines.append(
                f"| {arch} | {_LABELS[config]} | {s['median_ms']:.2f} | "
                f"{s['mean_ms']:.2f} | {levels} | {s['epoch_start_step_ms']:.1f} | "
                f"{s['wall_s']:.2f} | {s['median_ms'] / base['median_ms']:.3f} | "
                f"{s['mean_ms'] / base['mean_ms']:.3f} | "
                f"{s['wall_s'] / base['wall_s']:.3f} |"
            )
    if any("scheduler_hooks" in r for r in results["archs"].values()):
        lines += [
            "",
            "LevelScheduler hooks (embedded, model.fit), mean ms per call:",
            "",
            "| arch | mask update (on_train_batch_begin) | updates/run | other "
            "batch_begin | level end (on_epoch_end) | level start (on_epoch_begin) "
            "| mask updates per step, amortized |",
            "|---|---|---|---|---|---|---|",
        ]
        for arch, res in results["archs"].items():
            h = res.get("scheduler_hooks")
            if h is None:
                continue
            begins = ", ".join(f"{v:.1f}" for v in h["epoch_begin_ms"])
            lines.append(
                f"| {arch} | {h['mask_update_ms']:.2f} | {h['mask_updates']} | "
                f"{h['other_batch_begin_ms']:.4f} | {h['level_end_ms']:.1f} | "
                f"{begins} | {h['mask_update_ms_per_step']:.2f} |"
            )
    if any("memory" in r for r in results["archs"].values()):
        lines += [
            "",
            "Peak RSS of a training run, each in a fresh process:",
            "",
            "| arch | plain peak MiB | embedded peak MiB | peak ratio | plain added "
            "by training MiB | embedded added MiB | added ratio | embedded imported tfmot |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arch, res in results["archs"].items():
            m = res.get("memory")
            if m is None:
                continue
            added = m["added_by_training_mib"]
            added_ratio = "-" if m["added_ratio"] is None else f"{m['added_ratio']:.2f}"
            lines.append(
                f"| {arch} | {m['keras']['peak_mib']:.0f} | "
                f"{m['elsa_fit']['peak_mib']:.0f} | {m['peak_ratio']:.3f} | "
                f"{added['keras']:.0f} | {added['elsa_fit']:.0f} | {added_ratio} | "
                f"{m['elsa_fit']['imported_tfmot']} |"
            )
        if "tfmot_import" in results:
            t = results["tfmot_import"]
            lines += [
                "",
                f"Importing tfmot into a Keras 3 process (elsa_tf.schedules does, "
                f"at the first level start): +{t['added_mib']:.0f} MiB peak RSS, "
                f"{t['import_s']:.1f} s.",
            ]
    for arch, res in results["archs"].items():
        if "achieved_sparsity" in res:
            lines.append(
                f"\n{arch}: achieved sparsity per level after elsa_tf.fit: "
                f"{res['achieved_sparsity']}"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    results = run(
        FLAGS.archs,
        batch_size=FLAGS.batch_size,
        steps_per_epoch=FLAGS.steps_per_epoch,
        epochs_per_level=FLAGS.epochs_per_level,
        sparsities=[float(s) for s in FLAGS.sparsities],
        repeats=FLAGS.repeats,
        profile=FLAGS.profile,
        memory=FLAGS.memory,
        seed=FLAGS.seed,
    )
    print(format_table(results))
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
