"""Polarized channel gates: the math, the training run, and the core invariants."""

import doctest
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_readme_block

import elsa_tf
from elsa_tf import (
    channel_levels,
    gates,
    levels,
    model_ops,
    polarized_gates,
    sparsifiers,
)
from elsa_tf.experiments import config as config_lib

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPARSITIES = [0.6, 0.3, 0.0]
EPOCHS = 5  # 8 steps each: 40 steps a level, 10 after its ramp


def conv_conv():
    """Conv 6 -> BN -> ReLU -> Conv 5 -> BN -> ReLU -> GAP -> Dense 3, 8x8x1."""
    inputs = keras.Input((8, 8, 1))
    h = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    h = L.Conv2D(5, 3, padding="same", name="c2")(h)
    h = L.BatchNormalization(name="bn2")(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(3, name="fc")(h), name="conv_conv")


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x[:, :4, :4, 0].sum(axis=(1, 2)) > 0).astype("int32") + (
        x[:, 4:, 4:, 0].sum(axis=(1, 2)) > 0
    ).astype("int32")
    return x, y


def embed(**options):
    return elsa_tf.embed(
        conv_conv(),
        SPARSITIES,
        sparsifier=elsa_tf.PolarizedGates(granularity="channel", **options),
        shared="per_level_statistics",
    )


def free_gates(model):
    """Per group, the gates of the channels the current level may still drop."""
    codes = model.channel_codes()
    gamma = model.gates.numpy()
    offsets = np.cumsum([0] + [c.size for c in codes])
    return [
        gamma[a:b][c >= model.current_level]
        for a, b, c in zip(offsets[:-1], offsets[1:], codes)
    ]


class GatesBeforeHardening(keras.callbacks.Callback):
    """The free gates after every step; the last of a level is what its
    hardening sees (LevelScheduler hardens at the level's last epoch end)."""

    def __init__(self, model):
        super().__init__()
        self.embedded = model
        self.last = None

    def on_train_batch_end(self, batch, logs=None):
        self.last = free_gates(self.embedded)


@pytest.fixture(scope="module")
def trained():
    """One short run through every level; gates as each hardening saw them."""
    keras.utils.set_random_seed(0)
    model = embed()
    start = free_gates(model)
    return model, start, train_levels(model, *data())


def train_levels(model, x, y) -> list:
    """Trains every level in turn; the free gates each hardening saw."""
    seen = []
    for level in range(model.num_levels):
        callback = GatesBeforeHardening(model)
        elsa_tf.fit(
            model,
            x,
            y,
            levels=[level],
            epochs_per_level=EPOCHS,
            batch_size=8,
            optimizer=keras.optimizers.Adam(1e-2),
            loss=LOSS,
            verbose=0,
            callbacks=[callback],
        )
        seen.append(callback.last)
    return seen


# -- the pure math --------------------------------------------------------------


def test_docstring_examples():
    assert doctest.testmod(gates).failed == 0
    assert doctest.testmod(polarized_gates).failed == 0


def test_polarization_by_hand():
    # t * sum|g| - sum|g - mean|
    assert float(gates.polarization([1.0, 1.0, 0.0, 0.0], 1.0)) == 0.0
    assert float(gates.polarization([1.0, 0.0, 0.0, 0.0], 1.0)) == pytest.approx(-0.5)
    assert float(gates.polarization([0.5, 0.5], -2.0)) == pytest.approx(-2.0)
    assert float(gates.polarization([0.2, 0.6, 1.0], 0.0)) == pytest.approx(-0.8)
    for k in (0.25, 0.5, 0.75, 1.0):
        assert gates.kept_fraction(gates.polarization_t(k)) == pytest.approx(k)


@pytest.mark.parametrize("t", [-1.0, 0.0, 0.5, 1.0, 1.5])
def test_polarization_minimiser_keeps_half_minus_a_quarter_t(t):
    n = 8
    rho = 0.5 - t / 4
    # Over a grid of [0, 1]^4 the minimum is binary, with n * rho ones...
    grid = np.array(list(itertools.product([0.0, 0.25, 0.5, 0.75, 1.0], repeat=4)))
    values = [float(gates.polarization(g, t)) for g in grid]
    best = grid[int(np.argmin(values))]
    assert set(best.tolist()) <= {0.0, 1.0}
    assert abs(best.sum() - 4 * rho) <= 1
    # ...and over every binary vector of 8 it keeps floor(n rho) or one more.
    counts = []
    for ones in range(n + 1):
        g = np.array([1.0] * ones + [0.0] * (n - ones))
        counts.append(float(gates.polarization(g, t)))
    assert int(np.argmin(counts)) in (
        int(np.floor(n * rho)),
        int(np.floor(n * rho)) + 1,
    )


def test_share_penalty_is_the_distance_to_the_nearest_binary_gates():
    gamma = tf.constant([0.9, 0.2, 0.6, 0.0])
    # Keep 2: the two largest (0.9, 0.6) go to 1, the others to 0.
    assert float(gates.share_penalty(gamma, 2)) == pytest.approx(0.1 + 0.4 + 0.2)
    assert float(gates.share_penalty([1.0, 0.0, 1.0], 2)) == 0.0
    # Equal gates: the order decides which is kept.
    with tf.GradientTape() as tape:
        g = tf.Variable([1.0, 1.0, 1.0])
        penalty = gates.share_penalty(g, 1, order=[-0.5, 0.5, 0.0])
    np.testing.assert_allclose(tape.gradient(penalty, g), [1.0, 0.0, 1.0])


def test_undecided_count_and_gate_step():
    assert gates.undecided_count([np.array([0.0, 0.05, 0.06, 0.5]), [0.94, 0.95]]) == 3
    step = gates.gate_step(
        tf.constant([0.1, 0.5, 0.9]), tf.constant([1.0, 0.2, -1.0]), 0.5
    )
    np.testing.assert_allclose(step, [0.0, 0.4, 1.0])


def test_straight_through_forward_is_binary_and_gradient_reaches_gamma():
    gamma = tf.Variable([0.1, 0.49, 0.5, 0.8])
    with tf.GradientTape() as tape:
        gate = gates.straight_through(gamma)
        out = tf.reduce_sum(gate * tf.constant([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(gate, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(tape.gradient(out, gamma), [1.0, 2.0, 3.0, 4.0])


# -- the gated forward pass -------------------------------------------------------


def test_a_gate_off_computes_the_removed_channel_and_still_gets_a_gradient():
    model = embed()
    model_ops.prune_to(model, 0.3, step=1)  # a target, so the loss is on
    x, _ = data(16)
    model_ops.set_raw_training(model, True)
    gamma = model.gates.numpy()
    gamma[1] = 0.3  # channel 1 of c1 off
    model.gates.assign(gamma)
    with tf.GradientTape() as tape:
        gated = model(x, training=True)
    grad = tape.gradient(gated, model.gates.value).numpy()
    # The same model with channel 1's "out" slices (filter, bias, BN scale and
    # shift) zeroed and every gate on computes the same.
    zeroed = channel_levels.out_slices(
        [np.eye(6, dtype=bool)[1], np.zeros(5, bool)],
        model.channel_layout,
        [w.shape for w in model.prunable_weights],
    )
    for w, z in zip(model.prunable_weights, zeroed):
        w.assign(np.where(z, 0.0, w.numpy()))
    model.gates.assign(np.ones_like(gamma))
    np.testing.assert_allclose(model(x, training=True), gated, atol=1e-6)
    # Straight-through: every gate that is on gets the task's gradient. (An
    # off gate of a convolution -> BatchNormalization -> ReLU gets none: the
    # ReLU's slope at 0 is 0; see the next test for one that does.)
    assert np.all(np.delete(grad, 1)[:10] != 0)
    # Inference and extraction carry no gate.
    model_ops.set_raw_training(model, False)
    model.gates.assign(np.zeros_like(gamma))
    np.testing.assert_allclose(
        model.predict(x, verbose=0),
        elsa_tf.extract(model, 0).predict(x, verbose=0),
        atol=1e-6,
    )


def test_the_gradient_reaches_an_off_gate_where_its_channel_is_linear():
    base = keras.Sequential(
        [keras.Input((4,)), L.Dense(6, name="hidden"), L.Dense(2, name="out")]
    )
    model = elsa_tf.embed(
        base, [0.5], sparsifier="polarized_gates", granularity="channel"
    )
    model_ops.set_raw_training(model, True)
    model.gates.assign([0.2, 0.9, 0.9, 0.9, 0.9, 0.9])
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(out * tf.constant([1.0, -2.0]))
    grad = tape.gradient(loss, model.gates.value).numpy()
    # The forward pass is the binary gate's: unit 0 removed.
    layer = model.inner_model.get_layer
    kernel, bias = layer("hidden").kernel.numpy(), layer("hidden").bias.numpy()
    head, head_bias = layer("out").kernel.numpy(), layer("out").bias.numpy()
    h = x @ kernel[:, 1:] + bias[1:]
    np.testing.assert_allclose(out, h @ head[1:] + head_bias, rtol=1e-5, atol=1e-5)
    # d loss / d gate 0 = its unit's output times the gradient reaching it.
    unit = x @ kernel[:, 0] + bias[0]
    want = float(np.sum(unit[:, None] * head[0] * [1.0, -2.0]))
    assert grad[0] == pytest.approx(want, rel=1e-4)


def test_gates_are_not_weights_of_the_inner_model_and_are_clamped():
    model = embed()
    inner = {id(v) for v in model.inner_model.weights}
    assert id(model.gates) not in inner
    assert all(id(w) != id(model.gates) for w in model.prunable_weights)
    assert all(id(w) != id(model.gates) for w in model.shared_weights)
    optimizer = elsa_tf.FreezingOptimizer(keras.optimizers.SGD(1.0))
    model_ops.prune_to(model, 0.6, step=0)
    model.sync_level_state()
    optimizer.apply([tf.fill(model.gates.shape, -10.0)], [model.gates])
    np.testing.assert_array_equal(model.gates.numpy(), 1.0)
    # At a level that drops nothing, the gates are frozen.
    for _ in range(2):
        elsa_tf.finish_level(model)
    assert model.variable_rule(elsa_tf.constraints.GATE) == "frozen"


# -- a short training run -------------------------------------------------------


def test_gates_start_undecided_and_end_binary(trained):
    model, start, _ = trained
    # Not binary from the start: every gate is at its initial value.
    assert gates.undecided_count(start) == sum(g.size for g in start)
    assert all(np.all(g == polarized_gates.DEFAULT_INITIAL_VALUE) for g in start)
    undecided = [row["undecided_gates"] for row in elsa_tf.summary(model)]
    assert undecided == [0, 0, 0], (
        f"gates undecided when each level was hardened: {undecided}"
    )
    assert "undecided" in str(elsa_tf.summary(model))


def test_the_gates_own_kept_share_is_on_target_in_every_layer(trained):
    model, _, seen = trained
    codes = model.channel_codes()
    for level, (sparsity, free) in enumerate(zip(SPARSITIES, seen)):
        for group, gamma, c in zip(model.channel_layout, free, codes):
            frozen = int(np.count_nonzero(c < level))
            decided = frozen + int(np.count_nonzero(gamma >= gates.THRESHOLD))
            want = levels.keep_count(group.size, sparsity)
            assert abs(decided - want) <= 1, (level, group.layer, decided, want)
            # Both sides really were decided by the gates, not all on or off.
            if sparsity > 0:
                assert 0 < decided < group.size


def test_invariants_hold_with_gates(trained, tmp_path):
    model, _, _ = trained
    x, _ = data(16)
    codes = model.channel_codes()
    for level, sparsity in enumerate(SPARSITIES):
        kept = [c <= level for c in codes]
        # Exactly the target per layer, nested.
        assert [int(k.sum()) for k in kept] == [
            levels.keep_count(g.size, sparsity) for g in model.channel_layout
        ]
        if level:
            assert all(np.all((c <= level - 1) <= k) for c, k in zip(codes, kept))
        elsa_tf.set_level(model, level)
        embedded = model.predict(x, verbose=0)
        np.testing.assert_allclose(
            elsa_tf.extract(model, level).predict(x, verbose=0), embedded, atol=1e-6
        )
        np.testing.assert_allclose(
            elsa_tf.extract(model, level, physical=True).predict(x, verbose=0),
            embedded,
            atol=1e-5,
        )
    path = tmp_path / "gates.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.sparsifier == model.sparsifier
    for level in range(model.num_levels):
        elsa_tf.set_level(model, level)
        elsa_tf.set_level(loaded, level)
        np.testing.assert_array_equal(
            loaded.predict(x, verbose=0), model.predict(x, verbose=0)
        )


def test_attention_heads_are_gated_and_removed():
    """A sequence model whose attention heads are a channel group: the gates
    pick heads like filters, and the physical levels have fewer heads."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 3))
    h = L.Dense(8, name="embed")(inputs)
    h = L.Add()([h, L.MultiHeadAttention(5, 2, name="mha")(h, h)])
    h = L.GlobalAveragePooling1D()(L.Dense(6, activation="relu", name="ff")(h))
    model = elsa_tf.embed(
        keras.Model(inputs, L.Dense(3, name="fc")(h)),
        SPARSITIES,
        sparsifier=elsa_tf.PolarizedGates(granularity="channel"),
    )
    (heads,) = [g for g in model.channel_layout if g.layer == "mha"]
    assert heads.size == 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5, 3)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int32") + (x[:, 0, 1] > 0)
    seen = train_levels(model, x, y)
    index = model.channel_layout.index(heads)
    codes = model.channel_codes()[index]
    for level, free in enumerate(seen):
        decided = int(np.count_nonzero(codes < level)) + int(
            np.count_nonzero(free[index] >= gates.THRESHOLD)
        )
        want = levels.keep_count(5, SPARSITIES[level])
        assert abs(decided - want) <= 1, (level, decided, want)
    assert [row["undecided_gates"] for row in elsa_tf.summary(model)] == [0, 0, 0]
    sample = x[:8]
    for level, sparsity in enumerate(SPARSITIES):
        small = elsa_tf.extract(model, level, physical=True)
        assert small.get_layer("mha").num_heads == levels.keep_count(5, sparsity)
        elsa_tf.set_level(model, level)
        np.testing.assert_allclose(
            small.predict(sample, verbose=0),
            model.predict(sample, verbose=0),
            atol=1e-5,
        )


def test_a_custom_loop_trains_and_hardens_the_gates():
    x, y = data(32)
    model = embed()
    optimizer = elsa_tf.FreezingOptimizer(keras.optimizers.Adam(1e-2))

    @elsa_tf.function(model)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, model(xb, training=True)) + tf.add_n(model.losses)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)

    for step in range(8):
        elsa_tf.update_masks(model, step, 8)
        train_step(x[step * 4 : step * 4 + 4], y[step * 4 : step * 4 + 4])
    assert not np.all(model.gates.numpy() == model.sparsifier.initial_value)
    elsa_tf.finish_level(model)
    assert model.undecided_gates.numpy()[0] >= 0  # recorded at the hardening
    # The next level's gates start over; level 0 is its map, exactly on target.
    np.testing.assert_array_equal(model.gates.numpy(), 0.75)
    kept = model_ops.channel_keep(model, 0)
    assert [int(k.sum()) for k in kept.values()] == [
        levels.keep_count(g.size, SPARSITIES[0]) for g in model.channel_layout
    ]


def test_a_single_level():
    x, y = data(32)
    model = elsa_tf.embed(
        conv_conv(), [0.5], sparsifier="polarized_gates", granularity="channel"
    )
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=2,
        batch_size=8,
        optimizer="adam",
        loss=LOSS,
        verbose=0,
    )
    (row,) = elsa_tf.summary(model)
    assert row["status"] == "finished" and row["undecided_gates"] >= 0
    assert row["kept_channels"] == 3 + 2  # round(0.5 * 6), round(0.5 * 5)
    np.testing.assert_allclose(
        elsa_tf.extract(model, 0, physical=True).predict(x, verbose=0),
        model.predict(x, verbose=0),
        atol=1e-5,
    )


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: elsa_tf.PolarizedGates(), "granularity='channel'.*'weight'"),
        (
            lambda: elsa_tf.PolarizedGates(granularity="weight"),
            "Received: granularity='weight'",
        ),
        (
            lambda: elsa_tf.embed(conv_conv(), [0.5], sparsifier="polarized_gates"),
            "needs granularity='channel'.*granularity='weight'",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", strength=-1e-4),
            r"strength must be a number in \[0.0, inf\]. Received: strength=-0.0001",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", strength=np.nan),
            "strength=nan",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", share_strength=-1),
            "share_strength=-1",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", initial_value=0.3),
            r"initial_value must be a number in \[0.5, 1.0\]. .*initial_value=0.3",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", initial_value=1.5),
            "initial_value=1.5",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", gate_learning_rate=0),
            r"gate_learning_rate must be a number in \(0.0, inf\]",
        ),
        (
            lambda: elsa_tf.PolarizedGates(granularity="channel", selection="lamp"),
            "selection='lamp'",
        ),
        (
            lambda: sparsifiers.get(
                "polarized_gates", granularity="channel", block_shape=(4, 1)
            ),
            r"does not take options \['block_shape'\]",
        ),
        (
            lambda: elsa_tf.embed(
                conv_conv(),
                [0.9, 0.0],
                sparsifier="polarized_gates",
                granularity="channel",
            ),
            "sparsity 0.9 removes every channel of layer 'c2'",
        ),
    ],
)
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_select_channels_needs_the_gates():
    model = embed()
    with pytest.raises(ValueError, match="by their gates"):
        model.sparsifier.select_channels(
            [w.numpy() for w in model.prunable_weights],
            model.channel_codes(),
            model.channel_layout,
            0,
            0.6,
            None,
        )


def test_training_program_settings():
    config_lib.check_sparsifier_options("polarized_gates", "per_layer", "channel")
    with pytest.raises(ValueError, match="needs granularity='channel'"):
        config_lib.Config(sparsifier="polarized_gates")
    # Without a selection, gates get per_layer (LAMP does not apply to them).
    default = config_lib.Config(sparsifier="polarized_gates", granularity="channel")
    assert default.selection == "per_layer"
    assert config_lib.Config().selection == "lamp"
    with pytest.raises(ValueError, match=r"selection in \['per_layer', 'global'\]"):
        config_lib.Config(
            sparsifier="polarized_gates", granularity="channel", selection="lamp"
        )
    with pytest.raises(ValueError, match="granularity='block'"):
        config_lib.Config(granularity="block")
    config = config_lib.Config(
        sparsifier="polarized_gates", granularity="channel", selection="global"
    )
    assert config_lib.Config.from_dict(config.to_dict()) == config
    assert "polarized channel gates" in config_lib.method("elsa", config)


# -- round trips -------------------------------------------------------------------


def test_config_round_trip_keeps_every_argument():
    options = {
        "strength": 0.3,
        "share_strength": 0.4,
        "initial_value": 0.9,
        "gate_learning_rate": 2.0,
        "selection": "global",
        "granularity": "channel",
        "channel_norm": "l1",
        "update_interval": 3,
    }
    gated = elsa_tf.PolarizedGates(**options)
    assert gated.get_config() == options
    for again in (
        elsa_tf.PolarizedGates.from_config(gated.get_config()),
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(gated)
        ),
        sparsifiers.get(keras.saving.serialize_keras_object(gated)),
        sparsifiers.get("polarized_gates", **options),
    ):
        assert type(again) is elsa_tf.PolarizedGates
        assert again.get_config() == options
    model = elsa_tf.embed(
        conv_conv(), [0.5], sparsifier="polarized_gates", granularity="channel"
    )
    assert model.sparsifier == elsa_tf.PolarizedGates(granularity="channel")
    assert "PolarizedGates" in elsa_tf.__all__


def test_save_load_mid_level_keeps_the_gates_and_resumes(tmp_path):
    x, y = data()
    model = embed()
    model.compile(
        optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam(1e-2)), loss=LOSS
    )
    # One epoch of level 0's two: stopped mid-level, as an interrupted run is.
    with pytest.warns(UserWarning, match="left unfinished"):
        model.fit(
            x,
            y,
            epochs=1,
            batch_size=8,
            verbose=0,
            callbacks=[elsa_tf.LevelScheduler(2, levels=[0])],
        )
    assert model_ops.current_level(model) == 0
    assert not np.all(model.gates.numpy() == model.sparsifier.initial_value)
    path = tmp_path / "mid_level.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.sparsifier == model.sparsifier
    for name in ("gates", "gate_keep", "gate_order", "undecided_gates"):
        np.testing.assert_array_equal(
            getattr(loaded, name).numpy(), getattr(model, name).numpy()
        )
    elsa_tf.fit(
        loaded,
        x,
        y,
        initial_epoch=1,
        epochs_per_level=2,
        batch_size=8,
        optimizer=keras.optimizers.Adam(1e-2),
        loss=LOSS,
        verbose=0,
    )
    assert model_ops.current_level(loaded) == 3
    assert all(r["undecided_gates"] >= 0 for r in elsa_tf.summary(loaded))


@pytest.mark.slow
def test_the_training_program_trains_gates(tmp_path):
    """`elsa-train --sparsifier=polarized_gates --granularity=channel`, in a
    new process, as a user runs it; the saved model restores the gates."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    program = shutil.which("elsa-train") or str(
        Path(sys.executable).parent / "elsa-train"
    )
    result = subprocess.run(
        [
            program,
            f"--workdir={workdir}",
            "--sparsities=0.5,0.0",
            "--epochs_per_level=1",
            "--export_tflite=false",
            "--sparsifier=polarized_gates",
            "--granularity=channel",
            "--selection=per_layer",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "polarized channel gates" in (workdir / "report.json").read_text()
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keras, elsa_tf; "
            f"m = keras.saving.load_model({str(workdir / 'model.keras')!r}); "
            "print(type(m.sparsifier).__name__, m.granularity, m.gates.shape)",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert check.stdout.strip().endswith("PolarizedGates channel (112,)"), check.stderr


def test_readme_polarized_gates_example_runs_as_written(tmp_path):
    result = run_readme_block("polarized-gates", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "undecided" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "16"
