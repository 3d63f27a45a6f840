"""Export every level of an embedded model to TFLite, with a bundle and manifest.

`export_tflite` converts `extract(model, level)` for each level with
`tf.lite.TFLiteConverter`, writes one `.tflite` a level, one bundle (the
densest level plus the level map, see `elsa_tf.lite.bundle`) and
`manifest.json`. Everything is written to a temporary directory beside
`out_dir` and moved into place at the end, so a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

import elsa_tf
from elsa_tf import embedding, model_ops, reporting
from elsa_tf.lite import bundle as bundle_lib
from elsa_tf.lite import runtime
from elsa_tf.lite.runner import MANIFEST

QUANTIZATIONS = (None, "float16", "dynamic", "int8")
BUNDLE_FILE = "bundle.tflite"
_REPRESENTATIVE_SAMPLES = 200
_INTEGER_TYPES = (2, 3, 7, 9)  # TFLite INT32, UINT8, INT16, INT8


def level_file_name(level: int, sparsity: float) -> str:
    """`level2_sparsity0.50.tflite`: a level's file says its level and sparsity."""
    return f"level{level}_sparsity{sparsity:.2f}.tflite"


def _check_levels(model, levels) -> list[int]:
    num = len(model_ops.sparsities(model))
    if levels is None:
        return list(range(num))
    if isinstance(levels, int):
        levels = [levels]
    chosen = sorted(set(model_ops.check_level(model, k, "levels") for k in levels))
    if not chosen:
        raise ValueError(f"levels must name at least one level. Received: {levels}")
    return chosen


def _representative_dataset(data):
    """TFLite's representative_dataset protocol from arrays or a tf.data set."""
    if data is None:
        raise ValueError(
            'quantization="int8" calibrates activation ranges on sample inputs: '
            "pass representative_data (an array of inputs, a tf.data.Dataset "
            "or a callable yielding lists of input arrays). "
            "Received: representative_data=None"
        )
    if callable(data):
        return data
    if isinstance(data, tf.data.Dataset):

        def from_dataset():
            for x in data.unbatch().take(_REPRESENTATIVE_SAMPLES):
                x = x[0] if isinstance(x, tuple) else x
                yield [tf.expand_dims(tf.cast(x, tf.float32), 0)]

        return from_dataset
    array = np.asarray(data, np.float32)

    def from_array():
        for i in range(min(len(array), _REPRESENTATIVE_SAMPLES)):
            yield [array[i : i + 1]]

    return from_array


def _convert(model, quantization, representative_data, sparse: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    optimizations = set()
    if quantization is not None:
        optimizations.add(tf.lite.Optimize.DEFAULT)
    if sparse:
        optimizations.add(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        # Per-channel hybrid FULLY_CONNECTED is op version 12, which the
        # legacy tflite-runtime 2.14 cannot run; per-tensor scales for Dense
        # layers keep every file runnable by all three runtimes.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    elif quantization == "int8":
        converter.representative_dataset = _representative_dataset(representative_data)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # Keras prints the traced signature, a line per captured variable.
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(converter.convert())


def integer_densify_ops(content: bytes) -> int:
    """How many DENSIFY ops expand integer weights in a flatbuffer.

    LiteRT's default XNNPACK delegate claims the quantized FULLY_CONNECTED and
    CONV_2D nodes fed by such an op and then fails to prepare them (seen with
    LiteRT 2.3 and TF 2.21), so files with them are not exported.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    densify = {
        i
        for i, code in enumerate(model.operatorCodes)
        if max(code.builtinCode, code.deprecatedBuiltinCode)
        == schema.BuiltinOperator.DENSIFY
    }
    count = 0
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if op.opcodeIndex in densify:
                count += subgraph.tensors[op.inputs[0]].type in _INTEGER_TYPES
    return count


def _probe_inputs(model, evaluation_data, representative_data) -> np.ndarray:
    """A few inputs to compare a level's storage forms on."""
    for data in (evaluation_data and evaluation_data[0], representative_data):
        if isinstance(data, np.ndarray) and len(data):
            return np.asarray(data[:16], np.float32)
    shape = [16 if d is None else d for d in model.inputs[0].shape]
    return np.random.default_rng(0).uniform(size=shape).astype(np.float32)


def _sparse_is_better(sparse: bytes, dense: bytes, quantization, probe) -> bool:
    """Whether to store a level sparse: smaller, runnable, and as exact.

    Three cases keep the dense form: sparse storage that is not smaller (low
    sparsity); integer weights behind DENSIFY ops (`integer_densify_ops`);
    and outputs that differ from the dense form's. TF 2.21 wrote float16
    files mixing sparse and dense kernels that output NaN for every input.
    """
    if len(sparse) >= len(dense):
        return False
    if quantization in ("dynamic", "int8") and integer_densify_ops(sparse):
        return False
    try:
        got = runtime.predict(runtime.interpreter(sparse), probe)
        want = runtime.predict(runtime.interpreter(dense), probe)
    except Exception:  # The runtimes raise RuntimeError or ValueError.
        return False
    scale = max(float(np.abs(want).max()), 1e-6)
    return bool(np.isfinite(got).all() and np.abs(got - want).max() <= 1e-4 * scale)


def _check_runs(content: bytes, what: str) -> None:
    """Prepares the file with the runtime's default delegates, or raises."""
    try:
        runtime.interpreter(content)
    except Exception as e:  # The runtimes raise RuntimeError or ValueError.
        raise RuntimeError(
            f"The exported {what} does not run under {runtime.name()}'s default "
            f"settings: {e}"
        ) from e


def _accuracy(content: bytes, data, batch_size: int = 256) -> float:
    x, y = data
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim > 1:
        y = y.argmax(-1)
    interpreter = runtime.interpreter(content)
    correct = 0
    for start in range(0, len(x), batch_size):
        outputs = runtime.predict(interpreter, x[start : start + batch_size])
        predicted = np.asarray(outputs[0] if isinstance(outputs, list) else outputs)
        correct += int((predicted.argmax(-1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def _signature(content: bytes) -> dict:
    interpreter = runtime.interpreter(content)

    def describe(details):
        return [
            {
                "name": d["name"],
                "shape": [int(s) for s in d["shape_signature"]],
                "dtype": np.dtype(d["dtype"]).name,
            }
            for d in details
        ]

    return {
        "inputs": describe(interpreter.get_input_details()),
        "outputs": describe(interpreter.get_output_details()),
    }


def _aligned_builder(size: int):
    """A flatbuffers Builder that starts every byte vector on 16 bytes, as the
    TFLite converter does for buffers, so weights stay aligned for kernels."""
    import flatbuffers

    class AlignedBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' name)
            self.Prep(16, x.itemsize * x.size)
            return super().CreateNumpyVector(x)

    return AlignedBuilder(size)


def add_metadata(content: bytes, name: str, payload: bytes) -> bytes:
    """The flatbuffer with one more metadata entry holding `payload`."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = _aligned_builder(len(content) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _with_file_bytes(base: bytes, payload: bytes) -> bytes:
    """The bundle file, its header recording the file's own length."""
    content = add_metadata(base, bundle_lib.METADATA_NAME, payload)
    placeholder = f'"file_bytes": "{bundle_lib.FILE_BYTES_PLACEHOLDER}"'.encode()
    size = f'"file_bytes": "{len(content):012d}"'.encode()
    assert payload.count(placeholder) == 1 and len(size) == len(placeholder)
    final = add_metadata(
        base, bundle_lib.METADATA_NAME, payload.replace(placeholder, size)
    )
    assert len(final) == len(content)
    return final


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_tflite(
    model,
    out_dir,
    *,
    levels=None,
    quantization: str | None = None,
    representative_data=None,
    sparse_encoding: bool = True,
    evaluation_data=None,
    bundle: bool = True,
    overwrite: bool = False,
) -> dict:
    """Writes one `.tflite` per level, a bundle and `manifest.json`.

    Args:
        model: an embedded model (from `elsa_tf.embed` / `elsa_tf.fit`).
        out_dir: the directory to create.
        levels: level indices to export; None exports every level.
        quantization: None (float32), `"float16"`, `"dynamic"` (int8 weights,
            float activations) or `"int8"` (full integer, calibrated on
            `representative_data`; inputs and outputs stay float32). A zero
            weight is exactly zero in every format.
        representative_data: inputs for `"int8"` calibration: an array, a
            `tf.data.Dataset` of inputs or `(inputs, labels)`, or a callable
            yielding lists of arrays (TFLite's protocol).
        sparse_encoding: store weights in TFLite's sparse format
            (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`), so sparser levels are
            smaller files. A level is stored dense instead (its manifest row
            says `"sparse_encoding": false`) when the sparse file is not
            smaller, when its outputs differ from the dense file's, or, for
            `"dynamic"` and `"int8"`, when the converter expands sparse
            integer weights with DENSIFY ops, which LiteRT's default XNNPACK
            delegate cannot prepare: every file runs with the runtime's
            default settings.
        evaluation_data: `(x, y)` with integer or one-hot labels: each file's
            top-1 accuracy, measured with the TFLite runtime, goes into the
            manifest.
        bundle: also write the bundle (`bundle.tflite`). Not for `"int8"`:
            full-integer files carry activation ranges calibrated per level,
            which one file cannot hold for every level (a level-0 model made
            from a dense-calibrated file agreed with its Keras model on 40% of
            top-1 labels here), so the manifest's `"bundle"` is None and says
            why.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        The manifest, as written to `out_dir/manifest.json`.

    Raises:
        ValueError: for a model that is not embedded, an unknown quantization,
            `"int8"` without representative data, a level out of range, or an
            existing `out_dir` without `overwrite`. Nothing is written then.
    """
    model_ops.wrappers(model)  # Raises for a model that is not embedded.
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    if quantization == "int8":
        _representative_dataset(representative_data)  # Fail before converting.
    levels = _check_levels(model, levels)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"out_dir {out_dir} exists and is not empty; pass overwrite=True to "
            f"replace it. Received: out_dir={out_dir!r}"
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".elsa_export_", dir=parent)
    try:
        manifest = _write(
            model,
            staging,
            levels=levels,
            quantization=quantization,
            representative_data=representative_data,
            sparse_encoding=sparse_encoding,
            evaluation_data=evaluation_data,
            bundle=bundle,
        )
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".elsa_old_", dir=parent)
            os.rename(out_dir, os.path.join(old, "export"))
            os.rename(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write(
    model,
    out_dir,
    *,
    levels,
    quantization,
    representative_data,
    sparse_encoding,
    evaluation_data,
    bundle,
) -> dict:
    rows_by_level = {row["level"]: row for row in reporting.summary(model)}
    probe = _probe_inputs(model, evaluation_data, representative_data)
    name = quantization or "float32"
    rows, dense_files = [], []
    for level in levels:
        extracted = embedding.extract(model, level)
        dense = _convert(extracted, quantization, representative_data, False)
        content, sparse = dense, False
        if sparse_encoding:
            candidate = _convert(extracted, quantization, representative_data, True)
            if _sparse_is_better(candidate, dense, quantization, probe):
                content, sparse = candidate, True
        file_name = level_file_name(level, rows_by_level[level]["target_sparsity"])
        _check_runs(content, file_name)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(content)
        row = {
            "level": level,
            "target_sparsity": rows_by_level[level]["target_sparsity"],
            "achieved_sparsity": rows_by_level[level]["achieved_sparsity"],
            "file": file_name,
            "bytes": len(content),
            "sha256": _sha256(content),
            "quantization": name,
            "sparse_encoding": sparse,
        }
        if evaluation_data is not None:
            row["accuracy"] = _accuracy(content, evaluation_data)
        rows.append(row)
        dense_files.append(dense)

    manifest = {
        "format": "elsa_tf.export",
        "format_version": 1,
        "elsa_tf_version": elsa_tf.__version__,
        "model": model.name,
        "quantization": name,
        "num_levels": len(model_ops.sparsities(model)),
        "levels": rows,
        **_signature(dense_files[-1]),
        "runtime_checked": runtime.name(),
    }
    if bundle and quantization == "int8":
        manifest["bundle"] = None
        manifest["bundle_note"] = (
            "No bundle for full-integer quantization: activation ranges are "
            "calibrated per level. Use the per-level files."
        )
    elif bundle:
        payload, stats = bundle_lib.encode(
            dense_files,
            header={
                "levels": levels,
                "target_sparsity": [r["target_sparsity"] for r in rows],
                "achieved_sparsity": [r["achieved_sparsity"] for r in rows],
                "quantization": name,
                "elsa_tf_version": elsa_tf.__version__,
                "file_bytes": bundle_lib.FILE_BYTES_PLACEHOLDER,
            },
        )
        content = _with_file_bytes(dense_files[-1], payload)
        _check_runs(content, BUNDLE_FILE)
        with open(os.path.join(out_dir, BUNDLE_FILE), "wb") as f:
            f.write(content)
        manifest["bundle"] = {
            "file": BUNDLE_FILE,
            "bytes": len(content),
            "sha256": _sha256(content),
            "levels": levels,
            "map_bytes": stats.map_bytes,
            "map_entropy_bytes": round(stats.map_entropy_bytes, 1),
            "nested_weights": stats.nested_elements,
            "override_bytes": stats.override_bytes,
            "exact": stats.inexact_buffers == 0,
        }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest
