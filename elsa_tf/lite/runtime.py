"""Finds a TFLite interpreter: LiteRT, then tflite-runtime, then TensorFlow.

The first of these that imports is used, so a device with only a runtime
installed never imports TensorFlow. `ELSA_TF_LITE_RUNTIME` (one of `RUNTIMES`)
forces a choice, which is how the tests run each runtime.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

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
    """An interpreter for a flatbuffer, with the runtime's default delegates,
    its tensors allocated (so a file that cannot be prepared raises here)."""
    cls = find()[1]
    if num_threads is None:
        result = cls(model_content=model_content)
    else:
        result = cls(model_content=model_content, num_threads=int(num_threads))
    result.allocate_tensors()
    return result


def feed(interpreter, inputs) -> None:
    """Sets a batch (an array, or a list in input order), resizing the
    interpreter's inputs when the batch's shapes differ from theirs."""
    details = interpreter.get_input_details()
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(arrays) != len(details):
        raise ValueError(
            f"The model takes {len(details)} inputs. Received: {len(arrays)}"
        )
    arrays = [np.asarray(a, d["dtype"]) for a, d in zip(arrays, details)]
    if any(tuple(d["shape"]) != a.shape for a, d in zip(arrays, details)):
        for a, d in zip(arrays, details):
            interpreter.resize_tensor_input(d["index"], a.shape)
        interpreter.allocate_tensors()
    for a, d in zip(arrays, details):
        interpreter.set_tensor(d["index"], a)


def predict(interpreter, inputs):
    """Runs one batch; returns the output array (a list if several)."""
    feed(interpreter, inputs)
    interpreter.invoke()
    outputs = [
        interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()
    ]
    return outputs[0] if len(outputs) == 1 else outputs
