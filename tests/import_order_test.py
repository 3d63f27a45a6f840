"""A saved model loads whatever is imported first, each order in a new process.

elsa_tf registers its Keras classes when Keras is first imported (the package
itself must not import TensorFlow). In-process tests cannot see an import
order bug: the test process imported everything long ago.
"""

import os
import pkgutil
import subprocess
import sys

import keras
import pytest

import elsa_tf

_LOAD = "keras.saving.load_model(PATH)"

ORDERS = {
    "elsa_tf, keras": f"import elsa_tf, keras; {_LOAD}",
    "keras, elsa_tf": f"import keras, elsa_tf; {_LOAD}",
    "elsa_tf, tensorflow, keras": f"import elsa_tf, tensorflow, keras; {_LOAD}",
    "tensorflow, elsa_tf, keras": f"import tensorflow, elsa_tf, keras; {_LOAD}",
    "elsa_tf, tf.keras": (
        "import elsa_tf, tensorflow as tf; tf.keras.models.load_model(PATH)"
    ),
    "from elsa_tf import FreezingOptimizer, LevelScheduler": (
        f"from elsa_tf import FreezingOptimizer, LevelScheduler; import keras; {_LOAD}"
    ),
    "help(elsa_tf.LevelScheduler)": (
        "import elsa_tf, pydoc; pydoc.render_doc(elsa_tf.LevelScheduler); "
        f"import keras; {_LOAD}"
    ),
    # Each of the package's modules imported first: it imports Keras, or
    # TensorFlow (which touches Keras), while it is itself half imported.
    **{
        f"import {module}": f"import {module}; import keras; {_LOAD}"
        for module in sorted(
            f"elsa_tf.{m.name}"
            for m in pkgutil.iter_modules(elsa_tf.__path__)
            if m.name not in ("lite", "experiments")
        )
    },
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model = elsa_tf.embed(base, sparsities=[0.5, 0.0])
    model.compile(
        optimizer=elsa_tf.FreezingOptimizer(keras.optimizers.Adam()), loss="mse"
    )
    path = str(tmp_path_factory.mktemp("saved") / "model.keras")
    model.save(path)
    return path


def test_load_in_every_import_order(saved_model):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Started together: the orders are independent, and the 2-core CI
    # machine runs them in half the time.
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"PATH = {saved_model!r}; {code}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, code in ORDERS.items()
    }
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1:]
    assert not failures, failures
