"""The examples run end to end, and the docstring examples are true."""

import doctest
import json

import digits  # importable through conftest
import keras
import pytest
from absl import flags
from absl.testing import flagsaver

import elsa_tf
from elsa_tf import embedding, levels, optimizer, reporting, schedules


@pytest.mark.parametrize("module", [embedding, levels, optimizer, schedules])
def test_docstring_examples(module):
    globs = {"keras": keras, "elsa_tf": elsa_tf, "summary": reporting.summary}
    globs.update(vars(module))
    result = doctest.testmod(module, globs=globs)
    assert result.attempted > 0 and result.failed == 0


def test_digits_main_runs_offline(tmp_path, capsys):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["digits"])
    with flagsaver.flagsaver(
        workdir=str(tmp_path), sparsities=["0.9", "0.0"], epochs_per_level=1
    ):
        digits.main(["digits"])
    out = capsys.readouterr().out
    assert "accuracy" in out and "90.00%" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sparsities"] == [0.9, 0.0]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (tmp_path / "model.keras").exists()


def test_digits_rejects_bad_sparsities(tmp_path):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["digits"])
    with flagsaver.flagsaver(workdir=str(tmp_path), sparsities=["0.5", "x"]):
        with pytest.raises(Exception, match="--sparsities must be numbers.*0.5,x"):
            digits.main(["digits"])
