"""Training cost of an embedded model: step time and peak memory.

Every figure is a ratio, or a side-by-side comparison, measured in one run:

* step time of the embedded model trained as a user trains it
  (`elsa_tf.fit`: a `FreezingOptimizer` and a `LevelScheduler` inside
  `model.fit`), over the plain Keras 3 model trained with plain `model.fit`
  and the same optimizer (Adam);
* the same with `sparsifier="dpf"` (Dynamic Pruning with Feedback: a
  straight-through masked forward pass in every step, masks every 16 steps);
* beside it, the same ratio for tfmot's `prune_low_magnitude` on the same
  architecture built with tf_keras (Keras 2), over the plain tf_keras model;
* where the embedded model's time goes: inside `elsa_tf.fit`, the callbacks
  before each step (the scheduler's mask updates) apart from the train
  function, steps with a mask update apart from steps without, and each
  level's start, first (traced) step and end; then a step-interleaved
  profile (one `train_on_batch` of each model per round, so that every model
  sees the same machine state) of the embedded model alone (masked), plus the
  `FreezingOptimizer`, at level 0 and at level 1 for both `shared` modes,
  and the plain model with frozen BatchNormalization;
* peak resident memory of a training run, embedded over plain, each measured
  in its own fresh process.

A step's time is the difference between consecutive `on_train_batch_end`
calls of a timer appended last, so it includes the callbacks run before the
step; the timer's `on_train_batch_begin`, run after every other callback's,
splits it in two. Wall time (`perf_counter`) is the headline; the process's
CPU time (`process_time`) is recorded beside it. The first epoch is warm-up
and is not measured, nor are steps that span two `fit` calls (so not the
first, traced step of a level under `elsa_tf.fit`: that is reported apart).
The "mean" columns leave out the first step of every epoch, where Keras
re-creates its data iterator (sometimes stalling for seconds). The pruning
schedule is active while measuring: every level prunes over its first 75% of
steps (the default `LevelSchedule`), and tfmot updates its masks as often
over its one ramp. Run-to-run noise on a small shared VM is about +-20% of a
median, so every configuration runs `--repeats` times in a rotated order and
the per-repeat ratios are printed; the interleaved profile is the precise
figure for per-step overheads.

Commands used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/training_cost.py \
        --out=/tmp/elsa_benchmarks/training_cost.json

A quick smoke run:

    python benchmarks/training_cost.py --archs=mlp \
        --steps_per_epoch=8 --repeats=1 --nomemory
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
import re
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _output import write_json
from absl import app, flags  # noqa: E402

ARCHS = ("cnn", "mlp", "bert")
# keras_hub models exist in Keras 3 only: no tf_keras / tfmot side for them.
KERAS3_ONLY = ("bert",)
# The keras_hub encoder: BERT at a small size, built from constructor
# arguments (never from_preset, which downloads).
BERT = dict(
    vocabulary_size=1000,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    intermediate_dim=256,
    max_sequence_length=32,
)
# Timed for every architecture, in this order, once per repeat.
MAIN_CONFIGS = ("keras", "elsa_fit", "elsa_dpf", "tf_keras", "tfmot")
# What each configuration is compared with.
BASELINE = {"tf_keras": "tf_keras", "tfmot": "tf_keras"}
LABELS = {
    "keras": "Keras 3 plain model, Adam",
    "elsa_fit": "elsa_tf.fit (FreezingOptimizer + LevelScheduler)",
    "elsa_dpf": 'elsa_tf.fit, sparsifier="dpf" (mask every 16 steps)',
    "tf_keras": "tf_keras plain model, Adam",
    "tfmot": "tfmot prune_low_magnitude + UpdatePruningStep",
}

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "archs", list(ARCHS), "Architectures to measure: cnn, mlp, bert (keras_hub)."
)
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer(
    "steps_per_epoch", 100, "Steps per epoch; the random data hold this many batches."
)
flags.DEFINE_integer("epochs_per_level", 2, "Epochs per ELSA level.")
flags.DEFINE_list("sparsities", ["0.9", "0.5", "0.0"], "ELSA level sparsities.")
flags.DEFINE_integer(
    "repeats", 4, "Repeats of every configuration, in rotated order; steps are pooled."
)
flags.DEFINE_bool("profile", True, "Also run the step-interleaved profile.")
flags.DEFINE_integer("rounds", 60, "Measured rounds of the step-interleaved profile.")
flags.DEFINE_bool("memory", True, "Also measure peak memory in fresh processes.")
flags.DEFINE_integer("seed", 0, "Seed for the data and the models.")
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


# -- models and data -------------------------------------------------------------------


def _layers(keras_module, arch):
    """The benchmark architecture as layers of `keras_module` (Keras 3 or 2)."""
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
    return [
        L.Dense(300, activation="relu", name="fc1"),
        L.Dense(100, activation="relu", name="fc2"),
        L.Dense(10, name="logits"),
    ]


def _input_shape(arch):
    return (28, 28, 1) if arch == "cnn" else (784,)


def _build(keras_module, arch, seed):
    keras_module.utils.set_random_seed(seed)
    if arch == "bert":
        import keras_hub

        backbone = keras_hub.models.BertBackbone(**BERT)
        return keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=10, preprocessor=None
        )
    return keras_module.Sequential(
        [keras_module.Input(_input_shape(arch)), *_layers(keras_module, arch)],
        name=arch,
    )


def _head(x, n):
    """The first `n` examples of an array or of a dict of arrays."""
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def _data(arch, n, seed):
    rng = np.random.default_rng(seed)
    if arch == "bert":
        length = BERT["max_sequence_length"]
        x = {
            "token_ids": rng.integers(0, BERT["vocabulary_size"], (n, length)),
            "padding_mask": np.ones((n, length), "int32"),
            "segment_ids": np.zeros((n, length), "int32"),
        }
        return x, rng.integers(0, 10, size=n)
    x = rng.random((n, *_input_shape(arch)), dtype=np.float32)
    return x, rng.integers(0, 10, size=n)


def _schedule_steps(steps):
    """(begin, end, frequency) of elsa_tf's default schedule over `steps`."""
    import elsa_tf

    return elsa_tf.LevelSchedule().steps(steps)


# -- timing ----------------------------------------------------------------------------


class _PhaseTimerMixin:
    """Timestamps every training phase it sees, across one or more `fit` calls.

    Appended last, its `on_train_batch_begin` runs after every other
    callback's, so a step splits into the callbacks run before it (the
    scheduler's mask update) and the train function itself.
    """

    def _init_timer(self):
        self.events = []  # (kind, fit call, global epoch, batch, wall s, cpu s)
        self._call = -1
        self._epoch = -1

    def _log(self, kind, batch=-1):
        self.events.append(
            (
                kind,
                self._call,
                self._epoch,
                batch,
                time.perf_counter(),
                time.process_time(),
            )
        )

    def on_train_begin(self, logs=None):
        self._call += 1
        self._log("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch += 1
        self._log("epoch_begin")

    def on_train_batch_begin(self, batch, logs=None):
        self._log("batch_begin", batch)

    def on_train_batch_end(self, batch, logs=None):
        self._log("batch_end", batch)

    def on_epoch_end(self, epoch, logs=None):
        self._log("epoch_end")

    def steps(self, warmup_epochs=1):
        """Measured steps, as arrays keyed by epoch, batch, wall, cpu, before, fn.

        A step runs from the previous batch end to its own batch end, in the
        same `fit` call; `before` is its part up to its own batch begin and
        `fn` the rest (ms).
        """
        rows = []
        last_end = None
        begin = None
        for kind, _, epoch, batch, wall, cpu in self.events:
            if kind == "train_begin":
                last_end = None
            elif kind == "batch_begin":
                begin = wall
            elif kind == "batch_end":
                if last_end is not None and epoch >= warmup_epochs:
                    w0, c0 = last_end
                    rows.append(
                        (
                            epoch,
                            batch,
                            (wall - w0) * 1e3,
                            (cpu - c0) * 1e3,
                            (begin - w0) * 1e3,
                            (wall - begin) * 1e3,
                        )
                    )
                last_end = (wall, cpu)
        keys = ("epoch", "batch", "wall", "cpu", "before", "fn")
        return {k: np.asarray(c) for k, c in zip(keys, zip(*rows))}

    def fit_call_phases(self):
        """Per `fit` call: ms from train begin to the first epoch begin, of
        the first step's train function (tracing included), and from the last
        batch end to the last epoch end."""
        out = []
        for call in sorted({e[1] for e in self.events}):
            ev = [e for e in self.events if e[1] == call]
            t = {}
            for kind, _, _, _, wall, _ in ev:
                t.setdefault(kind, wall)
            last_batch_end = max(e[4] for e in ev if e[0] == "batch_end")
            last_epoch_end = max(e[4] for e in ev if e[0] == "epoch_end")
            out.append(
                {
                    "start_ms": (t["epoch_begin"] - t["train_begin"]) * 1e3,
                    "first_step_ms": (t["batch_end"] - t["batch_begin"]) * 1e3,
                    "end_ms": (last_epoch_end - last_batch_end) * 1e3,
                }
            )
        return out


def _timer(callback_base):
    timer = type("PhaseTimer", (_PhaseTimerMixin, callback_base), {})()
    timer._init_timer()
    return timer


# -- one training run ------------------------------------------------------------------


def _train(config, arch, x, y, *, batch_size, epochs_per_level, sparsities, seed):
    """Trains one configuration; returns (timer, wall seconds, extras)."""
    num_epochs = epochs_per_level * len(sparsities)
    fit_kwargs = dict(batch_size=batch_size, verbose=0, shuffle=False)
    if config in ("tf_keras", "tfmot"):
        return _train_tf_keras(
            config,
            arch,
            x,
            y,
            num_epochs,
            epochs_per_level,
            fit_kwargs,
            seed,
            max(sparsities),
        )

    import keras

    import elsa_tf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _build(keras, arch, seed)
    timer = _timer(keras.callbacks.Callback)
    extra = {}
    if config == "keras":
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        t0 = time.perf_counter()
        model.fit(x, y, epochs=num_epochs, callbacks=[timer], **fit_kwargs)
        return timer, time.perf_counter() - t0, extra

    sparsifier = "dpf" if config == "elsa_dpf" else "gradual_magnitude"
    model = elsa_tf.embed(
        model, sparsities=list(sparsities), shared="freeze", sparsifier=sparsifier
    )
    if config in ("elsa_fit", "elsa_dpf"):
        t0 = time.perf_counter()
        elsa_tf.fit(
            model,
            x,
            y,
            epochs_per_level=epochs_per_level,
            optimizer=keras.optimizers.Adam(1e-3),
            loss=loss,
            callbacks=[timer],
            **fit_kwargs,
        )
        wall = time.perf_counter() - t0
        extra["achieved_sparsity"] = [
            round(row["achieved_sparsity"], 4) for row in elsa_tf.summary(model)
        ]
        return timer, wall, extra

    raise ValueError(f"Unknown configuration {config!r}")


def _train_tf_keras(
    config, arch, x, y, num_epochs, epochs_per_level, fit_kwargs, seed, sparsity
):
    import tf_keras

    model = _build(tf_keras, arch, seed)
    timer = _timer(tf_keras.callbacks.Callback)
    callbacks = [timer]
    extra = {}
    if config == "tfmot":
        import tensorflow_model_optimization as tfmot

        steps_per_epoch = len(x) // fit_kwargs["batch_size"]
        # One ramp over the run, updating masks as often as an ELSA level does.
        _, _, frequency = _schedule_steps(epochs_per_level * steps_per_epoch)
        begin, end, _ = _schedule_steps(num_epochs * steps_per_epoch)
        end = begin + (end - begin) // frequency * frequency
        model = tfmot.sparsity.keras.prune_low_magnitude(
            model,
            pruning_schedule=tfmot.sparsity.keras.PolynomialDecay(
                initial_sparsity=0.0,
                final_sparsity=sparsity,
                begin_step=begin,
                end_step=end,
                frequency=frequency,
            ),
        )
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), timer]
        extra["tfmot_schedule"] = (begin, end, frequency)
    model.compile(
        optimizer=tf_keras.optimizers.Adam(1e-3),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    t0 = time.perf_counter()
    model.fit(x, y, epochs=num_epochs, callbacks=callbacks, **fit_kwargs)
    return timer, time.perf_counter() - t0, extra


def _mask_update_steps(config, steps, extra, steps_per_epoch, epochs_per_level):
    """Boolean array: which measured steps ran a mask update."""
    if config == "elsa_fit":
        begin, end, frequency = _schedule_steps(epochs_per_level * steps_per_epoch)
        step = (steps["epoch"] % epochs_per_level) * steps_per_epoch + steps["batch"]
    elif config == "elsa_dpf":
        # Every 16 steps of a level, from its first pruning step to its end.
        begin, _, _ = _schedule_steps(epochs_per_level * steps_per_epoch)
        end, frequency = epochs_per_level * steps_per_epoch, 16
        step = (steps["epoch"] % epochs_per_level) * steps_per_epoch + steps["batch"]
    elif config == "tfmot":
        begin, end, frequency = extra["tfmot_schedule"]
        step = steps["epoch"] * steps_per_epoch + steps["batch"]
    else:
        return np.zeros(len(steps["batch"]), bool)
    return (step >= begin) & (step <= end) & ((step - begin) % frequency == 0)


# -- profile: where an embedded step's time goes ---------------------------------------


def _profile_models(arch, x, y, batch_size, sparsities, seed):
    """The models the step-interleaved profile compares, compiled, by name."""
    import keras

    import elsa_tf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def adam():
        return keras.optimizers.Adam(1e-3)

    def embedded(shared="freeze", level=0):
        model = elsa_tf.embed(
            _build(keras, arch, seed), sparsities=list(sparsities), shared=shared
        )
        if level:
            # Finish the earlier levels on two batches, through the public API.
            elsa_tf.fit(
                model,
                _head(x, 2 * batch_size),
                y[: 2 * batch_size],
                levels=list(range(level)),
                epochs_per_level=1,
                optimizer=adam(),
                loss=loss,
                batch_size=batch_size,
                verbose=0,
            )
        return model

    models = {}
    models["keras"] = _build(keras, arch, seed)
    models["keras"].compile(optimizer=adam(), loss=loss)
    models["masked"] = embedded()
    models["masked"].compile(optimizer=adam(), loss=loss)
    for name, shared, level in (
        ("freezing_l0", "freeze", 0),
        ("freezing_l1", "freeze", 1),
        ("per_level_l1", "per_level", 1),
    ):
        models[name] = embedded(shared, level)
        models[name].compile(optimizer=elsa_tf.FreezingOptimizer(adam()), loss=loss)
        # Train on the raw weights, as under LevelScheduler (elsa_tf.fit).
        elsa_tf.model_ops.set_raw_training(models[name], True)
    bn = keras.layers.BatchNormalization
    if any(isinstance(layer, bn) for layer in models["keras"].layers):
        # What level >= 1 of shared="freeze" does to normalization layers.
        models["keras_bn_frozen"] = _build(keras, arch, seed)
        for layer in models["keras_bn_frozen"].layers:
            if isinstance(layer, bn):
                layer.trainable = False
        models["keras_bn_frozen"].compile(optimizer=adam(), loss=loss)
    return models


PROFILE_LABELS = {
    "keras": "Keras 3 plain model, Adam",
    "masked": "embedded, plain Adam (masked training, no scheduler), level 0",
    "freezing_l0": "embedded, FreezingOptimizer, level 0",
    "freezing_l1": "embedded shared=freeze, FreezingOptimizer, level 1",
    "per_level_l1": "embedded shared=per_level, FreezingOptimizer, level 1",
    "keras_bn_frozen": "Keras 3 plain model, BatchNormalization frozen",
}


def _interleaved_profile(
    arch, x, y, *, batch_size, sparsities, seed, rounds, warmup=10
):
    """Round-robin `train_on_batch` over the models: one step of each per round.

    Every model sees the same machine state within a round, so the per-round
    ratios cancel the drift and contention that dominate separate runs.
    """
    models = _profile_models(arch, x, y, batch_size, sparsities, seed)
    xb, yb = _head(x, batch_size), y[:batch_size]
    times = {name: [] for name in models}
    for r in range(warmup + rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            model.train_on_batch(xb, yb)  # returns numpy logs: the step has finished
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    base = np.asarray(times["keras"])
    return {
        name: {
            "median_ms": float(np.median(t)),
            "ratio": float(np.median(t) / np.median(base)),
            "paired_ratio": float(np.median(np.asarray(t) / base)),
        }
        for name, t in times.items()
    }


# -- memory: one fresh process per configuration ---------------------------------------


def _proc_status_mib(key):
    """A `/proc/self/status` figure in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _max_rss_mib():
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux); returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_worker(config, arch, steps_per_epoch, train_kwargs):
    """Runs in a fresh process: peak memory of one training run."""
    import keras  # noqa: F401  (imports are in the baseline, not the training)
    import tensorflow  # noqa: F401

    import elsa_tf  # noqa: F401

    x, y = _data(
        arch, steps_per_epoch * train_kwargs["batch_size"], train_kwargs["seed"]
    )
    rss_before = _proc_status_mib("VmRSS")
    reset = _reset_peak_rss()
    _train(config, arch, x, y, **train_kwargs)
    hwm = _proc_status_mib("VmHWM")
    return {
        "ru_maxrss_mib": _max_rss_mib(),
        "vm_hwm_mib": hwm,
        "rss_before_training_mib": rss_before,
        # Peak during training above the RSS just before it.
        "training_peak_added_mib": hwm - rss_before if reset and hwm else None,
        "imported_tfmot": "tensorflow_model_optimization" in sys.modules,
    }


def _tfmot_import_worker():
    """Runs in a fresh process: what importing tfmot adds to a Keras 3 process."""
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    before = _proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    import tensorflow_model_optimization  # noqa: F401

    seconds = time.perf_counter() - t0
    after = _proc_status_mib("VmRSS")
    return {
        "import_s": seconds,
        "added_rss_mib": None if before is None else after - before,
    }


def _in_fresh_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _memory(arch, steps_per_epoch, train_kwargs):
    out = {
        config: _in_fresh_process(
            _memory_worker, config, arch, steps_per_epoch, train_kwargs
        )
        for config in ("keras", "elsa_fit")
    }
    plain, elsa = out["keras"], out["elsa_fit"]
    out["ru_maxrss_ratio"] = elsa["ru_maxrss_mib"] / plain["ru_maxrss_mib"]
    if plain["training_peak_added_mib"] and elsa["training_peak_added_mib"]:
        out["training_peak_added_ratio"] = (
            elsa["training_peak_added_mib"] / plain["training_peak_added_mib"]
        )
    return out


# -- the benchmark ---------------------------------------------------------------------


def _summarize(runs, config, steps_per_epoch, epochs_per_level, num_levels):
    """Pools the measured steps of a configuration's repeats into statistics."""
    cols = {
        k: []
        for k in ("wall", "cpu", "before", "fn", "update", "near", "start", "level")
    }
    for timer, _, extra in runs:
        s = timer.steps()
        for k in ("wall", "cpu", "before", "fn"):
            cols[k].append(s[k])
        update = _mask_update_steps(config, s, extra, steps_per_epoch, epochs_per_level)
        cols["update"].append(update)
        # Keras runs batch-end callbacks in a background thread, so part of a
        # mask update's time shows up in the timer's step before it: steps
        # next to an update are not quiet.
        cols["near"].append(update | np.roll(update, 1) | np.roll(update, -1))
        cols["start"].append(np.diff(s["epoch"], prepend=s["epoch"][0] - 1) != 0)
        cols["level"].append(s["epoch"] // epochs_per_level)
    c = {k: np.concatenate(v) for k, v in cols.items()}
    inside, update = ~c["start"], c["update"]
    quiet = ~c["near"] & inside
    # What the mask updates add, over quiet steps: every in-epoch step's time
    # above the quiet median, per update.
    update_cost = (
        (c["wall"][inside].sum() - np.median(c["wall"][quiet]) * inside.sum())
        / update.sum()
        if update.any()
        else None
    )
    phases = [p for timer, _, _ in runs for p in timer.fit_call_phases()]
    return {
        "steps": int(len(c["wall"])),
        "mask_update_steps": int(update.sum()),
        "median_ms": float(np.median(c["wall"])),
        "median_cpu_ms": float(np.median(c["cpu"])),
        "mean_ms": float(np.mean(c["wall"][inside])),
        "mean_cpu_ms": float(np.mean(c["cpu"][inside])),
        "per_repeat_median_ms": [
            float(np.median(t.steps()["wall"])) for t, _, _ in runs
        ],
        "per_level_median_ms": [
            float(np.median(c["wall"][c["level"] == k]))
            if (c["level"] == k).any()
            else None
            for k in range(num_levels)
        ],
        # Where a step's time goes.
        "median_no_update_ms": float(np.median(c["wall"][quiet])),
        "median_fn_no_update_ms": float(np.median(c["fn"][quiet])),
        "mean_before_no_update_ms": float(np.mean(c["before"][quiet])),
        "mean_before_update_ms": (
            float(np.mean(c["before"][update])) if update.any() else None
        ),
        "median_fn_update_ms": float(np.median(c["fn"][update]))
        if update.any()
        else None,
        "mean_before_per_step_ms": float(np.mean(c["before"][inside])),
        "ms_per_mask_update": None if update_cost is None else float(update_cost),
        # Per fit call: start, first (traced) step, end; over all repeats.
        "fit_calls": len(phases) // len(runs),
        "fit_start_ms": float(np.mean([p["start_ms"] for p in phases])),
        "first_step_ms": float(np.mean([p["first_step_ms"] for p in phases])),
        "fit_end_ms": float(np.mean([p["end_ms"] for p in phases])),
        "wall_s": float(np.median([wall_s for _, wall_s, _ in runs])),
    }


_RATIO_KEYS = (
    "median_ms",
    "median_cpu_ms",
    "mean_ms",
    "mean_cpu_ms",
    "median_no_update_ms",
    "median_fn_no_update_ms",
    "wall_s",
)


def _ratios(stats):
    out = {}
    for config, s in stats.items():
        base = stats[BASELINE.get(config, "keras")]
        out[config] = {k: s[k] / base[k] for k in _RATIO_KEYS}
        pairs = zip(s["per_repeat_median_ms"], base["per_repeat_median_ms"])
        out[config]["per_repeat_median_ratio"] = [a / b for a, b in pairs]
    return out


def run(
    archs=ARCHS,
    *,
    batch_size: int = 128,
    steps_per_epoch: int = 100,
    epochs_per_level: int = 2,
    sparsities=(0.9, 0.5, 0.0),
    repeats: int = 3,
    profile: bool = True,
    rounds: int = 60,
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
        repeats: repeats of every configuration, in a rotated order each time
            (this machine's run-to-run noise is larger than the effects).
        profile: also run the step-interleaved profile of the embedded model's
            parts.
        rounds: measured rounds of the step-interleaved profile.
        memory: also measure peak memory, each configuration in a fresh process.
        seed: seed for data and models.

    Returns:
        A JSON-serializable dict: the configuration and, per architecture, the
        step statistics of every configuration, their ratios to the baseline
        and the memory figures.

    Raises:
        ValueError: for an unknown architecture.
    """
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"archs must be among {ARCHS}. Received: archs={list(archs)}")
    sparsities = tuple(float(s) for s in sparsities)
    train_kwargs = dict(
        batch_size=batch_size,
        epochs_per_level=epochs_per_level,
        sparsities=sparsities,
        seed=seed,
    )
    results = {
        "config": {
            "archs": list(archs),
            "steps_per_epoch": steps_per_epoch,
            "repeats": repeats,
            "profile": profile,
            "rounds": rounds,
            "memory": memory,
            **train_kwargs,
            "sparsities": list(sparsities),
            "cpu_count": os.cpu_count(),
        },
        "archs": {arch: {} for arch in archs},
    }
    # Memory first: a spawned child's ru_maxrss starts at its parent's RSS,
    # which stays small until this process imports TensorFlow below.
    if memory:
        for arch in archs:
            results["archs"][arch]["memory"] = _memory(
                arch, steps_per_epoch, train_kwargs
            )
        results["tfmot_import"] = _in_fresh_process(_tfmot_import_worker)
    begin, end, frequency = _schedule_steps(epochs_per_level * steps_per_epoch)
    results["config"]["mask_updates_per_level"] = len(range(begin, end + 1, frequency))
    for arch in archs:
        configs = tuple(
            c for c in MAIN_CONFIGS if arch not in KERAS3_ONLY or c not in BASELINE
        )
        x, y = _data(arch, steps_per_epoch * batch_size, seed)
        runs = {c: [] for c in configs}
        for r in range(repeats):
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                runs[config].append(_train(config, arch, x, y, **train_kwargs))
        stats = {
            c: _summarize(
                runs[c], c, steps_per_epoch, epochs_per_level, len(sparsities)
            )
            for c in configs
        }
        res = results["archs"][arch]
        res["steps"] = stats
        res["ratios"] = _ratios(stats)
        res["achieved_sparsity"] = runs["elsa_fit"][0][2]["achieved_sparsity"]
        if profile:
            res["interleaved_profile"] = _interleaved_profile(
                arch,
                x,
                y,
                batch_size=batch_size,
                sparsities=sparsities,
                seed=seed,
                rounds=rounds,
            )
    return results


# -- printing --------------------------------------------------------------------------


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def format_tables(results) -> str:
    """The results as markdown tables."""
    cfg = results["config"]
    lines = [
        f"Batch {cfg['batch_size']}, {cfg['steps_per_epoch']} steps/epoch, "
        f"{cfg['epochs_per_level']} epochs/level, sparsities {cfg['sparsities']} "
        f"({cfg['mask_updates_per_level']} mask updates/level), {cfg['repeats']} "
        f"repeat(s) in rotated order, pooled; {cfg['cpu_count']} CPUs. Each ratio "
        "is over the plain model of the same Keras (tfmot: tf_keras; the rest: "
        "Keras 3), measured in this run. Mean: steps inside an epoch only.",
        "",
        "| arch | configuration | median step ms | **ratio** | per-repeat ratios "
        "| median CPU ms | CPU ratio | mean step ms | mean ratio | wall s "
        "| wall ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    archs = {a: r for a, r in results["archs"].items() if "steps" in r}
    for arch, res in archs.items():
        for config, s in res["steps"].items():
            r = res["ratios"][config]
            repeats = ", ".join(f"{v:.2f}" for v in r["per_repeat_median_ratio"])
            lines.append(
                f"| {arch} | {LABELS[config]} | {s['median_ms']:.2f} | "
                f"**{r['median_ms']:.3f}** | {repeats} | {s['median_cpu_ms']:.1f} | "
                f"{r['median_cpu_ms']:.3f} | {s['mean_ms']:.2f} | {r['mean_ms']:.3f} | "
                f"{s['wall_s']:.1f} | {r['wall_s']:.3f} |"
            )
    lines += [
        "",
        "Where the time goes. A step = callbacks before it (mask updates run here) "
        "+ the train function. Quiet steps: no mask update in the step nor in the "
        "steps next to it (Keras's batch-end callbacks run in a background "
        "thread, so a timer splits an update over two steps), not first in an "
        "epoch. Cost of a mask update: the in-epoch steps' time above the quiet "
        "median, per update. Per fit call: start = train begin to first epoch "
        "begin; first step = its train function, tracing included; end = last "
        "batch end to last epoch end (level finishing).",
        "",
        "| arch | configuration | quiet step ms (**ratio**) | train fn ms, quiet "
        "(ratio) | callbacks before step ms: quiet / update | train fn ms, "
        "update steps | update steps / measured | ms per mask update | callbacks "
        "ms per step, amortized | per-level median ms | fit calls | start ms | "
        "first step ms | end ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, res in archs.items():
        for config, s in res["steps"].items():
            r = res["ratios"][config]
            levels = ", ".join(_fmt(v, ".1f") for v in s["per_level_median_ms"])
            lines.append(
                f"| {arch} | {LABELS[config]} | {s['median_no_update_ms']:.2f} "
                f"(**{r['median_no_update_ms']:.3f}**) | "
                f"{s['median_fn_no_update_ms']:.2f} "
                f"({r['median_fn_no_update_ms']:.3f}) | "
                f"{s['mean_before_no_update_ms']:.3f} / "
                f"{_fmt(s['mean_before_update_ms'])} | "
                f"{_fmt(s['median_fn_update_ms'])} | {s['mask_update_steps']} / "
                f"{s['steps']} | {_fmt(s['ms_per_mask_update'], '.1f')} | "
                f"{s['mean_before_per_step_ms']:.2f} | {levels} | "
                f"{s['fit_calls']} | {s['fit_start_ms']:.0f} | "
                f"{s['first_step_ms']:.0f} | {s['fit_end_ms']:.0f} |"
            )
    profiled = {a: r for a, r in archs.items() if "interleaved_profile" in r}
    if profiled:
        lines += [
            "",
            f"Step-interleaved profile: one train_on_batch of each model per round, "
            f"{cfg['rounds']} rounds after 10 of warm-up, same batch. Ratio of "
            "medians, and median of the per-round ratios (robust to drift).",
            "",
            "| arch | model | median ms | ratio | paired ratio |",
            "|---|---|---|---|---|",
        ]
        for arch, res in profiled.items():
            for name, p in res["interleaved_profile"].items():
                lines.append(
                    f"| {arch} | {PROFILE_LABELS[name]} | {p['median_ms']:.2f} | "
                    f"{p['ratio']:.3f} | **{p['paired_ratio']:.3f}** |"
                )
    memory = {a: r["memory"] for a, r in results["archs"].items() if "memory" in r}
    if memory:
        lines += [
            "",
            "Peak memory of one training run (elsa_tf.fit vs plain model.fit), each "
            "in a fresh process. ru_maxrss includes the TensorFlow import; "
            "'training peak' is the peak above the RSS just before training (VmHWM).",
            "",
            "| arch | plain ru_maxrss MiB | embedded ru_maxrss MiB | **ratio** "
            "| plain training peak MiB | embedded training peak MiB | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for arch, m in memory.items():
            p, e = m["keras"], m["elsa_fit"]
            lines.append(
                f"| {arch} | {p['ru_maxrss_mib']:.0f} | {e['ru_maxrss_mib']:.0f} | "
                f"**{m['ru_maxrss_ratio']:.3f}** | "
                f"{_fmt(p['training_peak_added_mib'], '.0f')} | "
                f"{_fmt(e['training_peak_added_mib'], '.0f')} | "
                f"{_fmt(m.get('training_peak_added_ratio'))} |"
            )
    if "tfmot_import" in results:
        t = results["tfmot_import"]
        lines += [
            "",
            "The embedded run imports tfmot (and with it tf_keras) when its first "
            f"level starts: that alone adds {_fmt(t['added_rss_mib'], '.0f')} MiB "
            f"RSS and {t['import_s']:.1f} s to a Keras 3 process.",
        ]
    for arch, res in archs.items():
        lines.append(
            f"{arch}: achieved sparsity per level after elsa_tf.fit: "
            f"{res['achieved_sparsity']}."
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
        rounds=FLAGS.rounds,
        memory=FLAGS.memory,
        seed=FLAGS.seed,
    )
    print(format_tables(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
