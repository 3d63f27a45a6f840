"""Finds a TFLite interpreter: LiteRT, then tflite-runtime, then TensorFlow.

The first of these that imports is used, so a device with only a runtime
installed never imports TensorFlow. `ELSA_TF_LITE_RUNTIME` (one of `RUNTIMES`)
forces a choice, which is how the tests run each runtime.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

import numpy as np

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
ENV_VAR = "ELSA_TF_LITE_RUNTIME"

_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow",
}

# What to install for each runtime, for the error that names a missing one.
_PIP = {
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": '"numpy<2" tflite-runtime',
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
                f"{ENV_VAR} must name one of the TFLite runtimes {RUNTIMES}, or "
                f"be unset to use the first one installed. Received: "
                f"{ENV_VAR}={forced!r}"
            )
        try:
            _found = (forced, _load(forced))
        except ImportError as e:
            raise ImportError(
                f"{ENV_VAR}={forced} asks for the {forced} TFLite runtime, which "
                f"is not installed here ({e}). Install it with `pip install "
                f"{_PIP[forced]}`, or unset {ENV_VAR} to use the first runtime "
                "installed."
            ) from e
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


def signature(interpreter) -> tuple[dict[str, int], dict[str, int]] | None:
    """Name -> tensor index of the inputs and of the outputs of the model's
    signature, or None for a model without exactly one signature."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return None
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    return (
        {name: d["index"] for name, d in runner.get_input_details().items()},
        {name: d["index"] for name, d in runner.get_output_details().items()},
    )


def _shape_text(shape) -> str:
    dims = ", ".join("None" if s < 0 else str(int(s)) for s in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _ordered(interpreter, details, inputs) -> list:
    """The batch's arrays in the order of `details`: from a dict of named
    inputs, a list in input order, or one array."""
    if isinstance(inputs, Mapping):
        names = signature(interpreter)
        if names is None:
            raise ValueError(
                "This model has no named signature: pass its inputs as a list, "
                f"in input order. Received: a dict with keys {sorted(inputs)}"
            )
        by_index = {index: name for name, index in names[0].items()}
        if set(inputs) != set(names[0]):
            raise ValueError(
                f"The model takes the inputs {sorted(names[0])}. Received: a dict "
                f"with keys {sorted(inputs)}"
            )
        return [inputs[by_index[d["index"]]] for d in details]
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(arrays) != len(details):
        names = signature(interpreter) if len(details) > 1 else None
        named = f" ({', '.join(sorted(names[0]))}; pass a dict)" if names else ""
        plural = "s" if len(details) > 1 else ""
        raise ValueError(
            f"The model takes {len(details)} input{plural}{named}. "
            f"Received: {len(arrays)}"
        )
    return arrays


def feed(interpreter, inputs) -> None:
    """Sets a batch, resizing the interpreter's inputs when the batch's shapes
    differ from theirs.

    Args:
        interpreter: from `interpreter()`.
        inputs: one array; a list of arrays in input order; or a dict of
            arrays keyed by the signature's input names (`signature`), as
            models with several named inputs take them.

    Raises:
        ValueError: for missing or extra inputs, or an array whose shape the
            input cannot take (only the dimensions the model leaves unknown,
            usually the batch, may vary).
    """
    details = interpreter.get_input_details()
    arrays = _ordered(interpreter, details, inputs)
    arrays = [np.asarray(a, d["dtype"]) for a, d in zip(arrays, details)]
    for a, d in zip(arrays, details):
        expected = d.get("shape_signature", d["shape"])
        if len(expected) != a.ndim or any(
            want >= 0 and want != got for want, got in zip(expected, a.shape)
        ):
            raise ValueError(
                f"Input {d['name']!r} takes arrays of shape {_shape_text(expected)}"
                f" (None: any size). Received: shape={a.shape}"
            )
    if any(tuple(d["shape"]) != a.shape for a, d in zip(arrays, details)):
        for a, d in zip(arrays, details):
            interpreter.resize_tensor_input(d["index"], a.shape)
        interpreter.allocate_tensors()
    for a, d in zip(arrays, details):
        interpreter.set_tensor(d["index"], a)


def predict(interpreter, inputs):
    """Runs one batch (see `feed`); returns the output array, or for a model
    with several outputs a dict of them keyed by the signature's output names
    (a list in output order if the model has no signature)."""
    feed(interpreter, inputs)
    interpreter.invoke()
    details = interpreter.get_output_details()
    if len(details) == 1:
        return interpreter.get_tensor(details[0]["index"])
    names = signature(interpreter)
    if names is None:
        return [interpreter.get_tensor(d["index"]) for d in details]
    return {name: interpreter.get_tensor(index) for name, index in names[1].items()}
