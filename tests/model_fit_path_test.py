"""The plain `model.fit` path: misuse is reported, the README example runs."""

import re
import warnings

import keras
import pytest
from conftest import LOSS, mlp, run_readme_block, vector_data

import elsa_tf
from elsa_tf import elsa_model


def _compiled(sparsities=(0.5, 0.0)):
    model = elsa_tf.embed(mlp(), sparsities=list(sparsities))
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    return model


def _fit(model, epochs, **kwargs):
    x, y = vector_data(n=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_too_few_epochs_warn_naming_the_unfinished_level():
    model = _compiled()
    messages = _fit(model, 3, callbacks=[elsa_tf.LevelScheduler(epochs_per_level=2)])
    assert any(
        "ends 1 of 2 epochs into level 1" in m and "epochs=4" in m for m in messages
    ), messages
    assert elsa_tf.summary(model)[1]["status"] != "finished"


def test_too_many_epochs_warn_and_stop_after_the_last_level():
    model = _compiled()
    messages = _fit(model, 7, callbacks=[elsa_tf.LevelScheduler(epochs_per_level=2)])
    assert any("3 epochs more" in m and "after epoch 4" in m for m in messages), (
        messages
    )


def test_exact_epochs_and_elsa_fit_draw_no_warning():
    model = _compiled()
    messages = _fit(model, 4, callbacks=[elsa_tf.LevelScheduler(epochs_per_level=2)])
    assert messages == []
    x, y = vector_data(n=32)
    model = elsa_tf.embed(mlp(), sparsities=[0.5, 0.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elsa_tf.fit(
            model,
            x,
            y,
            epochs_per_level=1,
            optimizer="adam",
            loss=LOSS,
            batch_size=16,
            verbose=0,
            recalibration_data=x,
        )
    assert [w for w in caught if issubclass(w.category, UserWarning)] == []


def test_fit_without_level_scheduler_warns():
    model = elsa_tf.embed(mlp(), sparsities=[0.5, 0.0])
    model.compile(optimizer="adam", loss=LOSS)
    assert elsa_model.UNSCHEDULED_TRAINING in _fit(model, 1)
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    assert elsa_model.UNSCHEDULED_TRAINING in _fit(model, 1)


def test_freezing_optimizer_refuses_a_variable_no_embedded_model_owns():
    model = mlp()
    model.compile(optimizer=elsa_tf.FreezingOptimizer("adam"), loss=LOSS)
    with pytest.raises(ValueError, match="no embedded model owns.*'mlp/hidden/kernel'"):
        _fit(model, 1)


def test_freezing_optimizer_takes_a_name_and_refuses_base_arguments():
    assert isinstance(
        elsa_tf.FreezingOptimizer("sgd").inner_optimizer, keras.optimizers.SGD
    )
    with pytest.raises(ValueError, match=r"Received: \{'clipnorm': 1.0\}"):
        elsa_tf.FreezingOptimizer(keras.optimizers.Adam(), clipnorm=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        elsa_tf.FreezingOptimizer("adam", weight_decay=0.1)


def test_fit_prints_a_header_per_level_in_keras_style(capsys):
    x, y = vector_data(n=32)
    model = elsa_tf.embed(mlp(), sparsities=[0.75, 0.5, 0.0])
    elsa_tf.fit(model, x, y, epochs_per_level=2, optimizer="adam", loss=LOSS, verbose=2)
    out = capsys.readouterr().out
    headers = re.findall(r"^Level (\d) of 3: target sparsity ([\d.]+)%", out, re.M)
    assert headers == [("0", "75.00"), ("1", "50.00"), ("2", "0.00")]
    # The header comes before the level's first epoch line.
    assert out.index("Level 1 of 3") < out.index("Epoch 1/2", out.index("Level 1"))
    elsa_tf.fit(
        elsa_tf.embed(mlp(), sparsities=[0.5, 0.0]),
        x,
        y,
        epochs_per_level=1,
        optimizer="adam",
        loss=LOSS,
        verbose=0,
    )
    assert "Level" not in capsys.readouterr().out


def test_readme_model_fit_example_runs_verbatim_in_a_new_process(tmp_path):
    result = run_readme_block("model-fit", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Level 2 of 3" in result.stdout
    rows = re.findall(
        r"^\s+(\d)\s+([\d.]+)%\s+([\d.]+)%.*finished", result.stdout, re.M
    )
    assert [r[:2] for r in rows] == [("0", "90.00"), ("1", "50.00"), ("2", "0.00")]
    # Per-layer selection rounds each layer's kept count.
    assert all(abs(float(r[1]) - float(r[2])) < 0.05 for r in rows), rows
    assert "without elsa_tf.LevelScheduler" not in result.stderr
    assert "epochs more" not in result.stderr
