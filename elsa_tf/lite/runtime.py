"""Finds a TFLite interpreter: LiteRT, then tflite-runtime, then TensorFlow.

The first of these that imports is used, so a device with only a runtime
installed never imports TensorFlow. `ELSA_TF_LITE_RUNTIME` (one of `RUNTIMES`)
forces a choice, which is how the tests run each runtime.
"""

from __future__ import annotations

import importlib
import os

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
ENV_VAR = "ELSA_TF_LITE_RUNTIME"

_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow",
}

_found: tuple[str, type] | None = None


def _load(name: str) -> type:
    module = importlib.import_module(_MODULES[name])
    # TensorFlow's public `tf.lite` is an API namespace, not `tensorflow.lite`.
    return module.lite.Interpreter if name == "tensorflow" else module.Interpreter


def find() -> tuple[str, type]:
    """(runtime name, its `Interpreter` class), importing it on first use.

    Raises:
        ImportError: if no TFLite runtime is installed, or the one named by
            `ELSA_TF_LITE_RUNTIME` is not.
        ValueError: if `ELSA_TF_LITE_RUNTIME` names an unknown runtime.
    """
    global _found
    if _found is not None:
        return _found
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in RUNTIMES:
            raise ValueError(
                f"{ENV_VAR} must be one of {RUNTIMES}. Received: {ENV_VAR}={forced!r}"
            )
        _found = (forced, _load(forced))
        return _found
    errors = []
    for name in RUNTIMES:
        try:
            _found = (name, _load(name))
            return _found
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError(
        "elsa_tf.lite needs a TFLite runtime: pip install ai-edge-litert (or "
        "tflite-runtime, or tensorflow). Tried: " + "; ".join(errors)
    )


def name() -> str:
    """The name of the runtime in use (see `RUNTIMES`)."""
    return find()[0]


def interpreter(model_content: bytes, *, num_threads: int | None = None):
    """An interpreter for a flatbuffer, with the runtime's default delegates."""
    cls = find()[1]
    if num_threads is None:
        return cls(model_content=model_content)
    return cls(model_content=model_content, num_threads=int(num_threads))
