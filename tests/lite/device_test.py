"""On-device tests: numpy, elsa_tf.lite and a TFLite runtime, no TensorFlow.

`.ci/run` runs this directory a second time in a virtual environment holding
only numpy, ai-edge-litert, pytest and the project (installed with
`--no-deps`), and a third time with tflite-runtime.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elsa_tf import lite
from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import bundle as bundle_lib

from .make_export import MODES, REFERENCE, SPARSITIES

LEVELS = range(len(SPARSITIES))


def _outputs(content: bytes, x: np.ndarray) -> np.ndarray:
    return lite.runtime.predict(lite.runtime.interpreter(content), x)


def _level_file(exports, mode, level) -> bytes:
    manifest = lite.read_manifest(exports / mode)
    return (exports / mode / manifest["levels"][level]["file"]).read_bytes()


def _check_close(mode, got, want):
    """The issue's tolerance for each format."""
    if mode == "float32":
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    elif mode in ("float16", "dynamic"):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-2 * scale
    else:
        agreement = np.mean(got.argmax(-1) == want.argmax(-1))
        assert agreement >= 0.98, agreement


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", LEVELS)
def test_level_files_match_extract(exports, reference, mode, level):
    got = _outputs(_level_file(exports, mode, level), reference["x"])
    _check_close(mode, got, reference[f"level{level}"])


BUNDLED = [m for m in MODES if m != "int8"]


def test_no_bundle_for_full_integer(exports):
    manifest = lite.read_manifest(exports / "int8")
    assert manifest["bundle"] is None
    assert "calibrated per level" in manifest["bundle_note"]
    assert not (exports / "int8" / "bundle.tflite").exists()


@pytest.mark.parametrize("mode", BUNDLED)
@pytest.mark.parametrize("level", LEVELS)
def test_levels_made_from_the_bundle_match_extract(exports, reference, mode, level):
    content = lite.materialize(exports / mode / "bundle.tflite", level)
    got = _outputs(content, reference["x"])
    _check_close(mode, got, reference[f"level{level}"])


@pytest.mark.parametrize("level", LEVELS)
def test_float32_bundle_level_equals_its_file(exports, reference, level):
    made = _outputs(
        lite.materialize(exports / "float32" / "bundle.tflite", level), reference["x"]
    )
    exported = _outputs(_level_file(exports, "float32", level), reference["x"])
    np.testing.assert_allclose(made, exported, atol=1e-5, rtol=0)


_RUN_EVERY_FILE = """
import sys
from pathlib import Path
import numpy as np
from elsa_tf import lite
x = np.load(sys.argv[2])["x"][:4]
for mode in sys.argv[3:]:
    export = Path(sys.argv[1]) / mode
    contents = [f.read_bytes() for f in sorted(export.glob("*.tflite"))]
    if (export / "bundle.tflite").exists():
        bundle = lite.read_bundle(export / "bundle.tflite")
        contents += [bundle.materialize(k) for k in bundle.levels]
    for content in contents:
        interpreter = lite.runtime.interpreter(content)  # Default settings.
        assert np.isfinite(lite.runtime.predict(interpreter, x)).all()
    print(lite.runtime.name(), mode, len(contents), "files ran")
"""


@pytest.mark.parametrize("runtime", lite.runtime.RUNTIMES)
def test_every_file_runs_under_each_runtime_defaults(exports, runtime):
    # Default settings include the XNNPACK delegate (LiteRT, tflite-runtime).
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} is not installed in this environment")
    env = dict(os.environ, **{lite.runtime.ENV_VAR: runtime})
    result = subprocess.run(
        [sys.executable, "-c", _RUN_EVERY_FILE, str(exports)]
        + [str(exports / REFERENCE)]
        + list(MODES),
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("files ran") == len(MODES)


def test_zero_weights_stay_zero_in_every_format(exports):
    # A weight no level-0 weight uses is zero in every format: the level-0
    # map position of each nested element must be zero in the level-0 file
    # made from the bundle, whatever the element type.
    for mode in BUNDLED:
        bundle = lite.read_bundle(exports / mode / "bundle.tflite")
        made = bundle.materialize(0)
        model = fb.read_model(made)
        for entry, codes in zip(bundle.header["nested"], bundle.codes()):
            ref = model.buffers[entry["buffer"]]
            values = np.frombuffer(made, entry["dtype"], entry["count"], ref.start)
            assert not values[codes > 0].any()
            assert values[codes == 0].all() or entry["dtype"] == "int8"


def test_sizes_shrink_with_sparsity_and_bundle_is_small(exports):
    for mode in MODES:
        manifest = lite.read_manifest(exports / mode)
        rows = manifest["levels"]
        # Sparse-stored levels shrink with sparsity; no file is larger than
        # its dense form, the form of a level stored dense for a reason.
        sparse = [row["bytes"] for row in rows if row["sparse_encoding"]]
        assert sparse == sorted(sparse) and len(set(sparse)) == len(sparse), rows
        assert all(row["bytes"] <= row["dense_bytes"] for row in rows), rows
        for row in rows:
            assert row["sparse_encoding"] == (row["storage_reason"] is None), row
    manifest = lite.read_manifest(exports / "float32")
    densest = manifest["levels"][-1]
    # The bundle is the densest level stored dense, plus the level map.
    assert manifest["bundle"]["bytes"] <= 1.10 * densest["dense_bytes"]


def test_manifest_describes_every_file(exports):
    for mode in MODES:
        manifest = lite.read_manifest(exports / mode)
        assert manifest["quantization"] == mode
        assert [r["level"] for r in manifest["levels"]] == list(LEVELS)
        for row, target in zip(manifest["levels"], SPARSITIES):
            assert row["file"] == f"level{row['level']}_sparsity{target:.2f}.tflite"
            content = (exports / mode / row["file"]).read_bytes()
            assert row["bytes"] == len(content)
            assert row["sha256"] == hashlib.sha256(content).hexdigest()
            assert row["target_sparsity"] == target
            assert abs(row["achieved_sparsity"] - target) < 0.01
            assert 0.0 <= row["accuracy"] <= 1.0
        if mode in BUNDLED:
            bundle = (exports / mode / manifest["bundle"]["file"]).read_bytes()
            digest = hashlib.sha256(bundle).hexdigest()
            assert manifest["bundle"]["sha256"] == digest
        assert manifest["inputs"][0]["shape"] == [-1, 8, 8, 1]
        assert manifest["outputs"][0]["shape"] == [-1, 10]
        assert manifest["elsa_tf_version"]


def test_bundle_reports_its_levels(exports):
    bundle = lite.read_bundle(exports / "float32" / "bundle.tflite")
    assert bundle.levels == list(LEVELS)
    # Weights that stayed exactly zero (dead units) count as unused.
    sparsity = bundle.level_sparsity()
    assert sparsity == sorted(sparsity, reverse=True)
    assert all(s >= t - 0.01 for s, t in zip(sparsity, SPARSITIES))
    # Nested: every level's weights contain the sparser levels'.
    for codes in bundle.codes():
        assert codes.max() <= len(SPARSITIES)


def test_bundle_weights_are_aligned(exports):
    data = (exports / "float32" / "bundle.tflite").read_bytes()
    model = fb.read_model(data)
    assert all(b.start % 16 == 0 for b in model.buffers if b.size)


# Corrupt inputs: a clear error, never a silently wrong model.


@pytest.fixture()
def bundle_bytes(exports):
    return (exports / "float32" / "bundle.tflite").read_bytes()


def test_truncated_bundle_raises(bundle_bytes):
    for cut in (10, len(bundle_bytes) // 2, len(bundle_bytes) - 100):
        with pytest.raises(lite.BundleError):
            lite.materialize(bundle_bytes[:cut], 0)


def test_not_a_tflite_file_raises():
    with pytest.raises(lite.BundleError, match="truncated or corrupt"):
        lite.materialize(b"\x00" * 64, 0)


def test_a_level_file_is_not_a_bundle(exports):
    with pytest.raises(lite.BundleError, match="not an elsa_tf bundle"):
        lite.read_bundle(_level_file(exports, "float32", 0))


def _payload_range(data: bytes) -> tuple[int, int]:
    model = fb.read_model(data)
    ref = model.buffers[model.metadata[bundle_lib.METADATA_NAME]]
    return ref.start, ref.start + ref.size


def test_changed_weights_do_not_match_the_map(bundle_bytes):
    bundle = lite.read_bundle(bundle_bytes)
    entry = max(bundle.header["nested"], key=lambda e: e["count"])
    ref = fb.read_model(bundle_bytes).buffers[entry["buffer"]]
    corrupt = bytearray(bundle_bytes)
    corrupt[ref.start : ref.start + 4] = b"\x00\x00\x80\x3f"  # 1.0
    codes = bundle.codes()[bundle.header["nested"].index(entry)]
    level = int(codes[0])  # The first weight is used from this level on.
    with pytest.raises(lite.BundleError, match="does not match"):
        lite.materialize(bytes(corrupt), min(level, len(SPARSITIES) - 1))


def test_a_map_from_another_model_does_not_match(bundle_bytes):
    bundle = lite.read_bundle(bundle_bytes)
    header = dict(bundle.header)
    header["nested"] = [dict(e, count=e["count"] + 1) for e in header["nested"]]
    with pytest.raises(lite.BundleError, match="does not match"):
        bundle_lib.Bundle(
            bundle_bytes,
            fb.read_model(bundle_bytes),
            bundle_lib._Payload(header, bundle._payload.packed_map, ()),
        ).materialize(0)


def test_corrupt_payload_raises(bundle_bytes):
    start, end = _payload_range(bundle_bytes)
    for position in (start + 2, end - 8):
        corrupt = bytearray(bundle_bytes)
        corrupt[position] ^= 0xFF
        with pytest.raises(lite.BundleError):
            lite.materialize(bytes(corrupt), 0)


def test_hash_mismatch_against_the_manifest(exports, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(exports / "float32", export)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["bundle"]["sha256"] = "0" * 64
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(lite.ManifestError, match="bundle.tflite.*SHA-256|SHA-256"):
        lite.LevelRunner(export)
    runner = lite.LevelRunner(export, verify=False)  # Checks nothing.
    runner.load(1, source="bundle")
    with pytest.raises(lite.BundleError, match="SHA-256"):
        lite.read_bundle(export / "bundle.tflite", expected_sha256="0" * 64)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_level_file_fails_when_the_runner_is_created(
    exports, tmp_path, damage
):
    export = tmp_path / "export"
    shutil.copytree(exports / "float32", export)
    name = lite.read_manifest(export)["levels"][1]["file"]
    path = export / name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-10]))
    else:
        path.unlink()
    with pytest.raises(lite.ManifestError, match=name.replace(".", r"\.")):
        lite.LevelRunner(export)


def test_a_wrong_input_shape_names_the_expected_one(exports, reference):
    runner = lite.LevelRunner(exports / "float32").load(0)
    for bad in (reference["x"][:2, :, :4], reference["x"][:2, ..., 0]):
        with pytest.raises(ValueError, match=r"\(None, 8, 8, 1\)") as error:
            runner.run(bad)
        assert f"Received: shape={bad.shape}" in str(error.value)
    assert runner.run(reference["x"][:3]).shape == (3, 10)  # Batch may vary.
    with pytest.raises(ValueError, match="takes 1 input. Received: 2"):
        runner.run([reference["x"][:1], reference["x"][:1]])


def test_level_out_of_range(bundle_bytes):
    with pytest.raises(ValueError, match="Received: level=3"):
        lite.materialize(bundle_bytes, 3)
    with pytest.raises(TypeError, match="Received: level="):
        lite.materialize(bundle_bytes, 1.0)


# The runner and level selection.


def test_runner_runs_levels_from_files_and_bundle(exports, reference):
    runner = lite.LevelRunner(exports / "float32")
    assert runner.levels == list(LEVELS)
    for level in LEVELS:
        a = runner.load(level, source="file").run(reference["x"])
        b = runner.load(level, source="bundle").run(reference["x"][:7])
        np.testing.assert_allclose(a[:7], b, atol=1e-5)
    latency = runner.latency(reference["x"][:1], warmup=1, repeats=3)
    assert latency.runs == 3 and 0 < latency.p10_ms <= latency.p90_ms
    bundle_runner = lite.LevelRunner(exports / "float32" / "bundle.tflite")
    assert bundle_runner.levels == list(LEVELS)
    assert bundle_runner.load(0).run(reference["x"][:2]).shape == (2, 10)
    with pytest.raises(ValueError, match="source"):
        runner.load(0, source="disk")


def test_select_by_accuracy_picks_the_sparsest_good_level(exports):
    manifest = lite.read_manifest(exports / "float32")
    accuracies = [row["accuracy"] for row in manifest["levels"]]
    floor = min(accuracies)
    assert lite.select_by_accuracy(manifest, floor) == 0
    best = max(accuracies)
    chosen = lite.select_by_accuracy(manifest, best)
    assert accuracies[chosen] == best
    assert all(a < best for a in accuracies[:chosen])
    with pytest.raises(ValueError, match="No level reaches"):
        lite.select_by_accuracy(manifest, 1.01)
    with pytest.raises(ValueError, match="evaluation_data"):
        lite.select_by_accuracy({"levels": [{"level": 0}]}, 0.5)


def test_select_by_latency_takes_the_most_accurate_level_in_budget():
    latencies = {0: 1.0, 1: 2.0, 2: 4.0}
    assert lite.select_by_latency(latencies, 2.5) == 1
    assert lite.select_by_latency(latencies, 9.0) == 2
    assert lite.select_by_latency(latencies, 9.0, {0: 0.9, 1: 0.95, 2: 0.94}) == 1
    with pytest.raises(ValueError, match="budget_ms=0.5"):
        lite.select_by_latency(latencies, 0.5)


def test_runner_measures_latency_to_select(exports, reference):
    runner = lite.LevelRunner(exports / "float32")
    level = runner.select_by_latency(1e9, reference["x"][:1], warmup=0, repeats=2)
    accuracies = {r["level"]: r["accuracy"] for r in runner.manifest["levels"]}
    assert accuracies[level] == max(accuracies.values())


def test_export_directory_without_manifest(tmp_path):
    with pytest.raises(lite.ManifestError, match="no manifest.json"):
        lite.LevelRunner(tmp_path)


# No TensorFlow on the device.


def test_device_path_never_imports_tensorflow(exports):
    script = f"""
import sys
import numpy as np
import elsa_tf
from elsa_tf import lite
runner = lite.LevelRunner({str(exports / "float32")!r})
runner.load(0, source="bundle").run(np.zeros((1, 8, 8, 1), np.float32))
lite.materialize({str(exports / "float32" / "bundle.tflite")!r}, 1)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print(lite.runtime.name(), heavy)
assert lite.runtime.name() != "tensorflow", lite.runtime.name()
assert not heavy, heavy
"""
    env = dict(os.environ)
    env.pop(lite.runtime.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_runtime_can_be_forced_and_names_bad_choices():
    script = """
import os, sys
from elsa_tf.lite import runtime
os.environ[runtime.ENV_VAR] = "nonsense"
try:
    runtime.find()
except ValueError as e:
    assert "nonsense" in str(e), e
else:
    sys.exit("no error")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_forced_runtime_that_is_not_installed_says_how_to_install_it():
    missing = [r for r in lite.runtime.RUNTIMES if importlib.util.find_spec(r) is None]
    if not missing:
        pytest.skip("Every TFLite runtime is installed here.")
    env = dict(os.environ, **{lite.runtime.ENV_VAR: missing[0]})
    script = "from elsa_tf.lite import runtime; runtime.find()"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), last
    assert f"{lite.runtime.ENV_VAR}={missing[0]}" in last
    assert "pip install" in last and "unset" in last


def _readme_snippet() -> str:
    readme = Path(__file__).resolve().parents[2] / "README.md"
    section = readme.read_text().split("## Deploying to devices")[1]
    return section.split("```python\n")[1].split("```")[0]


def test_the_readme_snippet_runs_as_written(exports, tmp_path):
    shutil.copytree(exports / "float32", tmp_path / "export")
    script = _readme_snippet() + "\nassert np.allclose(probabilities.sum(-1), 1)\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
