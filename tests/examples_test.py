"""The docstring examples are true (examples/train.py: experiments/main_test)."""

import doctest

import keras
import pytest

import elsa_tf
from elsa_tf import embedding, levels, optimizer, reporting, schedules


@pytest.mark.parametrize("module", [embedding, levels, optimizer, schedules])
def test_docstring_examples(module):
    globs = {"keras": keras, "elsa_tf": elsa_tf, "summary": reporting.summary}
    globs.update(vars(module))
    result = doctest.testmod(module, globs=globs)
    assert result.attempted > 0 and result.failed == 0
