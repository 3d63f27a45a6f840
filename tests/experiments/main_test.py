"""The training program end to end: flags, reports, TFLite files, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
import train  # examples/train.py, importable through conftest
from absl import flags
from absl.testing import flagsaver

import elsa_tf
from elsa_tf import model_ops
from elsa_tf.experiments import checkpoint, datasets

ROOT = Path(__file__).resolve().parents[2]
FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def _parsed_flags():
    FLAGS.unparse_flags()
    FLAGS(["train"])
    yield
    FLAGS.unparse_flags()
    FLAGS(["train"])


def _outputs(workdir: Path, num_levels: int):
    report = json.loads((workdir / "report.json").read_text())
    assert len(report["levels"]) == num_levels
    assert (workdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Level |" in (workdir / "report.md").read_text()
    manifest = json.loads((workdir / "tflite" / "manifest.json").read_text())
    for row in manifest["levels"]:
        assert (workdir / "tflite" / row["file"]).stat().st_size == row["bytes"]
    assert (workdir / "tflite" / "bundle.tflite").exists()
    for k in range(num_levels):
        assert list((workdir / "tensorboard" / f"level_{k}").glob("events.*"))
    assert (workdir / "model.keras").exists()
    return report


@pytest.mark.slow
def test_main_trains_digits_offline_with_the_baseline(tmp_path, capsys):
    with flagsaver.flagsaver(
        workdir=str(tmp_path),
        sparsities=["0.9", "0.0"],
        epochs_per_level=1,
        baseline="independent",
        verbose="2",
    ):
        train.main(["train"])
    report = _outputs(tmp_path, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "cnn"  # "auto", resolved for digits
    assert config["sparsities"] == [0.9, 0.0]
    for row in report["levels"]:
        assert row["achieved_sparsity"] == pytest.approx(row["target_sparsity"])
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency_ms"] > 0
        assert row["tflite_accuracy"] == pytest.approx(row["accuracy"], abs=0.01)
        assert 0.0 <= row["baselines"]["independent"]["accuracy"] <= 1.0
    assert report["methods"]["independent"].startswith("tfmot prune_low_magnitude")
    assert report["storage_bytes"]["baselines"]["independent"] == sum(
        f.stat().st_size for f in (tmp_path / "baseline").glob("*.tflite")
    )
    out = capsys.readouterr().out
    assert "Level 0 of 2: target sparsity 90.00%, 3,816 of 38,160" in out
    assert "Level 1 of 2: target sparsity 0.00%" in out
    assert "- sparsity: 0.9000" in out  # the level's sparsity in Keras's progress
    assert "ELSA − independent" in out
    assert "Baseline independent, model 2 of 2: target sparsity 0.00%" in out


@pytest.mark.slow
def test_main_trains_on_mocked_tfds_data(tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        with flagsaver.flagsaver(
            workdir=str(tmp_path),
            dataset="fashion_mnist",
            model="mlp",
            width=0.1,
            sparsities=["0.5", "0.0"],
            epochs_per_level=1,
            batch_size=8,
            verbose="0",
        ):
            train.main(["train"])
    report = _outputs(tmp_path, 2)
    assert (report["dataset"], report["model"]) == ("fashion_mnist", "mlp")


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--epochs_per_level=0", r"flag --epochs_per_level=\['0'\]: .*Received: '0'"),
        ("--epochs_per_level=3,0", r"one per level.*Received: '3,0'"),
        (
            "--epochs_per_level=3,1",
            "2 entries for 5 levels.*Received: --epochs_per_level=3,1",
        ),
        ("--batch_size=-3", "flag --batch_size=-3: .*Received: batch_size=-3"),
        ("--sparsities=0.5,0.9", "strictly decreasing.*sparsities=\\[0.5, 0.9\\]"),
        ("--sparsities=0.9,x", "must be numbers.*'x'"),
        ("--sparsities=1.0,0.0", "in \\[0, 1\\).*sparsities=\\[1.0, 0.0\\]"),
        ("--learning_rate=0", "flag --learning_rate=0.0: .*learning_rate=0.0"),
        ("--weight_decay=-1", "flag --weight_decay=-1.0: .*weight_decay=-1.0"),
        ("--width=0", "flag --width=0.0: .*width=0.0"),
        ("--seed=-1", "flag --seed=-1"),
        ("--dataset=imagenet", "flag --dataset=imagenet: .*dataset='imagenet'"),
        ("--dataset=/no/such.npz", "No such .npz file.*'/no/such.npz'"),
        ("--model=vgg", "flag --model=vgg: value should be one of"),
        ("--optimizer=lion", "flag --optimizer=lion: value should be one of"),
        ("--quantization=int4", "flag --quantization=int4: value should be one of"),
        ("--baseline=joint", "baseline must be one of .*Received: baseline='joint'"),
        ("--baseline=independent,independent", "names each baseline once"),
        ("--sparsifier=random", "flag --sparsifier=random: value should be one of"),
        ("--granularity=block", "flag --granularity=block: value should be one of"),
        ("--sparsifier=polarized_gates", "needs granularity='channel'"),
        ("--schedule=cosine", "flag --schedule=cosine: value should be one of"),
        ("--model=cnn1d", "model=cnn1d, dataset=digits: .*'cnn1d'.*\\(8, 8, 1\\)"),
        ("--epochs_per_level=two", r"flag --epochs_per_level=\['two'\]: "),
        ("--sieving_share=1.0", r"flag --sieving_share=1.0: .*Received: share=1.0"),
        ("--sieving_interval=0", "flag --sieving_interval=0: .*interval=0"),
        ("--freeze_share=1.5", "flag --freeze_share=1.5: .*share=1.5"),
        ("--freeze_interval=0", "flag --freeze_interval=0: .*interval=0"),
        ("--weight_decay=0.1", "optimizer=adam.*weight_decay=0.1: .*adamw"),
    ],
)
def test_bad_flags_stop_at_start_up_naming_flag_and_value(flag, message):
    FLAGS.unparse_flags()
    with pytest.raises(flags.Error, match=message):
        FLAGS(["train", flag])


def test_a_bad_flag_prints_one_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--batch_size=0"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "FATAL" in line]
    assert errors == [
        "FATAL Flags parsing error: flag --batch_size=0: batch_size must be a "
        "positive int. Received: batch_size=0"
    ]


def _level_predictions(model, x, level):
    return elsa_tf.extract(model, level).predict(x, verbose=0)


@pytest.mark.slow
def test_a_run_killed_mid_level_resumes_and_keeps_finished_levels(tmp_path, capsys):
    """Kills a real training process in level 1, then resumes it."""
    args = [
        f"--workdir={tmp_path}",
        "--sparsities=0.9,0.5,0.0",
        "--epochs_per_level=8",
        "--export_tflite=false",
        "--verbose=2",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "train.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    directory = tmp_path / "checkpoints"
    deadline = time.monotonic() + 600
    state = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                state = checkpoint.latest(directory)
            except (FileNotFoundError, json.JSONDecodeError):
                state = None
            if state and state["level"] == 1 and state["epoch_in_level"] >= 2:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    assert state and state["level"] == 1, f"not killed in level 1: {state}"
    # What the killed run left: its newest checkpoint may be newer than the
    # state seen above.
    state = checkpoint.latest(directory)
    assert state["level"] == 1 and 0 < state["epoch_in_level"] < 8
    killed = checkpoint.load(state)
    x, _ = datasets.load("digits").test_arrays()
    level0 = _level_predictions(killed, x, 0)

    FLAGS.unparse_flags()
    FLAGS(["train", *args, "--resume"])
    train.main(["train"])
    out = capsys.readouterr().out
    resumed = f"level 1 of 3, {state['epoch_in_level']} of 8 epochs into it"
    assert f"Resuming from {state['path']}: {resumed}" in out
    assert "Level 2 of 3: target sparsity 0.00%" in out

    final = keras.saving.load_model(tmp_path / "model.keras")
    assert model_ops.current_level(final) == 3
    np.testing.assert_array_equal(_level_predictions(final, x, 0), level0)
    for row in elsa_tf.summary(final):
        assert row["status"] == "finished"
        assert row["achieved_sparsity"] == pytest.approx(row["target_sparsity"])
    for level_map in model_ops.owner(final).level_maps:
        assert set(np.unique(level_map.numpy())) <= {0, 1, 2}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["training_seconds"]["elsa"] > 0
    assert (
        json.loads((tmp_path / "checkpoints" / "checkpoint.json").read_text())["epochs"]
        == 3 * 8
    )


def test_resuming_with_other_settings_is_refused(tmp_path):
    from elsa_tf.experiments import run
    from elsa_tf.experiments.config import Config

    config = Config(sparsities=(0.5, 0.0), epochs_per_level=1, export_tflite=False)
    os.makedirs(tmp_path, exist_ok=True)
    config.resolved().save(tmp_path / "config.json")
    other = Config(sparsities=(0.5, 0.0), epochs_per_level=2, export_tflite=False)
    with pytest.raises(ValueError, match="epochs_per_level=2 \\(the run has 1\\)"):
        run.train_and_evaluate(other, tmp_path, resume=True)


@pytest.mark.slow
def test_main_trains_under_mirrored_strategy(tmp_path):
    """One replica here (CPU); tests/distributed_test.py runs two."""
    with flagsaver.flagsaver(
        workdir=str(tmp_path),
        sparsities=["0.5", "0.0"],
        epochs_per_level=1,
        distribution="mirrored",
        export_tflite=False,
        verbose="0",
    ):
        train.main(["train"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["distribution"] == "mirrored"
    assert [row["achieved_sparsity"] for row in report["levels"]] == pytest.approx(
        [0.5, 0.0]
    )
    assert report["levels"][0]["tflite_bytes"] is None


def test_shared_defaults_to_the_librarys_choice_for_the_granularity():
    from elsa_tf.experiments.config import Config

    assert Config().shared == "freeze"
    assert Config(granularity="channel").shared == "per_level_statistics"
    assert Config(granularity="channel", shared="freeze").shared == "freeze"
