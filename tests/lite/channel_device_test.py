"""On-device tests of channel levels: numpy, elsa_tf.lite and a TFLite runtime.

`make_export.py` trains the digits CNN at channel granularity and exports it
to `CHANNEL/`: one physically narrower file per level and a channel bundle.
Here, without TensorFlow, every level is made from the bundle and compared
with its own file and with the Keras level.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from elsa_tf import lite
from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import _pairing

from .device_test import _RUN_EVERY_FILE
from .make_export import CHANNEL, CHANNEL_SPARSITIES, REFERENCE

LEVELS = range(len(CHANNEL_SPARSITIES))


@pytest.fixture(scope="module")
def export(exports):
    return exports / CHANNEL


def _run(content: bytes, x: np.ndarray) -> np.ndarray:
    return lite.runtime.predict(lite.runtime.interpreter(content), x)


def _file(export, level) -> bytes:
    row = lite.read_manifest(export)["levels"][level]
    return (export / row["file"]).read_bytes()


@pytest.mark.parametrize("level", LEVELS)
def test_a_level_made_from_the_bundle_is_its_file(export, reference, level):
    made = lite.materialize(export / "bundle.tflite", level)
    own = _file(export, level)
    # Every tensor has the level's shape (the made level keeps the bundle's
    # numbering: tensors are paired operator by operator).
    mapping = _pairing.pair_tensors(
        fb.read_model(made),
        fb.read_model(own),
        fb.read_operators(made),
        fb.read_operators(own),
    )
    made_shapes = [t.shape for t in fb.read_model(made).tensors]
    own_shapes = [t.shape for t in fb.read_model(own).tensors]
    assert sorted(set(mapping.values())) == list(range(len(own_shapes)))
    assert all(made_shapes[i] == own_shapes[j] for (_, i), j in mapping.items())
    got, want = _run(made, reference["x"]), _run(own, reference["x"])
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0)
    # And the Keras level, within the float32 export's tolerance.
    keras_level = reference[f"{CHANNEL}{level}"]
    np.testing.assert_allclose(got, keras_level, atol=1e-4 * np.abs(keras_level).max())


def test_levels_are_narrower_and_the_bundle_smaller_than_the_files(export):
    manifest = lite.read_manifest(export)
    rows, bundle = manifest["levels"], manifest["bundle"]
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)
    assert [r["kept_channels"] for r in rows] == sorted(
        r["kept_channels"] for r in rows
    )
    assert bundle["format"] == "elsa_tf.channel_bundle"
    assert bundle["level_files_bytes"] == sum(r["bytes"] for r in rows)
    assert bundle["densest_bytes"] < bundle["bytes"] < bundle["level_files_bytes"]


def test_the_runner_makes_channel_levels_from_the_bundle(export, reference):
    runner = lite.LevelRunner(export)
    x = reference["x"][:5]
    for level in LEVELS:
        from_file = runner.load(level, source="file").run(x)
        from_bundle = runner.load(level, source="bundle").run(x)
        np.testing.assert_allclose(
            from_bundle, from_file, atol=1e-5 * max(np.abs(from_file).max(), 1.0)
        )
    assert lite.LevelRunner(export / "bundle.tflite").levels == list(LEVELS)


@pytest.mark.parametrize("runtime", lite.runtime.RUNTIMES)
def test_every_channel_level_runs_under_each_runtime_defaults(exports, runtime):
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} is not installed in this environment")
    env = dict(os.environ, **{lite.runtime.ENV_VAR: runtime})
    result = subprocess.run(
        [sys.executable, "-c", _RUN_EVERY_FILE, str(exports)]
        + [str(exports / REFERENCE), CHANNEL],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The per-level files, the bundle and the levels made from it.
    assert f"{CHANNEL} {2 * len(LEVELS) + 1} files ran" in result.stdout


def test_making_channel_levels_never_imports_tensorflow(export):
    script = f"""
import sys
import numpy as np
from elsa_tf import lite
runner = lite.LevelRunner({str(export)!r})
runner.load(0, source="bundle").run(np.zeros((1, 8, 8, 1), np.float32))
lite.materialize({str(export / "bundle.tflite")!r}, 1)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
assert lite.runtime.name() != "tensorflow", lite.runtime.name()
assert not heavy, heavy
"""
    env = dict(os.environ)
    env.pop(lite.runtime.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_damaged_channel_bundle_never_gives_a_wrong_level(export):
    content = (export / "bundle.tflite").read_bytes()
    bundle = lite.read_bundle(content)
    right = [bundle.materialize(level) for level in LEVELS]
    model = fb.read_model(content)
    payload = model.buffers[model.metadata["elsa_tf.channel_bundle"]]
    rng = np.random.default_rng(0)
    damaged = [content[:cut] for cut in rng.integers(0, len(content), 40).tolist()]
    for position in np.concatenate(
        [
            rng.integers(0, len(content), 60),
            rng.integers(payload.start, payload.start + payload.size, 60),
        ]
    ).tolist():
        corrupt = bytearray(content)
        corrupt[position] ^= 1 << int(rng.integers(8))
        damaged.append(bytes(corrupt))
    errors = 0
    for i, data in enumerate(damaged):
        level = i % len(right)
        try:
            made = lite.materialize(data, level)
        except lite.BundleError:
            errors += 1
        else:
            assert made == right[level], f"case {i} gave a wrong level {level}"
    assert errors >= 100, errors
