"""tools/: inspect a saved embedded model and extract a level; the tools'
command lines, run as a user runs them (a new process)."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import mlp, vector_data

import elsa_tf
from elsa_tf import model_ops

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
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
    with pytest.raises(FileNotFoundError, match="--model_path='nope.keras'"):
        inspect_model.run("nope.keras")
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="out=None"):
        inspect_model.run(str(tmp_path / "m.keras"), extract_level=0)
    with pytest.raises(ValueError, match="level=5"):
        inspect_model.run(str(tmp_path / "m.keras"), extract_level=5, out="x.keras")
    assert not Path("x.keras").exists()


def _tool(name, *args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tools")
    model = elsa_tf.embed(mlp(), [0.75, 0.0])
    model_ops.finish_level(model)
    model.save(directory / "m.keras")
    (directory / "notes.txt").write_text("not a model")
    (directory / "fake.keras").write_text("not a zip archive")
    (directory / "export").mkdir()
    (directory / "export" / "old.tflite").write_bytes(b"old")
    return directory


@pytest.mark.parametrize("tool", ["export_tflite.py", "inspect_model.py"])
@pytest.mark.parametrize(
    "model_path, expected",
    [
        ("missing.keras", "No saved model at --model_path="),
        ("notes.txt", "--model_path must be a model saved with model.save"),
        ("fake.keras", "--model_path must be a model saved with model.save"),
        (".", "--model_path must be a model saved with model.save"),
    ],
)
def test_a_wrong_model_path_is_one_line(saved, tool, model_path, expected):
    result = _tool(tool, f"--model_path={saved / model_path}", f"--out={saved / 'new'}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"FATAL {expected}" + result.stderr.split(expected, 1)[1].rstrip("\n")
    ]
    assert not (saved / "new").exists()


def test_export_into_an_existing_directory_names_the_flag(saved):
    result = _tool(
        "export_tflite.py", f"--model_path={saved / 'm.keras'}", f"--out={saved}/export"
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "exists and is not empty: pass --overwrite" in line
    assert "overwrite=True" not in line
    assert (saved / "export" / "old.tflite").read_bytes() == b"old"


def test_export_prints_its_table_without_the_converter_log(saved):
    result = _tool(
        "export_tflite.py",
        f"--model_path={saved / 'm.keras'}",
        f"--out={saved / 'quiet'}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Quantization: float32\n")
    assert len(result.stdout.splitlines()) < 15
