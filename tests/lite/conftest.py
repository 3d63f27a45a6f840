"""Fixtures of the on-device tests: they import numpy and elsa_tf.lite only.

In a virtual environment without TensorFlow, the exports come from the
directory named by `ELSA_TF_LITE_EXPORT` (written by `make_export.py`, which
`.ci/run` runs first); with TensorFlow, they are made here.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from .make_export import REFERENCE, make

ENV_VAR = "ELSA_TF_LITE_EXPORT"


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Path:
    """The directory holding one export per quantization mode."""
    given = os.environ.get(ENV_VAR)
    if given:
        return Path(given)
    if importlib.util.find_spec("tensorflow") is None:
        pytest.fail(
            f"No TensorFlow here to export a model: set {ENV_VAR} to a directory "
            "written by `python tests/lite/make_export.py DIR`."
        )
    return Path(make(tmp_path_factory.mktemp("exports")))


@pytest.fixture(scope="session")
def reference(exports) -> dict:
    with np.load(exports / REFERENCE) as data:
        return dict(data)
