"""Export every level of an embedded model to TFLite, with a bundle and manifest.

`export_tflite` converts the densest level once: `extract(model, level)` is
traced with Keras's `model.export` (a SavedModel, which any model with named
or several inputs and outputs has) and converted with
`tf.lite.TFLiteConverter.from_saved_model`. Every other level's file is that
file with the weights the level does not use zeroed in place and, where
levels have their own shared weights (`shared="per_level"` or
`"per_level_statistics"`), the buffers holding those rewritten with the
level's values, BatchNormalizations folded in as the converter folds them
(`elsa_tf.export_patch`); each is checked against the Keras model at that
level on a few inputs. A level that cannot be made so (quantization with
per-level scales, a per-level weight the patcher cannot place exactly, a
weight not found in the file, or a check that fails) is traced and converted
on its own, as is every level's sparse storage form when
`sparse_encoding=True` (`choose_storage` then picks the form). It writes one
`.tflite` a level, one bundle (the densest level plus the level map, see
`elsa_tf.lite.bundle`) and `manifest.json`. Everything is written to a
temporary directory beside `out_dir` and moved into place at the
end, so a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import elsa_tf
from elsa_tf import _keras_compat, embedding, export_patch, model_ops, reporting
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


def _saved_model(model, directory: str) -> str:
    """Writes `model`'s serving signature as a SavedModel; returns its path.

    `TFLiteConverter.from_keras_model` fails on models with dict inputs (every
    keras_hub text model: `token_ids`, `padding_mask`) in TF 2.21; Keras's own
    `export` traces any model, and keeps its input names in the signature.
    """
    path = os.path.join(directory, "saved_model")
    # Keras prints the traced signature, a line per captured variable.
    with contextlib.redirect_stdout(io.StringIO()):
        model.export(path, format="tf_saved_model", verbose=False)
    return path


def _configure(converter, quantization, representative_data, sparse: bool) -> None:
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
        # layers keep every file runnable by all three runtimes. There is no
        # public switch for it.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    elif quantization == "int8":
        converter.representative_dataset = _representative_dataset(representative_data)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def _convert(model, quantization, representative_data, sparse: bool) -> bytes:
    """The `.tflite` bytes of a Keras model, or of the SavedModel directory
    `_saved_model` wrote for it (to convert one trace to several forms)."""
    if not isinstance(model, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="elsa_saved_model_") as directory:
            saved = _saved_model(model, directory)
            return _convert(saved, quantization, representative_data, sparse)
    converter = tf.lite.TFLiteConverter.from_saved_model(os.fspath(model))
    _configure(converter, quantization, representative_data, sparse)
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


_PROBE_LENGTH = 8  # Of each unknown dimension but the batch, in probe inputs.


def _probe_inputs(signature: dict, evaluation_data, representative_data):
    """A few inputs to check patched files and compare storage forms on, in
    the form `runtime.predict` takes: an array, or a dict of named arrays."""
    for data in (evaluation_data and evaluation_data[0], representative_data):
        if isinstance(data, np.ndarray) and len(data):
            return np.asarray(data[:16], np.float32)
        if isinstance(data, dict) and data:
            return {name: np.asarray(x)[:16] for name, x in data.items()}
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in signature["inputs"]:
        # An unknown length of 1 would make attention's softmax over one key
        # always 1, so its query and key kernels would not change the outputs.
        shape = [
            (16 if i == 0 else _PROBE_LENGTH) if d < 0 else d
            for i, d in enumerate(spec["shape"])
        ]
        dtype = np.dtype(spec["dtype"])
        # Integer inputs are usually indices (token ids): 0 and 1 are valid
        # for any vocabulary.
        if dtype.kind in "iub":
            arrays[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:
            arrays[spec["name"]] = rng.uniform(size=shape).astype(dtype)
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return arrays


def _output_order(name: str):
    # A list of Keras outputs becomes `output_0`, `output_1`, ... in the
    # signature: in list order, also past `output_9`. Named outputs sort by
    # name, as `keras.tree.flatten` orders a dict.
    index = re.fullmatch(r"output_(\d+)", name)
    return (int(index[1]), "") if index else (-1, name)


def _flat_outputs(outputs) -> list[np.ndarray]:
    if isinstance(outputs, dict):
        return [np.asarray(outputs[k]) for k in sorted(outputs, key=_output_order)]
    if isinstance(outputs, list):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


def _agree(got: list[np.ndarray], want: list[np.ndarray], tolerance: float) -> bool:
    """Same outputs, finite, each within `tolerance` of `want`'s largest
    magnitude."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape or not np.isfinite(g).all():
            return False
        scale = max(float(np.abs(w).max(initial=0.0)), 1e-6)
        if g.size and np.abs(g - w).max() > tolerance * scale:
            return False
    return True


# A sparse-stored level is kept only if its median latency is within this
# factor of the dense-stored form's, measured side by side at export: the
# spread of repeated medians of one file on one thread was about 3% here.
SPARSE_LATENCY_TOLERANCE = 1.05
# Latency is timed on batch-1 inputs, alternating the two forms, for at least
# this many invokes each and until both have run this long.
_TIMING_MIN_INVOKES = 15
_TIMING_MIN_SECONDS = 0.15
_TIMING_MAX_INVOKES = 2000


def _first_example(probe):
    if isinstance(probe, dict):
        return {name: x[:1] for name, x in probe.items()}
    return probe[:1]


def paired_latency_ms(contents: list[bytes], inputs) -> list[float]:
    """Median single-thread latency of each flatbuffer on `inputs`, in ms.

    The files are invoked in turns, so that a change in the machine's load
    affects each of them alike.
    """
    interpreters = []
    for content in contents:
        interpreter = runtime.interpreter(content, num_threads=1)
        runtime.feed(interpreter, inputs)
        for _ in range(3):  # Warm-up: first invokes prepare kernels and caches.
            interpreter.invoke()
        interpreters.append(interpreter)
    seconds = [[] for _ in contents]
    while True:
        # Alternate which file goes first: the second of two back-to-back
        # invokes ran about 1.5% faster here, whichever file it was.
        turn = list(zip(interpreters, seconds))
        for interpreter, spent in turn if len(seconds[0]) % 2 else turn[::-1]:
            start = time.perf_counter()
            interpreter.invoke()
            spent.append(time.perf_counter() - start)
        count, least = len(seconds[0]), min(sum(spent) for spent in seconds)
        if count >= _TIMING_MAX_INVOKES or (
            count >= _TIMING_MIN_INVOKES and least >= _TIMING_MIN_SECONDS
        ):
            break
    return [float(np.median(spent) * 1e3) for spent in seconds]


# Why a level is stored dense (the manifest's "storage_reason").
STORAGE_REASONS = {
    "disabled": "export_tflite(sparse_encoding=False), the default",
    "conversion_failed": "the converter failed to write the sparse form (TF "
    "2.21's sparsifier rejects a weight shared by two ops, as in GPT-2's tied "
    "embeddings)",
    "not_smaller": "the sparse file is not smaller",
    "densify": "the converter expands its sparse integer weights with DENSIFY "
    "ops, which LiteRT's default XNNPACK delegate cannot prepare",
    "outputs_differ": "the sparse file's outputs differ from the dense file's",
    "slower": "the sparse file runs slower than the dense file",
    "narrowed": "a physically narrowed channel level (granularity='channel') "
    "holds no pruned zeros for sparse storage to leave out",
}


@dataclasses.dataclass(frozen=True)
class Storage:
    """How one level is stored, and why (see `STORAGE_REASONS`)."""

    sparse: bool
    reason: str | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None


def choose_storage(sparse: bytes, dense: bytes, quantization, probe) -> Storage:
    """Whether to store a level sparse: smaller, runnable, as exact and as fast.

    Four cases keep the dense form: sparse storage that is not smaller (low
    sparsity); integer weights behind DENSIFY ops (`integer_densify_ops`);
    outputs that differ from the dense form's (TF 2.21 wrote float16 files
    mixing sparse and dense kernels that output NaN for every input); and a
    sparse form slower than the dense one by more than
    `SPARSE_LATENCY_TOLERANCE`. Sparse storage is no speed-up by itself: only
    TFLite's sparse FULLY_CONNECTED kernel reads it, on block-sparse float32
    weights; for anything else the runtime densifies weights when it
    prepares the model, and a level whose sparsity is only training's exact
    zeros ran 40% slower sparse-stored than dense-stored.
    """
    if len(sparse) >= len(dense):
        return Storage(False, "not_smaller")
    if quantization in ("dynamic", "int8") and integer_densify_ops(sparse):
        return Storage(False, "densify")
    try:
        got = _flat_outputs(runtime.predict(runtime.interpreter(sparse), probe))
        want = _flat_outputs(runtime.predict(runtime.interpreter(dense), probe))
    except Exception:  # The runtimes raise RuntimeError or ValueError.
        return Storage(False, "outputs_differ")
    if not _agree(got, want, 1e-4):
        return Storage(False, "outputs_differ")
    dense_ms, sparse_ms = paired_latency_ms([dense, sparse], _first_example(probe))
    if sparse_ms > SPARSE_LATENCY_TOLERANCE * dense_ms:
        return Storage(False, "slower", dense_ms, sparse_ms)
    return Storage(True, None, dense_ms, sparse_ms)


def _check_runs(content: bytes, what: str) -> None:
    """Prepares the file with the runtime's default delegates, or raises."""
    try:
        runtime.interpreter(content)
    except Exception as e:  # The runtimes raise RuntimeError or ValueError.
        raise RuntimeError(
            f"The exported {what} does not run under {runtime.name()}'s default "
            f"settings: {e}"
        ) from e


# Why a level's file was converted on its own rather than patched from the
# densest level's file (the manifest's "patch_fallback"; None for a patched
# level and for the densest level, whose conversion the others come from).
PATCH_FALLBACKS = {
    "quantization": "dynamic and int8 files quantize each level with scales "
    "of its own weights",
    "per_level_weights": "a weight differs between levels other than by "
    "zeroed elements (shared='per_level' or 'per_level_statistics') and "
    "cannot be rewritten exactly: it is in no buffer as it is, nor as a "
    "BatchNormalization folded into the layer before it (its kernel times "
    "the scale per output channel, its bias (b - mean) * scale + beta); or "
    "which buffer holds it is ambiguous: a constant value (an untrained "
    "normalization's scale, zero biases), two normalizations with the same "
    "scale, a normalization folded into the layer after it",
    "unmapped": "a weight that only some levels zero was not found in the "
    "densest level's buffers, or a buffer two weights claim disagrees",
    "not_verified": "the Keras model could not be run on the probe inputs to "
    "check the patched file",
    "outputs_differ": "the patched file's outputs differ from the Keras "
    "model's at that level (as when a BatchNormalization feeds a pruned layer: "
    "the converter folds its shift into that layer's bias through the kernel)",
    "narrowed": "a channel level (granularity='channel') is a physically "
    "narrower network, whose tensors have other shapes than the densest "
    "level's (elsa_tf.export_channels)",
}
# How close a patched file's outputs must be to the Keras level's, relative
# to the largest output: the tolerance each exported file is held to (float16
# weights round to 11 significant bits).
_PATCH_TOLERANCE = {None: 1e-4, "float16": 1e-2}


@dataclasses.dataclass(frozen=True)
class _Made:
    """How a level's dense file was made ("converted" or "patched"), and why
    it was not patched (a key of `PATCH_FALLBACKS`)."""

    by: str
    fallback: str | None = None


@dataclasses.dataclass(frozen=True)
class _LevelValues:
    """Every inner weight's value at each exported level (sparsest first), by
    name; the weights that differ as zeroed copies of the densest, with their
    level codes; the names of those that differ otherwise; and each
    variable's name by `id`."""

    values: dict[str, tuple[np.ndarray, ...]]
    masked: list[export_patch.Weight]
    varying: list[str]
    names: dict[int, str]


def _level_weights(model, levels) -> _LevelValues:
    """What differs between `levels`, and how (`_LevelValues`)."""
    owner = model_ops.owner(model)
    prunable = {id(w) for w in owner.prunable_weights}
    by_level = [owner.effective_weights(level) for level in levels]
    weights = owner.inner_model.weights
    paths = [w.path for w in weights]
    # Paths name weights in what is reported; an index keeps them apart in
    # the rare model where two are the same.
    unique = len(set(paths)) == len(paths)
    names = {
        id(w): p if unique else f"{p}#{i}"
        for i, (w, p) in enumerate(zip(weights, paths))
    }
    values, masked, varying = {}, [], []
    for w in weights:
        name = names[id(w)]
        values[name] = tuple(v[id(w)] for v in by_level)
        if all(np.array_equal(v, values[name][-1]) for v in values[name][:-1]):
            continue
        codes = export_patch.level_codes(values[name]) if id(w) in prunable else None
        if codes is None:
            varying.append(name)
        else:
            masked.append(export_patch.Weight(name, values[name][-1], codes))
    return _LevelValues(values, masked, varying, names)


def _first_call(layer, attribute: str):
    """`layer.input` or `layer.output` of its first call in a functional
    graph, or None where there is no graph (a subclassed model's layers)."""
    try:
        return getattr(layer, attribute)
    except (AttributeError, ValueError):
        return None


def _folding(inner_model, names) -> tuple[list, list]:
    """Every kernel with its layer's bias (`export_patch.Layer`), and every
    BatchNormalization (`export_patch.BatchNorm`), by name: what the
    converter may fold one into, and what it folds. A layer whose output a
    BatchNormalization takes, in the model's graph, says which."""
    leaves = [
        layer
        for layer in _keras_compat.walk(inner_model)
        if layer.weights and not _keras_compat.sublayers(layer)
    ]
    norms, takes = [], {}
    for layer in leaves:
        if isinstance(layer, keras.layers.BatchNormalization):
            takes[id(_first_call(layer, "input"))] = len(norms)
            norms.append(
                export_patch.BatchNorm(
                    mean=names[id(layer.moving_mean)],
                    variance=names[id(layer.moving_variance)],
                    gamma=names[id(layer.gamma)] if layer.scale else None,
                    beta=names[id(layer.beta)] if layer.center else None,
                    epsilon=float(layer.epsilon),
                )
            )
    takes.pop(id(None), None)
    layers = []
    for layer in leaves:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        bias = getattr(layer, "bias", None)  # Keras names it so.
        bias = None if bias is None else names.get(id(bias))
        output = _first_call(layer, "output")
        follows = None if output is None else takes.get(id(output))
        for w in layer.weights:
            if len(w.shape) >= 2:
                layers.append(export_patch.Layer(names[id(w)], bias, follows))
    return layers, norms


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How `base` becomes every other level: the buffers whose elements are
    zeroed, and the buffers rewritten whole."""

    zeroed: list[export_patch.BufferPatch]
    written: list[export_patch.BufferWrite]


def _find_buffers(model, levels, base: bytes, quantization):
    """The `_Plan` patching `base` into the other levels, or the reason
    (`PATCH_FALLBACKS`) it cannot be patched."""
    if len(levels) == 1:
        return _Plan([], []), None  # Nothing to patch.
    if quantization not in _PATCH_TOLERANCE:
        return None, "quantization"
    found = _level_weights(model, levels)
    writes = []
    if found.varying:
        inner = model_ops.owner(model).inner_model
        layers, norms = _folding(inner, found.names)
        writes, unplaced = export_patch.plan_writes(
            base, found.values, found.varying, layers, norms
        )
        if unplaced:
            return None, "per_level_weights"
    patches, missing = export_patch.find_buffers(base, found.masked)
    if missing or not export_patch.consistent(patches, writes):
        return None, "unmapped"
    return _Plan(patches, writes), None


def _keras_outputs(model, level: int, probe) -> list[np.ndarray]:
    """What the embedded model computes at `level` on `probe`.

    The embedded model is run at that level and set back, which is cheaper
    than copying the model out with `extract` (what the file was made from,
    and which predicts the same).
    """
    owner = model_ops.owner(model)
    previous = owner.view_level
    embedding.set_level(model, level)
    try:
        outputs = owner(probe, training=False)
    finally:
        embedding.set_level(model, previous)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def _verify(model, level: int, content: bytes, probe, quantization) -> str | None:
    """None if a patched file computes what Keras does at `level`, else the
    reason (`PATCH_FALLBACKS`) to convert the level instead."""
    try:
        want = _keras_outputs(model, level, probe)
    except Exception:  # Any input the Keras model does not take.
        return "not_verified"
    try:
        got = _flat_outputs(runtime.predict(runtime.interpreter(content), probe))
    except Exception:  # The runtimes raise RuntimeError or ValueError.
        return "outputs_differ"
    if not _agree(got, want, _PATCH_TOLERANCE[quantization]):
        return "outputs_differ"
    return None


def _patch(base: bytes, plan: _Plan, position: int) -> bytes:
    return export_patch.patch(base, plan.zeroed, position, plan.written)


def _accuracy(content: bytes, data, batch_size: int = 256) -> float:
    x, y = data
    x = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else x
    x, y = (x if isinstance(x, dict) else np.asarray(x)), np.asarray(y)
    if y.ndim > 1:
        y = y.argmax(-1)
    interpreter = runtime.interpreter(content)
    correct = 0
    for start in range(0, len(y), batch_size):
        if isinstance(x, dict):
            batch = {name: a[start : start + batch_size] for name, a in x.items()}
        else:
            batch = x[start : start + batch_size]
        # The first output, in the signature's order, is the one scored.
        predicted = _flat_outputs(runtime.predict(interpreter, batch))[0]
        correct += int((predicted.argmax(-1) == y[start : start + batch_size]).sum())
    return correct / len(y)


def _signature(content: bytes) -> dict:
    """The model's inputs and outputs: each one's name in the serving
    signature (what `LevelRunner.run` takes in a dict), its tensor's name,
    shape (-1: any size) and dtype."""
    interpreter = runtime.interpreter(content)
    names = runtime.signature(interpreter)
    inputs, outputs = names if names else ({}, {})

    def describe(details, named):
        by_index = {index: name for name, index in named.items()}
        rows = [
            {
                "name": by_index.get(d["index"], d["name"]),
                "tensor": d["name"],
                "shape": [int(s) for s in d["shape_signature"]],
                "dtype": np.dtype(d["dtype"]).name,
            }
            for d in details
        ]
        return sorted(rows, key=lambda row: row["name"]) if named else rows

    return {
        "signature": "serving_default" if names else None,
        "inputs": describe(interpreter.get_input_details(), inputs),
        "outputs": describe(interpreter.get_output_details(), outputs),
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


def _check_preprocessing(preprocessing) -> None:
    if preprocessing is None:
        return
    try:
        ok = isinstance(preprocessing, dict) and bool(json.dumps(preprocessing))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "preprocessing must be a dict of JSON values, such as "
            '{"scale": 1 / 255, "layout": "NHWC"}. '
            f"Received: preprocessing={preprocessing!r}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_tflite(
    model,
    out_dir,
    *,
    levels=None,
    quantization: str | None = None,
    representative_data=None,
    sparse_encoding: bool = False,
    evaluation_data=None,
    bundle: bool = True,
    overwrite: bool = False,
    preprocessing: dict | None = None,
) -> dict:
    """Writes one `.tflite` per level, a bundle and `manifest.json`.

    The densest level is converted once; every other level's file is that
    file with the weights the level does not use zeroed in place, which takes
    milliseconds, and is then run with the TFLite runtime on a few inputs and
    compared with the Keras model at that level (within 1e-4 of the largest
    output, 1e-2 for float16). A level is traced and converted on its own
    instead when patching cannot give it: `"dynamic"` and `"int8"` files
    quantize each level with its own scales; a level's own shared weights
    (`shared="per_level"`, `"per_level_statistics"`) are rewritten into the
    file, BatchNormalizations folded as the converter folds them, unless
    where they are is ambiguous; a weight is not found in the converted
    file; or the check fails. Each manifest row's `"made_by"`
    (`"patched"` or `"converted"`) and `"patch_fallback"` (None, or one of
    `PATCH_FALLBACKS`) say which. Exporting every level of a float32 model
    costs about one conversion plus a fraction of a second a level.

    A model embedded with `granularity="channel"` is exported by
    `elsa_tf.export_channels` instead: every level is `extract(model, level,
    physical=True)`, a physically narrower network, converted on its own and
    checked in the same way. Its rows also record `"kept_channels"`,
    `"total_channels"`, `"parameters"` and `"widths"` (each producing layer's
    units or filters). Its bundle (`elsa_tf.lite.channel_bundle`) holds
    the densest file and, for each level, the edits of shapes, options and
    buffers that make that level's narrower file.

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
        sparse_encoding: also convert each level with TFLite's sparse storage
            (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`), so that sparser levels
            may be smaller files. False by default: it costs one more trace
            and conversion per level, and saves bytes, not time (the runtime
            densifies most sparse weights when it loads the file); the
            bundle already holds every level in about the densest file's
            size. Without it every level is stored dense (`"storage_reason":
            "disabled"`). With it, a level is still stored dense (its row
            says `"sparse_encoding": false` and `"storage_reason"` says why,
            one of `STORAGE_REASONS`) when the sparse file is not smaller,
            when its outputs differ from the dense file's, when it runs
            slower than the dense file (both are timed here, batch 1, one
            thread; the row records `"latency_ms"` of each), or, for
            `"dynamic"` and `"int8"`, when the converter expands sparse
            integer weights with DENSIFY ops, which LiteRT's default XNNPACK
            delegate cannot prepare: every file runs with the runtime's
            default settings. The dense files, and the bundle, are made as
            without it.
        evaluation_data: `(x, y)` with integer or one-hot labels: each file's
            top-1 accuracy, measured with the TFLite runtime, goes into the
            manifest.
        bundle: also write the bundle (`bundle.tflite`). Not for `"int8"`:
            full-integer files carry activation ranges calibrated per level,
            which one file cannot hold for every level (a level-0 model made
            from a dense-calibrated file agreed with its Keras model on 40% of
            top-1 labels here), so the manifest's `"bundle"` is None and says
            why; nor for a model embedded with `granularity="channel"`, whose
            levels are narrower networks.
        overwrite: replace an existing non-empty `out_dir`.
        preprocessing: what to do to raw data before it is fed to the model,
            as JSON-serializable values (for example `{"scale": 1 / 255,
            "layout": "NHWC"}`); recorded as the manifest's
            `"preprocessing"`, so the device can prepare inputs as training
            did. None records nothing.

    Returns:
        The manifest, as written to `out_dir/manifest.json`.

    Raises:
        ValueError: for a model that is not embedded, an unknown quantization,
            `"int8"` without representative data, a level out of range,
            `preprocessing` that is not a JSON object, or an existing
            `out_dir` without `overwrite`. Nothing is written then.

    Example:

        manifest = elsa_tf.export_tflite(
            model, "export/", preprocessing={"scale": 1 / 255, "layout": "NHWC"}
        )
    """
    model_ops.sparsities(model)  # Raises for a model that is not embedded.
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    if quantization == "int8":
        _representative_dataset(representative_data)  # Fail before converting.
    levels = _check_levels(model, levels)
    _check_preprocessing(preprocessing)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"out_dir {out_dir} exists and is not empty; pass overwrite=True to "
            f"replace it. Received: out_dir={out_dir!r}"
        )
    # Imported here: export_channels builds on this module's checks.
    from elsa_tf import export_channels

    writer = (
        export_channels.write if export_channels.is_channel_model(model) else _write
    )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".elsa_export_", dir=parent)
    # mkdtemp makes a private (0700) folder; the export is an ordinary one,
    # with the mode os.makedirs would give it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        manifest = writer(
            model,
            staging,
            levels=levels,
            quantization=quantization,
            representative_data=representative_data,
            sparse_encoding=sparse_encoding,
            evaluation_data=evaluation_data,
            bundle=bundle,
            preprocessing=preprocessing,
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


def _dense_files(model, levels, base: bytes, quantization, representative_data, probe):
    """Every level's file in dense storage, and how each was made: the
    densest is `base`; the others are patched from it and checked against
    Keras, or converted on their own when that fails (`PATCH_FALLBACKS`)."""
    plan, reason = _find_buffers(model, levels, base, quantization)
    files, made = [], []
    for position, level in enumerate(levels[:-1]):
        content, fallback = None, reason
        if fallback is None:
            content = _patch(base, plan, position)
            fallback = _verify(model, level, content, probe, quantization)
        if fallback is not None:
            extracted = embedding.extract(model, level)
            content = _convert(extracted, quantization, representative_data, False)
        files.append(content)
        made.append(_Made("converted", fallback) if fallback else _Made("patched"))
    return [*files, base], [*made, _Made("converted")]


def _sparse_form(model, level, saved, quantization, representative_data):
    """A level converted with sparse storage, or None if the converter fails.
    `saved` is the level's SavedModel when there is one already."""
    with tempfile.TemporaryDirectory(prefix="elsa_saved_model_") as directory:
        if saved is None:
            saved = _saved_model(embedding.extract(model, level), directory)
        try:
            return _convert(saved, quantization, representative_data, True)
        except Exception:  # The converter raises RuntimeError/ConverterError.
            return None


def _bundle(dense_files, levels, rows, name) -> tuple[bytes, dict]:
    """The bundle file and its manifest entry."""
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
    return content, {
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
    preprocessing,
) -> dict:
    rows_by_level = {row["level"]: row for row in reporting.summary(model)}
    name = quantization or "float32"
    rows = []
    with tempfile.TemporaryDirectory(prefix="elsa_saved_model_") as directory:
        # The one conversion every other level is patched from.
        saved = _saved_model(embedding.extract(model, levels[-1]), directory)
        base = _convert(saved, quantization, representative_data, False)
        densest = rows_by_level[levels[-1]]["target_sparsity"]
        _check_runs(base, level_file_name(levels[-1], densest))
        signature = _signature(base)
        probe = _probe_inputs(signature, evaluation_data, representative_data)
        dense_files, made = _dense_files(
            model, levels, base, quantization, representative_data, probe
        )
        candidates = [None] * len(levels)
        if sparse_encoding:
            candidates = [
                _sparse_form(
                    model,
                    level,
                    saved if level == levels[-1] else None,
                    quantization,
                    representative_data,
                )
                for level in levels
            ]
    for level, dense, how, candidate in zip(levels, dense_files, made, candidates):
        content = dense
        storage = Storage(False, "conversion_failed" if sparse_encoding else "disabled")
        if candidate is not None:
            storage = choose_storage(candidate, dense, quantization, probe)
            if storage.sparse:
                content = candidate
        file_name = level_file_name(level, rows_by_level[level]["target_sparsity"])
        # `base` was checked, and a patched file ran when it was verified.
        if storage.sparse or (how.by == "converted" and content is not base):
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
            "made_by": how.by,
            "patch_fallback": how.fallback,
            "sparse_encoding": storage.sparse,
            "storage_reason": storage.reason,
            "dense_bytes": len(dense),
        }
        if storage.dense_ms is not None:
            row["latency_ms"] = {
                "dense": round(storage.dense_ms, 4),
                "sparse": round(storage.sparse_ms, 4),
            }
        if evaluation_data is not None:
            row["accuracy"] = _accuracy(content, evaluation_data)
        rows.append(row)

    manifest = manifest_of(model, name, rows, signature, preprocessing)
    if bundle and quantization == "int8":
        manifest["bundle"] = None
        manifest["bundle_note"] = (
            "No bundle for full-integer quantization: activation ranges are "
            "calibrated per level. Use the per-level files."
        )
    elif bundle and quantization == "dynamic" and _level_weights(model, levels).varying:
        # Each level's own normalization, folded into a kernel, gives that
        # kernel its own per-channel int8 scales, which live outside the
        # buffers a bundle holds: its levels would be silently wrong.
        manifest["bundle"] = None
        manifest["bundle_note"] = (
            "No bundle for dynamic quantization of a model whose levels have "
            "their own shared weights (shared='per_level_statistics' or "
            "'per_level'): each level's int8 kernels have their own scales. Use "
            "the per-level files."
        )
    elif bundle:
        content, manifest["bundle"] = _bundle(dense_files, levels, rows, name)
        with open(os.path.join(out_dir, BUNDLE_FILE), "wb") as f:
            f.write(content)
    save_manifest(out_dir, manifest)
    return manifest


def manifest_of(model, name: str, rows, signature: dict, preprocessing) -> dict:
    """The manifest's fields, but the bundle's, around the level rows."""
    return {
        "format": "elsa_tf.export",
        "format_version": 1,
        "elsa_tf_version": elsa_tf.__version__,
        "model": model.name,
        "quantization": name,
        "num_levels": len(model_ops.sparsities(model)),
        "levels": rows,
        **signature,
        "preprocessing": preprocessing,
        "runtime_checked": runtime.name(),
    }


def save_manifest(out_dir, manifest: dict) -> None:
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
