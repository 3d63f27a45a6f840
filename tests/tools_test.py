"""tools/: inspect a saved embedded model and extract a level."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import mlp, vector_data

import elsa_tf
from elsa_tf import model_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import inspect_model  # noqa: E402


def test_inspect_and_extract_a_saved_model(tmp_path):
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    model_ops.finish_level(model)
    model.save(tmp_path / "m.keras")
    rows = inspect_model.run(
        str(tmp_path / "m.keras"),
        per_layer=True,
        extract_level=0,
        out=str(tmp_path / "level0.keras"),
    )
    assert rows[0]["status"] == "finished" and len(rows[0]["layers"]) == 2
    level0 = keras.saving.load_model(tmp_path / "level0.keras")
    x, _ = vector_data()
    np.testing.assert_array_equal(
        level0.predict(x, verbose=0), elsa_tf.extract(model, 0).predict(x, verbose=0)
    )


def test_inspect_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="model='nope.keras'"):
        inspect_model.run("nope.keras")
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="out=None"):
        inspect_model.run(str(tmp_path / "m.keras"), extract_level=0)
    with pytest.raises(ValueError, match="level=5"):
        inspect_model.run(str(tmp_path / "m.keras"), extract_level=5, out="x.keras")
    assert not Path("x.keras").exists()
