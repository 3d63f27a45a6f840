"""tools/: export to TFLite, inspect and benchmark the export (no TensorFlow)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver
from conftest import finish_levels, mlp, vector_data

import elsa_tf
from elsa_tf import lite

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import benchmark_device  # noqa: E402
import export_tflite  # noqa: E402
import inspect_tflite  # noqa: E402

SPARSITIES = [0.9, 0.5, 0.0]


@pytest.fixture(autouse=True)
def _default_flags():
    """Every flag at its default, parsed, as a tool's main finds them."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["tools"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A saved 3-level MLP, its float32 export and an .npz of data."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("lite_tools")
    # Global ranking: the per-tensor sparsities below are its.
    model = finish_levels(elsa_tf.embed(mlp(), SPARSITIES, selection="global"))
    model.save(root / "model.keras")
    x, y = vector_data(n=32)
    np.savez(root / "data.npz", x=x, y=y)
    manifest = elsa_tf.export_tflite(
        model, root / "export", evaluation_data=(x, y), sparse_encoding=True
    )
    return {
        "root": root,
        "model": str(root / "model.keras"),
        "data": str(root / "data.npz"),
        "export": str(root / "export"),
        "bundle": str(root / "export" / "bundle.tflite"),
        "manifest": manifest,
    }


# -- export_tflite -------------------------------------------------------------


def test_export_tool_main_writes_the_levels_and_prints_them(exported, tmp_path, capsys):
    out = tmp_path / "export"
    with flagsaver.flagsaver(
        model_path=exported["model"],
        out=str(out),
        levels=["0", "2"],
        evaluation_data=exported["data"],
        sparse_encoding=False,
    ):
        export_tflite.main(["export_tflite.py"])
    manifest = lite.read_manifest(out)
    assert manifest["quantization"] == "float32"
    assert [r["level"] for r in manifest["levels"]] == [0, 2]
    assert not any(r["sparse_encoding"] for r in manifest["levels"])
    assert manifest["bundle"]["levels"] == [0, 2]
    printed = capsys.readouterr().out
    for row in manifest["levels"]:
        assert (out / row["file"]).is_file()
        assert f"| {row['file']} | {row['bytes']} | no | {row['accuracy']:.4f} |" in (
            printed
        )
    assert f"Bundle bundle.tflite: {manifest['bundle']['bytes']} bytes" in printed


def test_export_tool_calibrates_int8_on_x(exported, tmp_path):
    manifest = export_tflite.run(
        exported["model"],
        str(tmp_path / "int8"),
        quantization="int8",
        representative_data=exported["data"],
        levels=[0],
        sparse_encoding=False,
        bundle=False,
    )
    assert manifest["quantization"] == "int8" and "bundle" not in manifest
    assert sorted(os.listdir(tmp_path / "int8")) == [
        "level0_sparsity0.90.tflite",
        "manifest.json",
    ]


def test_export_tool_rejects_bad_input(exported, tmp_path, capsys):
    model, out = exported["model"], str(tmp_path / "out")
    with pytest.raises(ValueError, match="quantization='int4'"):
        export_tflite.run(model, out, quantization="int4")
    with flagsaver.flagsaver(model_path=model, out=out, quantization="int4"):
        with pytest.raises(SystemExit) as exit_info:
            export_tflite.main(["export_tflite.py"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("FATAL ") and "'int4'" in err[0]
    with flagsaver.flagsaver(model_path=model, out=None):
        with pytest.raises(app.UsageError, match="--out=None"):
            export_tflite.main(["export_tflite.py"])
    with pytest.raises(ValueError, match="representative_data=None"):
        export_tflite.run(model, out, quantization="int8")
    with pytest.raises(FileNotFoundError, match="--model_path='nope.keras'"):
        export_tflite.run("nope.keras", out)
    with pytest.raises(FileNotFoundError, match="evaluation_data='nope.npz'"):
        export_tflite.run(model, out, evaluation_data="nope.npz")
    np.savez(tmp_path / "inputs_only.npz", inputs=np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"must hold the arrays \['x'\]"):
        export_tflite.run(
            model,
            out,
            quantization="int8",
            representative_data=str(tmp_path / "inputs_only.npz"),
        )
    np.save(tmp_path / "x.npy", np.zeros((2, 8)))
    with pytest.raises(ValueError, match="not a single array"):
        export_tflite.run(model, out, evaluation_data=str(tmp_path / "x.npy"))
    with pytest.raises(ValueError, match="levels='0,a'"):
        export_tflite.parse_levels(["0", "a"])
    with pytest.raises(ValueError, match="levels=5"):
        export_tflite.run(model, out, levels=[5])
    assert not os.path.exists(out)


# -- inspect_tflite ------------------------------------------------------------


def test_inspect_export_checks_every_file(exported, tmp_path):
    report = inspect_tflite.run(exported["export"])
    manifest = exported["manifest"]
    assert report["kind"] == "export"
    for row, level in zip(report["levels"], manifest["levels"]):
        assert row["sha256"] == "ok" and row["bytes"] == level["bytes"]
        assert 0 < row["gzip_bytes"] < row["bytes"]
        assert row["target_sparsity"] == level["target_sparsity"]
        assert row["accuracy"] == level["accuracy"]
    assert report["bundle"]["sha256"] == "ok"

    copy = tmp_path / "export"
    shutil.copytree(exported["export"], copy)
    level0 = copy / manifest["levels"][0]["file"]
    level0.write_bytes(level0.read_bytes()[:-1] + b"\x01")
    os.remove(copy / manifest["levels"][1]["file"])
    rows = inspect_tflite.run(str(copy))["levels"]
    assert [r["sha256"] for r in rows] == ["mismatch", "missing", "ok"]
    assert "| missing |" in inspect_tflite.text(inspect_tflite.run(str(copy)))


def test_inspect_says_why_a_level_is_stored_dense(exported, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exported["export"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    row = manifest["levels"][0]
    row.update(
        sparse_encoding=False,
        storage_reason="slower",
        latency_ms={"dense": 0.5, "sparse": 0.75},
    )
    manifest["preprocessing"] = {"scale": 0.0625}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_tflite.run(str(copy))
    assert report["levels"][0]["storage_reason"] == "slower"
    text = inspect_tflite.text(report)
    assert "| dense (slower), 0.5000 ms dense / 0.7500 sparse |" in text
    last = exported["manifest"]["levels"][2]
    assert last["storage_reason"] == "not_smaller"  # Level 2 is dense.
    assert "| dense (not smaller) |" in text
    name = exported["manifest"]["inputs"][0]["name"]  # Keras's Input name.
    assert f"Inputs: {name} ?x8 float32" in text
    assert "Preprocessing: scale=0.0625" in text


def test_inspect_bundle_agrees_with_the_level_files(exported):
    report = inspect_tflite.run(exported["bundle"])
    manifest = exported["manifest"]
    assert report["kind"] == "bundle" and report["levels"] == [0, 1, 2]
    assert report["map_bytes"] == manifest["bundle"]["map_bytes"]
    # Free weights got nonzero values, so the map's sparsity is the model's.
    np.testing.assert_allclose(
        report["level_sparsity"],
        [r["achieved_sparsity"] for r in manifest["levels"]],
    )
    # Kernels have distinct shapes here: match the bundle's tensors by shape.
    counts = {t["count"]: t["sparsity"] for t in report["nested"]}
    assert sorted(counts) == [3 * 16, 8 * 16]
    for k, row in enumerate(manifest["levels"]):
        path = os.path.join(exported["export"], row["file"])
        tensors = inspect_tflite.run(path, per_tensor=True)["tensors"]
        kernels = {t["elements"]: t for t in tensors if len(t["shape"]) == 2}
        for count, sparsity in counts.items():
            assert kernels[count]["sparsity"] == pytest.approx(sparsity[k])
        # Stored sparse only where that made the file smaller (the manifest).
        storage = "sparse" if row["sparse_encoding"] else "dense"
        assert {t["storage"] for t in kernels.values()} == {storage}
    assert "| level 0 | level 1 | level 2 |" in inspect_tflite.text(report)


def test_inspect_main_per_tensor(exported, capsys):
    level0 = os.path.join(exported["export"], exported["manifest"]["levels"][0]["file"])
    with flagsaver.flagsaver(path=level0, per_tensor=True):
        inspect_tflite.main(["inspect_tflite.py"])
    printed = capsys.readouterr().out
    assert "| tensor | dtype | shape | storage | elements | stored | sparsity |" in (
        printed
    )
    assert "| 16x8 |" in printed and "| 0.8984 |" in printed
    with flagsaver.flagsaver(path=exported["export"], per_tensor=False):
        inspect_tflite.main(["inspect_tflite.py"])
    assert "| ok |" in capsys.readouterr().out


def test_inspect_rejects_bad_input(tmp_path):
    with pytest.raises(lite.ManifestError, match="has no manifest.json"):
        inspect_tflite.run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="path='nope'"):
        inspect_tflite.run("nope")
    (tmp_path / "notes.tflite").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="notes.tflite is not a TFLite file"):
        inspect_tflite.run(str(tmp_path / "notes.tflite"))
    with flagsaver.flagsaver(path=None):
        with pytest.raises(app.UsageError, match="--path is required"):
            inspect_tflite.main(["inspect_tflite.py"])


# -- benchmark_device ----------------------------------------------------------

FAST = {"warmup": 1, "repeats": 2, "materialize_repeats": 1}


def test_benchmark_times_every_level_and_source(exported):
    results = benchmark_device.run(exported["export"], num_threads=[1, 2], **FAST)
    manifest = exported["manifest"]
    rows = results["rows"]
    assert [(r["source"], r["level"]) for r in rows] == [
        (s, k) for s in ("file", "bundle") for k in (0, 1, 2)
    ]
    assert results["inputs"] == [{"shape": [1, 8], "dtype": "float32"}]
    for row in rows:
        assert set(row["median_ms"]) == {"1", "2"}
        assert row["sparsity"] == manifest["levels"][row["level"]]["achieved_sparsity"]
        if row["source"] == "file":
            assert row["bytes"] == manifest["levels"][row["level"]]["bytes"]
        if (row["source"], row["level"]) == ("bundle", 2):  # The reference.
            assert row["speedup"] == {"1": 1.0, "2": 1.0}
    assert results["reference"]["level"] == 2
    assert results["reference"]["source"] == "bundle"
    assert results["reference"]["storage"] == "dense"
    assert [m["level"] for m in results["materialize"]] == [0, 1, 2]
    json.dumps(results)  # What --out writes.
    text = benchmark_device.text(results)
    assert "| ms (1 thread) | speedup (1 thread) | ms (2 threads) |" in text
    assert "| level | materialize ms |" in text


def test_benchmark_reference_is_the_dense_stored_densest_level(exported, tmp_path):
    # Even when only the per-level files are timed: a per-level file may be
    # sparse-stored, and sparse storage is no faster (often slower).
    results = benchmark_device.run(exported["export"], source="file", **FAST)
    reference = results["reference"]
    assert (reference["level"], reference["source"], reference["storage"]) == (
        2,
        "bundle",
        "dense",
    )
    assert reference["median_ms"]["1"] > 0
    assert {r["source"] for r in results["rows"]} == {"file"}
    text = benchmark_device.text(results)
    assert "Speedup is over level 2 from its bundle, stored dense" in text
    # Without a bundle, the densest file is the reference, storage named.
    copy = tmp_path / "export"
    shutil.copytree(exported["export"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["bundle"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    results = benchmark_device.run(str(copy), **FAST)
    assert results["reference"]["source"] == "file"
    densest = manifest["levels"][2]
    storage = "sparse" if densest["sparse_encoding"] else "dense"
    assert results["reference"]["storage"] == storage


def test_benchmark_main_on_a_bundle_writes_json(exported, tmp_path, capsys):
    out = tmp_path / "bench.json"
    with flagsaver.flagsaver(
        path=exported["bundle"], batch=4, out=str(out), warmup=0, repeats=2
    ):
        benchmark_device.main(["benchmark_device.py"])
    results = json.loads(out.read_text())
    assert {r["source"] for r in results["rows"]} == {"bundle"}
    assert results["inputs"][0]["shape"] == [4, 8]
    # Without a manifest, sparsities come from the bundle's header.
    assert [r["sparsity"] for r in results["rows"]] == [
        r["achieved_sparsity"] for r in exported["manifest"]["levels"]
    ]
    assert "| 2 | bundle |" in capsys.readouterr().out


def test_benchmark_rejects_bad_input(exported, tmp_path):
    with pytest.raises(ValueError, match=r"Received: source=\['file'\]"):
        benchmark_device.run(exported["bundle"], source="file", **FAST)
    with pytest.raises(ValueError, match=r"Received: source=\['gpu'\]"):
        benchmark_device.run(exported["export"], source=["gpu"], **FAST)
    with pytest.raises(ValueError, match="num_threads=0"):
        benchmark_device.run(exported["export"], num_threads=[0], **FAST)
    with pytest.raises(ValueError, match="batch=0"):
        benchmark_device.run(exported["export"], batch=0, **FAST)
    with pytest.raises(ValueError, match="num_threads='1,two'"):
        benchmark_device.parse_ints("num_threads", ["1", "two"])
    with pytest.raises(FileNotFoundError, match="path='nope'"):
        benchmark_device.run("nope")
    with pytest.raises(lite.ManifestError, match="has no manifest.json"):
        benchmark_device.run(str(tmp_path))
    with flagsaver.flagsaver(path=None):
        with pytest.raises(app.UsageError, match="--path is required"):
            benchmark_device.main(["benchmark_device.py"])


# -- the on-device tools run without TensorFlow ----------------------------------

_RUN_TOOL = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("HEAVY:", sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "tool, args, printed",
    [
        ("inspect_tflite.py", ["--path={export}", "--per_tensor"], "| sha256 |"),
        ("inspect_tflite.py", ["--path={bundle}"], "| level 2 |"),
        (
            "benchmark_device.py",
            ["--path={export}", "--repeats=2", "--warmup=0"],
            "| speedup (1 thread) |",
        ),
    ],
)
def test_lite_tools_do_not_import_tensorflow(exported, tool, args, printed):
    device_runtimes = ("ai_edge_litert", "tflite_runtime")
    if tool.startswith("benchmark") and not any(
        importlib.util.find_spec(m) for m in device_runtimes
    ):
        pytest.skip("Only TensorFlow's interpreter is installed.")
    env = {k: v for k, v in os.environ.items() if k != lite.runtime.ENV_VAR}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_TOOL, str(TOOLS / tool)]
        + [a.format(**exported) for a in args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY: []" in done.stdout
    assert printed in done.stdout


def test_inspect_reports_a_channel_bundle_level_by_level(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 4
    base = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    )
    model = finish_levels(elsa_tf.embed(base, [0.5, 0.0], granularity="channel"))
    elsa_tf.export_tflite(model, tmp_path / "export", evaluation_data=(x, y))
    report = inspect_tflite.run(str(tmp_path / "export" / "bundle.tflite"))
    assert report["kind"] == "channel_bundle"
    narrow, dense = report["levels"]
    # Level 0 keeps 4 of the 8 filters: fewer weights in the conv, its
    # normalization and the Dense layer's input.
    assert narrow["constant_elements"] < dense["constant_elements"]
    assert dense["edits"] == {} and narrow["edits"]
    text = inspect_tflite.text(report)
    assert "Channel bundle" in text and "shape vector" in text
