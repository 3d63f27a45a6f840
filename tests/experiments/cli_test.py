"""`elsa-train` as a user runs it: the console script, in a new process.

An in-process test shares imports, registrations and flags that a new
process does not have, so every test here runs the installed console script
(or `python examples/train.py`) with `subprocess`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elsa_tf.experiments.config import Config

ROOT = Path(__file__).resolve().parents[2]
ELSA_TRAIN = shutil.which("elsa-train") or str(
    Path(sys.executable).parent / "elsa-train"
)
# A tiny run: two levels, one epoch each, no TFLite export.
TINY = ["--sparsities=0.5,0.0", "--epochs_per_level=1", "--export_tflite=false"]
# Lines TensorFlow's C++ start-up writes when it is not kept quiet.
TF_NOISE = ("absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit", "I0000")

# Makes the modules named in ELSA_TEST_HIDE unimportable in the new process,
# as if their packages were not installed.
_HIDE = """
import os, sys
for name in os.environ.get("ELSA_TEST_HIDE", "").split(","):
    if name:
        sys.modules[name] = None
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, **extra}


def elsa_train(*args, hide=(), tmp_path=None, timeout=300):
    env = _env()
    if hide:
        site = tmp_path / "hide_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_HIDE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
        env["ELSA_TEST_HIDE"] = ",".join(hide)
    return subprocess.run(
        [ELSA_TRAIN, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


def one_fatal_line(result) -> str:
    """The single error line of a run that stopped at start-up."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("FATAL "), lines
    return lines[0]


@pytest.mark.parametrize("help_flag", ["--help", "--helpshort"])
def test_help_lists_the_programs_flags_with_defaults_and_no_tf_noise(help_flag):
    result = subprocess.run(
        [ELSA_TRAIN, help_flag], capture_output=True, text=True, env=_env()
    )
    out = result.stdout  # absl exits with status 1 after --help
    for flag in ("--workdir", "--sparsities", "--[no]recalibrate_bn", "--[no]augment"):
        assert flag in out
    for flag in ("--[no]overwrite", "--[no]resume", "--baseline", "--verbose"):
        assert flag in out
    assert "(default: '15')" in out  # --epochs_per_level
    assert "(default: '/tmp/elsa_train')" in out
    assert "--tpu" not in out and "--alsologtostderr" not in out  # not --helpfull
    for noise in TF_NOISE:
        assert noise not in result.stdout + result.stderr


def test_the_example_script_lists_the_same_flags():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--help"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert "--[no]recalibrate_bn" in result.stdout
    assert "(default: 'float32')" in result.stdout
    # absl formats the docstring with `%`: it must come out as written.
    doc = (ROOT / "examples" / "train.py").read_text().split('"""')[1]
    first_paragraph = " ".join(doc.split("\n\n")[1].split())
    assert first_paragraph in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "args, hidden, package",
    [
        ([], "sklearn", "scikit-learn"),
        (["--dataset=mnist1d"], "mnist1d", "mnist1d"),
        (["--dataset=mnist"], "tensorflow_datasets", "tensorflow-datasets"),
        (["--dataset=DATA"], "tensorboard", "tensorboard"),
        (["--dataset=DATA"], "matplotlib", "matplotlib"),
    ],
)
def test_a_missing_extra_stops_at_start_up_naming_it(tmp_path, args, hidden, package):
    data = tmp_path / "data.npz"
    x = [[0.0, 1.0]] * 4
    np.savez(data, x_train=x, y_train=[0, 1, 0, 1], x_test=x, y_test=[0, 1, 0, 1])
    args = [a.replace("DATA", str(data)) for a in args]
    workdir = tmp_path / "run"
    result = elsa_train(
        f"--workdir={workdir}", *args, *TINY, hide=[hidden], tmp_path=tmp_path
    )
    line = one_fatal_line(result)
    assert package in line and 'pip install "elsa_tf[examples]"' in line
    assert not workdir.exists()


def _previous_run(workdir: Path) -> list[str]:
    workdir.mkdir()
    Config(
        sparsities=(0.5, 0.0), epochs_per_level=1, export_tflite=False
    ).resolved().save(workdir / "config.json")
    (workdir / "model.keras").write_text("a previous run's model")
    return sorted(os.listdir(workdir))


@pytest.mark.parametrize(
    "case",
    [
        "workdir_is_a_file",
        "tfds_data_not_prepared",
        "resume_missing_workdir",
        "resume_empty_workdir",
        "resume_with_other_settings",
        "previous_run_without_resume",
        "resume_and_overwrite",
    ],
)
def test_user_errors_are_one_line_and_write_nothing(tmp_path, case):
    workdir = tmp_path / "run"
    args, expected, before = [], None, None
    if case == "workdir_is_a_file":
        workdir.write_text("not a directory")
        expected = "--workdir must be a directory"
    elif case == "tfds_data_not_prepared":
        (tmp_path / "tfds").mkdir()
        args = ["--dataset=mnist", "--model=mlp", f"--data_dir={tmp_path / 'tfds'}"]
        expected = "Dataset 'mnist' is not prepared in data_dir="
    elif case == "resume_missing_workdir":
        args, expected = ["--resume"], "Nothing to resume in --workdir="
    elif case == "resume_empty_workdir":
        workdir.mkdir()
        args, expected = ["--resume"], "Nothing to resume in --workdir="
    elif case == "resume_with_other_settings":
        before = _previous_run(workdir)
        args = ["--resume", "--epochs_per_level=3"]
        expected = "other settings. Received: epochs_per_level=3 (the run has 1)"
    elif case == "previous_run_without_resume":
        before = _previous_run(workdir)
        expected = "holds a previous run (config.json, model.keras): pass --resume"
    else:
        before = _previous_run(workdir)
        args, expected = ["--resume", "--overwrite"], "give one of them"
    listing = sorted(os.listdir(tmp_path))
    result = elsa_train(f"--workdir={workdir}", *args, tmp_path=tmp_path)
    line = one_fatal_line(result)
    assert expected in line
    assert sorted(os.listdir(tmp_path)) == listing
    if before is not None:
        assert sorted(os.listdir(workdir)) == before
        assert (workdir / "model.keras").read_text() == "a previous run's model"


def test_overwrite_replaces_a_previous_run_and_a_log_gets_lines(tmp_path):
    workdir = tmp_path / "run"
    _previous_run(workdir)
    (workdir / "baseline").mkdir()
    (workdir / "baseline" / "old.tflite").write_bytes(b"old")
    result = elsa_train(f"--workdir={workdir}", *TINY, "--overwrite", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (workdir / "baseline").exists()
    assert json.loads((workdir / "report.json").read_text())["levels"]
    # stdout is a pipe: one line per epoch, no progress bar.
    assert "\r" not in result.stdout and "\x1b[" not in result.stdout
    assert "22/22 - " in result.stdout
    assert "Level 0 of 2: target sparsity 50.00%" in result.stdout
    for noise in TF_NOISE:
        assert noise not in result.stdout + result.stderr


def test_sparsifier_flag_is_read_and_the_saved_model_restores_it(tmp_path):
    workdir = tmp_path / "run"
    result = elsa_train(
        f"--workdir={workdir}", *TINY, "--sparsifier=dpf", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "report.json").read_text())
    assert "dynamic pruning with feedback" in json.dumps(report)
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import keras, elsa_tf; "
            f"m = keras.saving.load_model({str(workdir / 'model.keras')!r}); "
            "print(type(m.sparsifier).__name__)",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert check.stdout.strip().endswith("DynamicPruningWithFeedback"), check.stderr
