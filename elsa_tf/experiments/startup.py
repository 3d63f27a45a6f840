"""Start-up of the command-line programs: quiet TensorFlow, checked inputs.

`import_tensorflow_quietly()` is called by `elsa-train` and the tools before
anything else imports TensorFlow; `captured_stderr()` hides the TFLite
converter's C++ log. `missing_extras(names)` says which optional packages a
run needs but cannot import, so the program can stop at start-up with one
line naming the extra to install, before it writes anything.
`check_saved_model(path)` checks a tool's `--model_path` before TensorFlow is
asked to load it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterable

# What `pip install "elsa_tf[examples]"` adds (setup.py's "examples" extra),
# by the module a run imports: the package to name in the message.
EXTRA_INSTALL = 'pip install "elsa_tf[examples]"'
PACKAGES = {
    "sklearn": "scikit-learn",
    "mnist1d": "mnist1d",
    "tensorflow_datasets": "tensorflow-datasets",
    "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
    "ai_edge_litert": "ai-edge-litert",
}


@contextlib.contextmanager
def captured_stderr():
    """Sends file descriptor 2 (C++ logging too) to a temporary file meanwhile.

    What was captured is written back to stderr if the block raises, so a
    failure still shows the lines that explain it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with the C++ start-up lines hidden.

    TensorFlow 2.21 logs its start-up (oneDNN, cudart_stub, cuInit) through
    C++ absl logging before that is initialized, which ignores
    `TF_CPP_MIN_LOG_LEVEL`. So file descriptor 2 is captured while TensorFlow
    loads and lists its devices (which is when cuInit runs), and shown only if
    that fails. `TF_CPP_MIN_LOG_LEVEL=0` shows the lines as usual.
    """
    if "tensorflow" in sys.modules:
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401

        return
    # Hides the INFO and WARNING lines that TensorFlow logs once absl logging
    # is initialized.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with captured_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()


def missing_extras(modules: Iterable[str]) -> list[str]:
    """The pip packages of those `modules` (keys of `PACKAGES`) not installed.

    Looks the modules up without importing them (`importlib.util.find_spec`).
    """
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or blocked package
            found = False
        if not found:
            missing.append(PACKAGES.get(module, module))
    return missing


def check_saved_model(model_path: str) -> None:
    """Raises unless `model_path` is a saved `.keras` model (a zip archive).

    Raises:
        FileNotFoundError: if `model_path` does not exist.
        ValueError: if it is a directory or not a `.keras` archive.
    """
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"No saved model at --model_path={model_path!r}")
    if not (
        os.path.isfile(model_path)
        and model_path.endswith(".keras")
        and zipfile.is_zipfile(model_path)
    ):
        raise ValueError(
            "--model_path must be a model saved with model.save('....keras'). "
            f"Received: --model_path={model_path!r}"
        )
