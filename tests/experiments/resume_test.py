"""A run stopped by Ctrl-C or killed outright resumes in a new process.

Each step is the console script in its own process, as a user runs it: an
in-process test shares the imports and Keras registrations that a fresh
process must set up by itself to load a checkpoint.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

import elsa_tf
from elsa_tf import model_ops

ELSA_TRAIN = shutil.which("elsa-train") or str(
    Path(sys.executable).parent / "elsa-train"
)
TF_NOISE = ("absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit", "I0000")
ARGS = ["--sparsities=0.5,0.0", "--epochs_per_level=3", "--export_tflite=false"]


def _env():
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _start_and_stop(workdir, sig, extra=()):
    """Starts a run, sends `sig` once it has saved a checkpoint; returns
    (return code, stderr)."""
    process = subprocess.Popen(
        [ELSA_TRAIN, f"--workdir={workdir}", *ARGS, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    state = workdir / "checkpoints" / "checkpoint.json"
    deadline = time.monotonic() + 300
    try:
        while not state.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    return process.returncode, stderr


def _resume(workdir):
    return subprocess.run(
        [ELSA_TRAIN, f"--workdir={workdir}", "--resume"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )


def _assert_finished(workdir):
    final = keras.saving.load_model(workdir / "model.keras")
    assert model_ops.current_level(final) == 2
    assert [row["status"] for row in elsa_tf.summary(final)] == ["finished"] * 2


@pytest.mark.slow
def test_ctrl_c_says_where_and_how_to_resume_and_the_resume_finishes(tmp_path):
    workdir = tmp_path / "run dir"  # a space: the command must quote it
    returncode, stderr = _start_and_stop(workdir, signal.SIGINT)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Interrupted in level "), lines
    assert " after epoch " in lines[0]
    command = lines[0].split("Continue with: ")[1].split(" (")[0]
    assert shlex.split(command) == ["elsa-train", f"--workdir={workdir}", "--resume"]

    result = _resume(workdir)
    assert result.returncode == 0, result.stderr
    assert "Resuming from " in result.stdout
    for noise in TF_NOISE:
        assert noise not in result.stdout + result.stderr
    _assert_finished(workdir)


@pytest.mark.slow
def test_a_killed_run_resumes_in_a_new_process(tmp_path):
    workdir = tmp_path / "run"
    # With data sieving, whose queue must carry on through the kill too.
    sieving = ["--sieving_share=0.2", "--sieving_interval=1"]
    returncode, _ = _start_and_stop(workdir, signal.SIGKILL, sieving)
    assert returncode == -signal.SIGKILL
    assert "config.json" in os.listdir(workdir)
    stopped = json.loads((workdir / "checkpoints" / "checkpoint.json").read_text())

    result = _resume(workdir)
    assert result.returncode == 0, result.stderr
    _assert_finished(workdir)
    state = json.loads((workdir / "checkpoints" / "checkpoint.json").read_text())
    # One sieve over the 6 epochs of both processes, swapped after each
    # (restarted, it would count only the resumed run's epochs).
    assert stopped["sieve"]["epochs"] == stopped["epochs"] >= 1
    assert state["sieve"]["epochs"] == state["epochs"] == 6
    assert state["sieve"]["queue"]["swaps"] == 6
