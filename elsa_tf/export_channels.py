"""Export channel levels as physically narrower TFLite files.

A model embedded with `granularity="channel"` has levels that are narrower
dense networks. `export_tflite` sends such a model here: every level is
`extract(model, level, physical=True)` (fewer filters and units) converted
on its own, so a level that keeps half of the channels is a file of about a
quarter of the densest level's weights and multiply-adds, not a full-width
file with zeroed channels. Each file is run with the TFLite runtime on the
probe inputs and compared with the embedded model at its level, with the
tolerance patched files are held to (1e-4 of the largest output, 1e-2 for
float16; `"dynamic"` and `"int8"` files, which quantize each level with its
own scales, must give finite outputs of the right shapes, as converted
levels of other models are not compared either).

The bundle (`bundle.tflite`) is a channel bundle (`elsa_tf.lite.channel_bundle`):
the densest file (each small integer constant that several operators read
copied for each of them: `unshare_constants`) plus, for every level, the
edits that make its narrower flatbuffer from it on the device: new tensor
shapes, quantization and Reshape options, and each narrowed constant as a
slice of the densest one (kept indices per axis, tried among the level's
kept channels of every channel group and variable axis, and an attention
layer's kept heads as runs of a flattened axis; a per-channel scale where
the level's own normalization statistics are folded into a kernel) or as
its own bytes. Every level made from the bundle is checked before the
bundle is written: the same model as the level's file, tensor by tensor
(paired operator by operator: `lite._pairing`), but for tensor names (the
converter names fused tensors after whichever ops it fused), and outputs on
the probe inputs within `MATCH_TOLERANCE` of that file's. A level that is not
the densest file's graph with narrower tensors, or that fails a check, leaves
no bundle: `"bundle"` is None and `"bundle_note"` says why. The manifest's
`"bundle"` records the bundle's size beside every level's file together
(`"level_files_bytes"`) and the densest file alone (`"densest_bytes"`), its
edits by kind, and the largest difference of a made level's outputs from its
file's on the probe inputs (`"max_abs_difference"`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

import elsa_tf
from elsa_tf import channels, embedding, export, model_ops, physical, reporting
from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import _pairing, channel_bundle, runtime

# How far a level made from the bundle may be from its own file's outputs, of
# the largest output (at least 1): a scaled slice is a float32 rounding away
# from the converter's folded kernel.
MATCH_TOLERANCE = 1e-5
NO_BUNDLE = "No bundle for these channel levels: {}. Use the per-level files."


def is_channel_model(model) -> bool:
    """Whether `model` is embedded at channel granularity (raises, as
    `model_ops.owner` does, for a model that is not embedded)."""
    return model_ops.owner(model).granularity == "channel"


def widths(narrowed) -> dict[str, int]:
    """The width of every layer that creates channels, by layer name: the
    `units` or `filters` of `channels.PRODUCERS` and `channels.SEPARABLE`,
    an attention layer's `num_heads`."""
    found = {}
    for layer in narrowed.layers:
        key = channels.PRODUCERS.get(type(layer))
        if type(layer) in channels.SEPARABLE:
            key = "filters"
        elif type(layer) in channels.ATTENTION:
            key = "num_heads"
        if key is not None:
            found[layer.name] = int(layer.get_config()[key])
    return found


def _check(model, level: int, content: bytes, probe, quantization, file_name: str):
    """Raises unless the file computes what the embedded model computes at
    `level` on `probe`, within `export`'s tolerance for `quantization`."""
    want = export._keras_outputs(model, level, probe)
    got = export._flat_outputs(runtime.predict(runtime.interpreter(content), probe))
    tolerance = export._PATCH_TOLERANCE.get(quantization, np.inf)
    if export._agree(got, want, tolerance):
        return
    shapes = [np.shape(g) for g in got], [np.shape(w) for w in want]
    if shapes[0] != shapes[1]:
        detail = f"output shapes {shapes[0]} against Keras's {shapes[1]}"
    else:
        error = max(
            float(np.abs(np.float64(g) - w).max(initial=0.0))
            / max(float(np.abs(w).max(initial=0.0)), 1e-6)
            for g, w in zip(got, want)
        )
        detail = f"a difference of {error:.3g} of the largest output"
    raise RuntimeError(
        f"The exported {file_name} (level {level}, physically narrowed) does not "
        f"compute what the Keras model computes at that level: {detail} "
        f"(tolerance {tolerance:g}, quantization={quantization!r})."
    )


def write(
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
    """`export._write` for a channel-granularity model: every level narrowed
    and converted on its own, checked, and written with `manifest.json` and,
    with `bundle`, a channel bundle (see the module docstring).

    Takes `export_tflite`'s checked arguments. `sparse_encoding` changes
    nothing: a narrowed level holds no pruned zeros for sparse storage to
    leave out, so no sparse form is made and each row's `"storage_reason"`
    says `"narrowed"`.
    """
    del sparse_encoding  # See the docstring: recorded in each row's reason.
    rows_by_level = {row["level"]: row for row in reporting.summary(model)}
    name = quantization or "float32"
    narrowed, contents = {}, {}
    with tempfile.TemporaryDirectory(prefix="elsa_saved_model_") as directory:
        # Densest first: its file gives the signature and the probe inputs.
        for level in reversed(levels):
            narrowed[level] = embedding.extract(model, level, physical=True)
            saved = export._saved_model(
                narrowed[level], os.path.join(directory, str(level))
            )
            contents[level] = export._convert(
                saved, quantization, representative_data, False
            )
    file_names = {
        level: export.level_file_name(level, rows_by_level[level]["target_sparsity"])
        for level in levels
    }
    export._check_runs(contents[levels[-1]], file_names[levels[-1]])
    signature = export._signature(contents[levels[-1]])
    probe = export._probe_inputs(signature, evaluation_data, representative_data)
    rows = []
    for level in levels:
        content, file_name = contents[level], file_names[level]
        export._check_runs(content, file_name)
        _check(model, level, content, probe, quantization, file_name)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(content)
        summary = rows_by_level[level]
        row = {
            "level": level,
            "target_sparsity": summary["target_sparsity"],
            "achieved_sparsity": summary["achieved_sparsity"],
            "file": file_name,
            "bytes": len(content),
            "sha256": export._sha256(content),
            "quantization": name,
            "made_by": "converted",
            # As for other models, None for the densest level; every other
            # level is converted because it is narrower.
            "patch_fallback": None if level == levels[-1] else "narrowed",
            "sparse_encoding": False,
            "storage_reason": "narrowed",
            "dense_bytes": len(content),
            "kept_channels": summary["kept_channels"],
            "total_channels": summary["total_channels"],
            "parameters": int(narrowed[level].count_params()),
            "widths": widths(narrowed[level]),
        }
        if evaluation_data is not None:
            row["accuracy"] = export._accuracy(content, evaluation_data)
        rows.append(row)
    manifest = export.manifest_of(model, name, rows, signature, preprocessing)
    if bundle:
        files = [contents[level] for level in levels]
        try:
            content, entry = _bundle(model, levels, files, rows, name, probe)
        except BundleRefused as e:
            manifest["bundle"] = None
            manifest["bundle_note"] = NO_BUNDLE.format(e)
        else:
            manifest["bundle"] = entry
            with open(os.path.join(out_dir, export.BUNDLE_FILE), "wb") as f:
                f.write(content)
    export.save_manifest(out_dir, manifest)
    return manifest


class BundleRefused(Exception):
    """Why no channel bundle is written (the export goes on without one)."""


def candidates(model, level: int) -> list[np.ndarray]:
    """Index arrays a narrowed tensor axis of `level` may keep: the kept
    channels of each channel group, and the kept indices along each axis of
    each variable (a Dense kernel after Flatten keeps whole spatial runs)."""
    owner = model_ops.owner(model)
    keep = model_ops.channel_keep(owner, level)
    groups = owner.channel_groups
    kept = physical.kept_channels(groups, keep)
    found = list(kept)
    shapes = {v.path: tuple(v.shape) for v in owner.inner_model.weights}
    for axes in physical.kept_indices(groups, keep, shapes).values():
        found.extend(axes.values())
    heads = {
        layer.query_dense.kernel.path
        for layer in owner.inner_model.layers
        if type(layer) in channels.ATTENTION
    }
    for group, channels_kept in zip(groups, kept):
        if any(m.path in heads and m.axis == 1 for m in group.members):
            found.extend(_head_runs(group, channels_kept, shapes))
    unique = {}
    for indices in found:
        unique.setdefault((len(indices), indices.tobytes()), indices)
    return list(unique.values())


def _head_runs(group, kept, shapes) -> list[np.ndarray]:
    """The kept heads of an attention layer as runs of a flattened axis: the
    converter stores a `(d, heads, key_dim)` kernel as `(heads * key_dim, d)`,
    so head `h` is rows `h * key_dim` to `(h + 1) * key_dim`. One run per way
    of merging the heads axis with the axes after it."""
    runs = []
    for member in group.members:
        shape = shapes[member.path]
        for end in range(member.axis + 2, len(shape) + 1):
            size = int(np.prod(shape[member.axis + 1 : end]))
            runs.append((kept[:, None] * size + np.arange(size)).reshape(-1))
    return runs


def _difference(a, b, path: str = "model") -> str | None:
    """Where two flatbuffer object trees (`flatbuffer_utils`) differ, or None."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} against {type(b).__name__}"
    if isinstance(a, np.ndarray):
        same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        return None if same else f"{path}: {a.tolist()[:8]} against {b.tolist()[:8]}"
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if hasattr(a, "__dict__"):
        for key in a.__dict__:
            found = _difference(getattr(a, key), getattr(b, key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else f"{path}: {a!r} against {b!r}"


def _same_model(made: bytes, level_file: bytes, scaled: set[int]) -> str | None:
    """Where the level made from the bundle differs from the level's file,
    as a model: None when they are the same but for tensor names, the
    bundle's emptied payload buffer, how tensors and buffers are numbered
    (the made level keeps the densest file's numbering, and two of its
    tensors may be one of the level file's: `lite._pairing`), and float32
    buffers in `scaled` (densest buffer indices), which may differ by
    `channel_bundle.SCALE_TOLERANCE` of their largest value."""
    from tensorflow.lite.tools import flatbuffer_utils

    try:
        mapping = _pairing.pair_tensors(
            fb.read_model(made),
            fb.read_model(level_file),
            fb.read_operators(made),
            fb.read_operators(level_file),
        )
    except _pairing.GraphMismatch as e:
        return str(e)
    a = flatbuffer_utils.convert_bytearray_to_object(bytearray(made))
    b = flatbuffer_utils.convert_bytearray_to_object(bytearray(level_file))
    entry = [m for m in a.metadata if m.name.decode() == channel_bundle.METADATA_NAME]
    if len(entry) != 1 or entry[0].buffer != len(a.buffers) - 1:
        return "the bundle's payload is not its last buffer"
    if a.buffers[-1].data is not None and len(a.buffers[-1].data):
        return "the bundle's payload buffer is not emptied"
    a.metadata = [m for m in a.metadata if m is not entry[0]]

    def data(tree, index: int) -> bytes:
        found = tree.buffers[index].data
        return b"" if found is None else found.tobytes()

    def same(index_a: int, index_b: int, what: str) -> str | None:
        x, y = data(a, index_a), data(b, index_b)
        if index_a in scaled:
            x, y = np.frombuffer(x, np.float32), np.frombuffer(y, np.float32)
            limit = channel_bundle.SCALE_TOLERANCE * max(float(np.abs(y).max()), 1e-30)
            if x.shape != y.shape or not np.abs(x - y).max(initial=0) <= limit:
                return f"{what}, a scaled slice, is not within {limit:.3g}"
        elif x != y:
            return f"{what} holds other bytes"
        return None

    def renumber(indices, s):
        if indices is None:
            return None
        return np.array([mapping[s, i] if i >= 0 else i for i in indices], np.int32)

    # The made level in the level file's numbering: each of its tensors
    # holds what the level file's tensor does, then takes its place.
    for s, (sa, sb) in enumerate(zip(a.subgraphs or [], b.subgraphs or [])):
        placed = [None] * len(sb.tensors or [])
        for i, ta in enumerate(sa.tensors or []):
            if (s, i) not in mapping:
                continue
            tb = sb.tensors[mapping[s, i]]
            where = same(ta.buffer, tb.buffer, f"subgraph {s} tensor {tb.name!r}")
            if where:
                return where
            ta.name, ta.buffer = tb.name, tb.buffer
            if placed[mapping[s, i]] is None:
                placed[mapping[s, i]] = ta
            else:
                where = _difference(ta, placed[mapping[s, i]], f"tensor {tb.name!r}")
                if where:
                    return where
        if any(t is None for t in placed):
            return f"subgraph {s} of the level file has tensors the made level lacks"
        sa.tensors = placed
        sa.inputs, sa.outputs = renumber(sa.inputs, s), renumber(sa.outputs, s)
        for op in sa.operators or []:
            if op.intermediates is not None and len(op.intermediates):
                return f"subgraph {s} has operators with intermediate tensors"
            op.inputs, op.outputs = renumber(op.inputs, s), renumber(op.outputs, s)
    for signature in a.signatureDefs or []:
        for tensor in (*(signature.inputs or []), *(signature.outputs or [])):
            key = (signature.subgraphIndex, tensor.tensorIndex)
            if key not in mapping:
                return f"signature {signature.signatureKey!r} names tensor {key}"
            tensor.tensorIndex = mapping[key]
    own = {m.name: m for m in b.metadata or []}
    for ma in a.metadata:
        mb = own.get(ma.name)
        where = mb and same(ma.buffer, mb.buffer, f"metadata {ma.name!r}")
        if where:
            return where
        ma.buffer = ma.buffer if mb is None else mb.buffer
    # Every buffer that is read was compared above, through what reads it.
    a.buffers = b.buffers
    a.metadataBuffer = b.metadataBuffer
    return _difference(a, b)


# TFLite tensor types of the constants `unshare_constants` gives each reader
# its own copy of: INT32 and INT64, the types of shapes and axes.
_SHAPE_TYPES = (2, 4)
_SHAPE_SIZE = 8  # elements at most: a shape's rank


def unshare_constants(content: bytes) -> bytes:
    """The file with every small integer constant (rank 0 or 1, at most
    `_SHAPE_SIZE` elements: a shape, an axis) that several operator inputs
    read copied, one copy per reader.

    The converter stores equal constants once, so the densest level's file
    may hold one shape constant `[16]` for two Dense layers of width 16 (a
    transformer's stream and its feed-forward output), which a level that
    narrows only one of them must split. A bundle made of this file instead
    never has to split a tensor, only to pair several of its tensors with
    one of a level's (`lite._pairing`). The copies cost a few bytes each.
    """
    import copy

    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    changed = False
    for subgraph in model.subgraphs or []:
        seen = set()
        for op in subgraph.operators or []:
            if op.inputs is None:
                continue
            inputs = list(op.inputs)
            for position, index in enumerate(inputs):
                if index < 0:
                    continue
                tensor = subgraph.tensors[index]
                data = model.buffers[tensor.buffer].data
                small = (
                    tensor.shape is not None
                    and len(tensor.shape) <= 1
                    and int(np.prod(tensor.shape)) <= _SHAPE_SIZE
                )
                if (
                    data is None
                    or not len(data)
                    or tensor.type not in _SHAPE_TYPES
                    or tensor.isVariable
                ):
                    continue
                if not small or index not in seen:
                    seen.add(index)
                    continue
                twin = copy.deepcopy(tensor)
                buffer = schema.BufferT()
                buffer.data = np.array(data, copy=True)
                model.buffers.append(buffer)
                twin.buffer = len(model.buffers) - 1
                subgraph.tensors.append(twin)
                inputs[position] = len(subgraph.tensors) - 1
                changed = True
            op.inputs = np.array(inputs, np.int32)
    if not changed:
        return content
    builder = export._aligned_builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def bundle_file(densest: bytes, payload: bytes) -> bytes:
    """The bundle file: `densest` with the payload of `channel_bundle.encode`
    as metadata, its placeholders filled (the file's length, and the digest
    of every level made from it)."""
    draft = export.add_metadata(densest, channel_bundle.METADATA_NAME, payload)
    header = channel_bundle.read_header(payload)
    digests = [
        channel_bundle.level_digest(level, made)
        for level, made in zip(
            header["levels"], channel_bundle.unverified_levels(draft)
        )
    ]
    filled = channel_bundle.fill_placeholders(payload, len(draft), digests)
    content = export.add_metadata(densest, channel_bundle.METADATA_NAME, filled)
    if len(content) != len(draft):
        raise RuntimeError(
            f"Filling in the bundle's digests changed its length from "
            f"{len(draft)} to {len(content)} bytes."
        )
    return content


def _bundle(model, levels, files, rows, name, probe) -> tuple[bytes, dict]:
    """The channel bundle file and its manifest entry.

    Raises:
        BundleRefused: naming the level and what keeps it out of a bundle.
    """
    base = unshare_constants(files[-1])
    try:
        payload, stats = channel_bundle.encode(
            files,
            [candidates(model, level) for level in levels],
            base=base,
            header={
                "levels": list(levels),
                # As the weight bundle's header: tools read a bare bundle.
                "target_sparsity": [r["target_sparsity"] for r in rows],
                "achieved_sparsity": [r["achieved_sparsity"] for r in rows],
                "quantization": name,
                "elsa_tf_version": elsa_tf.__version__,
            },
        )
    except channel_bundle.UnsupportedLevels as e:
        raise BundleRefused(str(e).rstrip(".")) from e
    content = bundle_file(base, payload)
    bundle = channel_bundle.read_bundle(content)
    edits = bundle.edits()
    largest = 0.0
    for level, position, level_file in zip(levels, range(len(levels)), files):
        made = bundle.materialize(level)
        scaled = {e["buffer"] for e in edits[position] if "scale" in e}
        where = _same_model(made, level_file, scaled)
        if where is not None:
            raise BundleRefused(f"level {level} made from it differs at {where}")
        try:
            got = runtime.predict(runtime.interpreter(made), probe)
        except Exception as e:  # The runtimes raise RuntimeError or ValueError.
            raise BundleRefused(f"level {level} made from it does not run: {e}") from e
        got = export._flat_outputs(got)
        want = export._flat_outputs(
            runtime.predict(runtime.interpreter(level_file), probe)
        )
        for g, w in zip(got, want):
            error = float(np.abs(np.float64(g) - w).max(initial=0.0))
            scale = max(float(np.abs(np.float64(w)).max(initial=0.0)), 1.0)
            if not error <= MATCH_TOLERANCE * scale:
                raise BundleRefused(
                    f"level {level} made from it differs from its file by "
                    f"{error:.3g} on the probe inputs"
                )
            largest = max(largest, error)
    export._check_runs(content, export.BUNDLE_FILE)
    return content, {
        "file": export.BUNDLE_FILE,
        "format": channel_bundle.METADATA_NAME,
        "bytes": len(content),
        "sha256": export._sha256(content),
        "levels": list(levels),
        # The bundle beside what it replaces: every level's file, and the
        # densest alone (what a device would hold without levels).
        "level_files_bytes": sum(len(f) for f in files),
        "densest_bytes": len(files[-1]),
        "data_bytes": stats.data_bytes,
        "vector_edits": stats.vector_edits,
        "sliced_buffers": stats.sliced_buffers,
        "scaled_buffers": stats.scaled_buffers,
        "stored_buffers": stats.stored_buffers,
        "stored_bytes": stats.stored_bytes,
        "exact": stats.scaled_buffers == 0,
        "max_abs_difference": largest,
    }
