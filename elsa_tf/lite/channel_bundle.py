"""The channel bundle: one `.tflite` file from which every channel level is made.

A model embedded with `granularity="channel"` exports each level as a
physically narrower file (`elsa_tf.export_channels`). Its bundle is the
densest level's file with one extra metadata entry, `"elsa_tf.channel_bundle"`,
holding `MAGIC`, a little-endian uint32 header length, a JSON header and an
xz-compressed data section. For every level the header lists *edits* of the
densest file, each pointing into the data section:

* a *vector edit* rewrites a vector that carries a width with the level's
  values: a tensor's `shape` or `shape_signature` (same length: ranks do not
  change), its quantization `min`, `max`, `scale` or `zero_point` (shorter
  per-channel vectors), or an int32 vector of an operator's builtin options
  (`WIDTH_OPTIONS`: a Reshape's `new_shape`);
* a *buffer edit* gives a constant buffer the level's bytes, as a `"slice"`
  of the densest buffer (the kept indices along each narrowed axis, then, for
  float32 weights into which a level's own normalization statistics were
  folded, a per-channel `"scale"` along one axis), or as the level's own
  `"bytes"` when neither reproduces it.

`materialize(level)` makes the level in place, in pure NumPy: the densest
file is copied and every vector and buffer edited where it lies. Ranks do not
change and no width grows, so every new vector fits in the old one's place;
a shorter vector gets its new length and the bytes after it, left over, are
zeroed. (Rebuilding a compact file would need a writer for the whole TFLite
schema, options tables included; rewriting in place needs only where each
rewritten vector lies.) The level made is therefore as large as the bundle
file, its slack zeros, but its tensors are the level's, so the interpreter
allocates and computes the narrower network. The bundle's own payload is
zeroed too and its buffer emptied, so a made level is not a bundle and its
bytes do not depend on the payload's content. A SHA-256 of each made level,
recorded at export, is checked after every materialization: a truncated or
corrupt bundle raises `BundleError`, never yields a wrong model.

`encode` (used at export, pure NumPy too) pairs each level's file with the
densest file operator by operator, and so tensor by tensor (`_pairing`: a
level may hold one tensor where the densest file holds two equal-valued
ones, as the converter stores equal constants once). Files that differ in
anything but these widths and buffers raise `UnsupportedLevels`; the export
then writes no bundle and says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import lzma
import math
import os
import struct
from collections.abc import Sequence

import numpy as np

from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import _pairing
from elsa_tf.lite import bundle as bundle_lib
from elsa_tf.lite.bundle import BundleError

METADATA_NAME = "elsa_tf.channel_bundle"
MAGIC = b"ELSACHNL"
FORMAT_VERSION = 1
# Filled in after the bundle file is built, over placeholders of the same
# width, so that filling them moves nothing (`fill_placeholders`).
FILE_BYTES_PLACEHOLDER = "0" * 12
DIGEST_PLACEHOLDER = "0" * 64
# Builtin options whose int32 vectors carry widths: (options type in the
# TFLite schema's BuiltinOptions union, field) -> what it is.
WIDTH_OPTIONS = {(17, 0): "ReshapeOptions.new_shape"}
# A float32 buffer is a scaled slice when rescaling the slice reproduces it
# to this fraction of its largest value: a few float32 roundings.
SCALE_TOLERANCE = 1e-6
# Index sets tried per buffer, at most: more means an ambiguous model, whose
# buffer is then stored as it is.
MAX_COMBINATIONS = 256


class UnsupportedLevels(ValueError):
    """The levels' files differ from the densest one in more than widths, so
    no channel bundle can describe them."""


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What `encode` stored: edits by kind and the data section's size."""

    vector_edits: int
    sliced_buffers: int
    scaled_buffers: int
    stored_buffers: int
    stored_bytes: int
    data_bytes: int


def level_digest(level: int, made: bytes) -> str:
    """The SHA-256 recorded for a level made from a channel bundle: of its
    bytes, after its level number, so a header whose level numbers were
    changed cannot pass one level off as another."""
    return hashlib.sha256(f"elsa_tf level {int(level)}\n".encode() + made).hexdigest()


class _Data:
    """The data section being written; each array is referred to by
    [offset, number of bytes]."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, array: np.ndarray) -> list[int]:
        raw = np.ascontiguousarray(array).tobytes()
        ref = [self.size, len(raw)]
        self.parts.append(raw)
        self.size += len(raw)
        return ref


def _rebuild(dense: np.ndarray, takes, scale) -> np.ndarray:
    """The level's array from the densest one: indices kept along each axis,
    then a per-channel scale along one axis (float32)."""
    out = dense
    for axis, indices in takes:
        out = np.take(out, indices, axis=axis)
    if scale is not None:
        axis, ratios = scale
        if ratios.shape != (out.shape[axis],):
            raise ValueError(
                f"{ratios.size} scales for an axis of {out.shape[axis]} channels."
            )
        shape = [1] * out.ndim
        shape[axis] = -1
        out = (out * ratios.reshape(shape)).astype(out.dtype)
    return out


def _ratios(level: np.ndarray, sliced: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(level.ndim) if a != axis)
    s, lv = sliced.astype(np.float64), level.astype(np.float64)
    num, den = (lv * s).sum(axis=other), (s * s).sum(axis=other)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0).astype(np.float32)


def _index_sets(dense_shape, level_shape, candidates):
    """Per axis, the index arrays that could give the level's width."""
    per_axis = []
    for n, m in zip(dense_shape, level_shape):
        if m == n:
            per_axis.append([None])
        else:
            per_axis.append(
                [c for c in candidates if len(c) == m and m and int(c.max()) < n]
            )
    return per_axis


def _match_buffer(dense, level, candidates):
    """How to make the `level` array from the `dense` one: `(takes, scale)`
    for `_rebuild`, exact or, with a scale, within `SCALE_TOLERANCE`; None
    when no candidate index sets give it."""
    per_axis = _index_sets(dense.shape, level.shape, candidates)
    combinations = 1
    for options in per_axis:
        combinations *= len(options)
    if not combinations or combinations > MAX_COMBINATIONS:
        return None
    target = level.tobytes()
    scaled = None
    for combo in itertools.product(*per_axis):
        takes = [(a, idx) for a, idx in enumerate(combo) if idx is not None]
        sliced = _rebuild(dense, takes, None)
        if sliced.tobytes() == target:
            return takes, None
        if scaled is not None or dense.dtype != np.float32 or not level.size:
            continue
        limit = SCALE_TOLERANCE * max(float(np.abs(level).max()), 1e-30)
        # Only along an axis whose scales are at most half the weights: a
        # vector scaled element by element is stored as it is.
        for axis in (a for a in range(level.ndim) if 2 * level.shape[a] <= level.size):
            ratios = _ratios(level, sliced, axis)
            made = _rebuild(sliced, [], (axis, ratios))
            if np.isfinite(made).all() and np.abs(made - level).max() <= limit:
                scaled = takes, (axis, ratios)
                break
    return scaled


def _vectors(data, model: fb.ModelRef, operators) -> dict[tuple, np.ndarray]:
    """Every vector an edit may rewrite, by path, None where absent."""
    found = {}
    for t in model.tensors:
        for name in (*fb.TENSOR_VECTORS, *fb.QUANTIZATION_VECTORS):
            path = ("tensor", t.subgraph, t.index, name)
            found[path] = fb.read_vector(data, fb.locate(data, path))
    for op in operators:
        for options_type, field in WIDTH_OPTIONS:
            if op.options_type == options_type:
                path = ("options", op.subgraph, op.index, options_type, field)
                found[path] = fb.read_vector(data, fb.locate(data, path))
    return found


def _check_same_graph(
    position: int, dense, level, dense_ops, level_ops
) -> tuple[dict, dict]:
    """Raises `UnsupportedLevels` unless `level` is `dense` with narrower
    tensors (`_pairing`); returns which level tensor each densest tensor is,
    `(subgraph, index) -> index`, and which level buffer each densest buffer
    is, `index -> index`."""

    def fail(what):
        raise UnsupportedLevels(
            f"Level file {position} is not the densest file's graph with other "
            f"widths: {what}."
        )

    try:
        tensor_map = _pairing.pair_tensors(dense, level, dense_ops, level_ops)
    except _pairing.GraphMismatch as e:
        fail(str(e))
    if sorted(level.metadata) != sorted(dense.metadata):
        fail(f"metadata {sorted(level.metadata)} against {sorted(dense.metadata)}")
    buffer_map = {dense.metadata[name]: level.metadata[name] for name in dense.metadata}
    level_tensors = {(t.subgraph, t.index): t for t in level.tensors}
    for b in dense.tensors:
        if (b.subgraph, b.index) not in tensor_map:
            continue
        a = level_tensors[b.subgraph, tensor_map[b.subgraph, b.index]]
        if (a.type, a.sparse) != (b.type, b.sparse):
            fail(f"tensor {b.index} ({b.name!r}) differs in type")
        if bool(level.buffers[a.buffer].size) != bool(dense.buffers[b.buffer].size):
            fail(f"tensor {b.index} ({b.name!r}) is a constant in one file only")
        if len(a.shape) != len(b.shape) or any(i > j for i, j in zip(a.shape, b.shape)):
            fail(f"tensor {b.index} ({b.name!r}) has shape {a.shape}, not {b.shape}")
        if buffer_map.setdefault(b.buffer, a.buffer) != a.buffer:
            fail(
                f"buffer {b.buffer} is the level's buffers {buffer_map[b.buffer]} "
                f"and {a.buffer}"
            )
    return tensor_map, buffer_map


def _edits(position, dense_data, level_data, candidates, data: _Data, counts):
    dense, level = fb.read_model(dense_data), fb.read_model(level_data)
    dense_ops, level_ops = fb.read_operators(dense_data), fb.read_operators(level_data)
    tensor_map, buffer_map = _check_same_graph(
        position, dense, level, dense_ops, level_ops
    )
    edits = []
    dense_vectors = _vectors(dense_data, dense, dense_ops)
    level_vectors = _vectors(level_data, level, level_ops)
    for path, old in dense_vectors.items():
        if path[0] == "tensor":
            index = tensor_map.get(path[1:3])
            if index is None:  # Read by nothing: left as it is.
                continue
            new = level_vectors[(*path[:2], index, *path[3:])]
        else:
            new = level_vectors[path]
        if new is None and old is None:
            continue
        if new is None or old is None or len(new) > len(old):
            raise UnsupportedLevels(
                f"Level file {position}'s {path} cannot be written over the "
                f"densest file's: {None if new is None else new.tolist()} "
                f"against {None if old is None else old.tolist()}."
            )
        if len(new) != len(old) or not np.array_equal(new, old):
            edits.append(
                {"vector": list(path), "dtype": new.dtype.str, "data": data.add(new)}
            )
            counts["vector"] += 1
    owners = fb.constant_tensors(dense)
    level_tensors = {(t.subgraph, t.index): t for t in level.tensors}
    for ref in dense.buffers:
        if ref.index not in buffer_map:  # Read by nothing: left as it is.
            continue
        old = bytes(fb.buffer_bytes(dense_data, ref))
        new = bytes(fb.buffer_bytes(level_data, level.buffers[buffer_map[ref.index]]))
        if new == old:
            continue
        if len(new) > len(old):
            raise UnsupportedLevels(
                f"Level file {position}'s buffer {ref.index} is {len(new)} bytes, "
                f"more than the densest file's {len(old)}."
            )
        edit = {"buffer": ref.index, "length": len(new)}
        tensor = owners.get(ref.index)
        key = None if tensor is None else (tensor.subgraph, tensor.index)
        match = None
        if key in tensor_map and tensor.dtype is not None and not tensor.sparse:
            dtype, shape = tensor.dtype, tensor.shape
            level_shape = level_tensors[key[0], tensor_map[key]].shape
            fits = int(np.prod(shape)) * dtype.itemsize == len(old)
            if fits and int(np.prod(level_shape)) * dtype.itemsize == len(new):
                match = _match_buffer(
                    np.frombuffer(old, dtype).reshape(shape),
                    np.frombuffer(new, dtype).reshape(level_shape),
                    candidates,
                )
        if match is None:
            edit["bytes"] = data.add(np.frombuffer(new, np.uint8))
            counts["bytes"] += 1
            counts["stored_bytes"] += len(new)
        else:
            takes, scale = match
            edit["dtype"] = dtype.str
            edit["shape"] = list(shape)
            edit["take"] = [[a, data.add(i.astype("<i4"))] for a, i in takes]
            if scale is not None:
                edit["scale"] = [scale[0], data.add(scale[1].astype("<f4"))]
            counts["scaled" if scale is not None else "sliced"] += 1
        edits.append(edit)
    return edits


def encode(
    level_files: Sequence[bytes],
    candidates: Sequence[Sequence[np.ndarray]] | None = None,
    *,
    header: dict | None = None,
    base: bytes | None = None,
) -> tuple[bytes, EncodeStats]:
    """Builds a channel bundle's payload from every level's file.

    Args:
        level_files: the `.tflite` bytes of the levels, sparsest first; the
            last is the densest.
        candidates: per level, index arrays that may be a narrowed axis's
            kept indices (the kept channels of each channel group and of each
            variable's axes). A buffer is sliced only along these; without
            them, every narrowed buffer is stored.
        header: extra JSON fields stored in the header.
        base: the file the bundle is made of: the densest level's graph, in
            which a level may hold one tensor where `base` holds several
            (`_pairing`). None for the densest level's file itself.

    Returns:
        The payload, with placeholder digests and file length
        (`fill_placeholders` writes them once the bundle file exists), and
        what it holds.

    Raises:
        UnsupportedLevels: if a level's file is not the densest file's graph
            with narrower tensors.
    """
    if not level_files:
        raise ValueError("encode needs at least one level file.")
    if candidates is None:
        candidates = [[] for _ in level_files]
    if len(candidates) != len(level_files):
        raise ValueError(
            f"encode needs one list of candidates per level file "
            f"({len(level_files)}). Received: {len(candidates)} lists"
        )
    data = _Data()
    counts = dict.fromkeys(("vector", "sliced", "scaled", "bytes", "stored_bytes"), 0)
    edits = [
        _edits(
            position,
            level_files[-1] if base is None else base,
            content,
            [np.asarray(c, np.int64) for c in level_candidates],
            data,
            counts,
        )
        for position, (content, level_candidates) in enumerate(
            zip(level_files, candidates)
        )
    ]
    # The edits themselves go in the compressed section too: their JSON
    # repeats the same keys for every tensor.
    text = json.dumps(edits, sort_keys=True).encode("utf-8")
    edits_ref = data.add(np.frombuffer(text, np.uint8))
    packed = lzma.compress(b"".join(data.parts), format=lzma.FORMAT_XZ)
    full = dict(header or {})
    full.setdefault("levels", list(range(len(level_files))))
    full.update(
        format="elsa_tf.channel_bundle",
        format_version=FORMAT_VERSION,
        num_levels=len(level_files),
        file_bytes=FILE_BYTES_PLACEHOLDER,
        data_bytes=len(packed),
        raw_bytes=data.size,
        edits=edits_ref,
        digests=[DIGEST_PLACEHOLDER] * len(level_files),
    )
    stats = EncodeStats(
        vector_edits=counts["vector"],
        sliced_buffers=counts["sliced"],
        scaled_buffers=counts["scaled"],
        stored_buffers=counts["bytes"],
        stored_bytes=counts["stored_bytes"],
        data_bytes=len(packed),
    )
    return _pack(full, packed), stats


def _pack(header: dict, packed: bytes) -> bytes:
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(text)), text, packed])


def fill_placeholders(payload: bytes, file_bytes: int, digests: Sequence[str]):
    """The payload with the bundle file's length and the levels' digests
    written over their placeholders (same length: nothing moves)."""
    header, packed = _parse(payload)
    if len(digests) != len(header["digests"]):
        raise ValueError(
            f"fill_placeholders needs {len(header['digests'])} digests. "
            f"Received: {len(digests)}"
        )
    header.update(file_bytes=f"{file_bytes:012d}", digests=list(digests))
    filled = _pack(header, packed)
    if len(filled) != len(payload):
        raise ValueError(
            f"The filled payload is {len(filled)} bytes, not {len(payload)}. "
            f"Received: file_bytes={file_bytes}"
        )
    return filled


def read_header(payload: bytes) -> dict:
    """The JSON header of a channel bundle's payload."""
    return _parse(payload)[0]


def _parse(payload: bytes) -> tuple[dict, bytes]:
    if not payload:
        raise BundleError(
            "The channel bundle's payload is empty: this is a level made from a "
            "channel bundle, not the bundle."
        )
    if payload[: len(MAGIC)] != MAGIC or len(payload) < len(MAGIC) + 4:
        raise BundleError(
            "The channel bundle's metadata does not start with elsa_tf's mark."
        )
    (length,) = struct.unpack_from("<I", payload, len(MAGIC))
    start = len(MAGIC) + 4
    if start + length > len(payload):
        raise BundleError("The channel bundle's header is truncated.")
    try:
        header = json.loads(payload[start : start + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"The channel bundle's header is corrupt: {e}.") from e
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise BundleError(
            f"Unsupported channel bundle format version {version!r}; this "
            f"elsa_tf reads version {FORMAT_VERSION}."
        )
    packed = payload[start + length :]
    if header.get("data_bytes") != len(packed):
        raise BundleError(
            f"The channel bundle's data section is {len(packed)} bytes; its "
            f"header describes {header.get('data_bytes')!r}. It is truncated "
            "or was modified."
        )
    return header, packed


def _check_header(header: dict) -> None:
    """Raises unless the header's fields have the format's types and agree."""
    n = header.get("num_levels")
    fields = {k: header.get(k) for k in ("levels", "digests")}
    ok = isinstance(n, int) and n >= 1 and isinstance(header.get("raw_bytes"), int)
    ok = ok and all(isinstance(v, list) and len(v) == n for v in fields.values())
    ok = ok and all(isinstance(d, str) for d in fields["digests"])
    levels = fields["levels"]
    ok = ok and all(type(k) is int for k in levels) and len(set(levels)) == n
    if not ok or header["raw_bytes"] < 0:
        raise BundleError(
            "The channel bundle's header does not have the format's fields: "
            f"num_levels={n!r}, {len(json.dumps(header))} characters. It is "
            "corrupt or was modified."
        )


class ChannelBundle(bundle_lib.BundleLevels):
    """A channel bundle read into memory; `materialize(level)` makes a level.

    Has the weight bundle's interface (`levels`, `num_levels`, `data`,
    `materialize`), so `LevelRunner` runs either.
    """

    def __init__(self, data: bytes, model: fb.ModelRef, header: dict, packed: bytes):
        self._data = data
        self._model = model
        self.header = header
        self._packed = packed
        self._raw = None
        self._edits = None

    def _raw_data(self) -> bytes:
        if self._raw is None:
            expected = self.header["raw_bytes"]
            decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            try:
                # Never more than the header says: a corrupt stream cannot
                # make the reader allocate without bound.
                raw = decompressor.decompress(self._packed, max_length=expected + 1)
            except lzma.LZMAError as e:
                raise BundleError(
                    f"The channel bundle's data section is corrupt: {e}."
                ) from e
            if len(raw) != expected or not decompressor.eof:
                raise BundleError(
                    f"The channel bundle's data section holds {len(raw)} bytes; "
                    f"its header describes {self.header['raw_bytes']!r}."
                )
            self._raw = raw
        return self._raw

    def edits(self) -> list[list[dict]]:
        """Per level, the edits that make it from the densest file."""
        if self._edits is None:
            text = self._array(self.header["edits"], "u1").tobytes()
            try:
                edits = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BundleError(
                    f"The channel bundle's edits are corrupt: {e}."
                ) from e
            if not isinstance(edits, list) or len(edits) != self.num_levels:
                raise BundleError(
                    f"The channel bundle's edits are not {self.num_levels} lists."
                )
            self._edits = edits
        return self._edits

    def _array(self, ref, dtype) -> np.ndarray:
        offset, size = (int(v) for v in ref)
        dtype = np.dtype(dtype)
        raw = self._raw_data()
        if offset < 0 or size < 0 or offset + size > len(raw) or size % dtype.itemsize:
            raise BundleError(
                f"The channel bundle refers to bytes {offset}..{offset + size} "
                f"of {dtype} in a data section of {len(raw)} bytes."
            )
        return np.frombuffer(raw, dtype, size // dtype.itemsize, offset)

    def _locate(self, path) -> fb.VectorRef:
        ref = fb.locate(self._data, tuple(path))
        if ref is None:
            raise BundleError(f"The bundle's {tuple(path)} does not exist.")
        return ref

    @staticmethod
    def _write(out: np.ndarray, ref: fb.VectorRef, raw: bytes) -> None:
        """Writes a vector's new elements and length where it lies."""
        if len(raw) > ref.size or len(raw) % np.dtype(ref.dtype).itemsize:
            raise BundleError(
                f"A channel bundle edit writes {len(raw)} bytes over a vector "
                f"of {ref.size} bytes at byte {ref.start}."
            )
        count = len(raw) // np.dtype(ref.dtype).itemsize
        out[ref.start - 4 : ref.start] = np.frombuffer(struct.pack("<I", count), "u1")
        out[ref.start : ref.start + len(raw)] = np.frombuffer(raw, "u1")
        out[ref.start + len(raw) : ref.start + ref.size] = 0  # Slack.

    def _buffer_bytes(self, edit) -> bytes:
        if "bytes" in edit:
            return self._array(edit["bytes"], "u1").tobytes()
        dtype = np.dtype(edit["dtype"])
        shape = [int(n) for n in edit["shape"]]
        ref = self._locate(("buffer", edit["buffer"]))
        if any(n < 0 for n in shape) or math.prod(shape) * dtype.itemsize != ref.size:
            raise BundleError(
                f"The channel bundle gives buffer {edit['buffer']} ({ref.size} "
                f"bytes) the shape {shape} of {dtype}."
            )
        dense = np.frombuffer(self._data, dtype, ref.size // dtype.itemsize, ref.start)
        takes = []
        for axis, indices in edit["take"]:
            indices = self._array(indices, "<i4")
            if not 0 <= axis < len(shape) or (
                indices.size and not 0 <= indices.min() <= indices.max() < shape[axis]
            ):
                raise BundleError(
                    f"The channel bundle slices buffer {edit['buffer']} of shape "
                    f"{shape} along axis {axis} past its end."
                )
            takes.append((axis, indices))
        scale = None
        if "scale" in edit:
            axis, ratios = edit["scale"]
            ratios = self._array(ratios, "<f4")
            if dtype != np.float32 or not 0 <= axis < len(shape):
                raise BundleError(
                    f"The channel bundle scales buffer {edit['buffer']} of "
                    f"{dtype} along axis {axis}."
                )
            scale = (axis, ratios)
        try:
            return _rebuild(dense.reshape(shape), takes, scale).tobytes()
        except ValueError as e:  # Ratios that do not fit the axis.
            raise BundleError(
                f"The channel bundle's slice of buffer {edit['buffer']} is "
                f"corrupt: {e}."
            ) from e

    def _make(self, position: int) -> bytes:
        edits = self.edits()[position]
        out = np.frombuffer(bytearray(self._data), np.uint8)
        for edit in edits:
            if "vector" in edit:
                ref = self._locate(edit["vector"])
                values = self._array(edit["data"], edit["dtype"])
                if np.dtype(edit["dtype"]) != np.dtype(ref.dtype):
                    raise BundleError(
                        f"The channel bundle writes {edit['dtype']} over "
                        f"{tuple(edit['vector'])}, a vector of {ref.dtype}."
                    )
                self._write(out, ref, values.tobytes())
            else:
                ref = self._locate(("buffer", edit["buffer"]))
                raw = self._buffer_bytes(edit)
                if len(raw) != edit["length"]:
                    raise BundleError(
                        f"Buffer {edit['buffer']} made from the channel bundle "
                        f"is {len(raw)} bytes; the header says {edit['length']!r}."
                    )
                self._write(out, ref, raw)
        # The payload: emptied, so the level made is not a bundle.
        payload = self._locate(("buffer", self._model.metadata[METADATA_NAME]))
        self._write(out, payload, b"")
        return out.tobytes()

    def materialize(self, level: int, *, verify: bool = True) -> bytes:
        """The `.tflite` flatbuffer of `level`, ready for an interpreter.

        Args:
            level: one of `levels`.
            verify: check the level made against the SHA-256 recorded at
                export.

        Returns:
            The densest file with the level's shapes, options and weights
            written in place (see the module docstring).

        Raises:
            TypeError: if `level` is not an int.
            BundleError: if the bundle does not hold `level` (a ValueError,
                as for a weight bundle), or for a bundle that is corrupt or
                was modified: a header that does not describe the file, or,
                with `verify`, a level whose digest differs from the recorded
                one.
        """
        position = self._position(level)
        try:
            made = self._make(position)
            expected = self.header["digests"][position]
        except BundleError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
            # A header that parses as JSON but does not have the format's
            # fields, types or ranges: it was modified.
            raise BundleError(
                f"The channel bundle's header does not describe level {level}: "
                f"{type(e).__name__}: {e}."
            ) from e
        if verify and level_digest(level, made) != expected:
            raise BundleError(
                f"Level {level} made from the channel bundle does not match the "
                "digest recorded at export: the bundle is corrupt or was "
                "modified."
            )
        return made


def is_channel_bundle(model: fb.ModelRef) -> bool:
    return METADATA_NAME in model.metadata


def unverified_levels(content: bytes) -> list[bytes]:
    """Every level made from a bundle file whose placeholders are not filled
    yet (at export, to take the digests): no length or digest is checked."""
    model = fb.read_model(content)
    ref = model.buffers[model.metadata[METADATA_NAME]]
    header, packed = _parse(bytes(fb.buffer_bytes(content, ref)))
    bundle = ChannelBundle(content, model, header, packed)
    return [bundle.materialize(level, verify=False) for level in bundle.levels]


def from_bytes(data: bytes, name: str = "the bundle") -> ChannelBundle:
    """Reads a channel bundle from its bytes.

    Raises:
        BundleError: for a file that is not a channel bundle, or is
            truncated or corrupt.
    """
    model, raw = bundle_lib.metadata_payload(
        data, name, METADATA_NAME, "an elsa_tf channel bundle"
    )
    header, packed = _parse(raw)
    _check_header(header)
    expected = header.get("file_bytes")
    if not isinstance(expected, str) or expected != f"{len(data):012d}":
        raise BundleError(
            f"{name} is {len(data)} bytes, but the bundle was written with "
            f"{expected!r}: it is truncated or was modified."
        )
    return ChannelBundle(data, model, header, packed)


def read_bundle(source, *, expected_sha256: str | None = None):
    """Reads a weight bundle (`elsa_tf.lite.bundle`) or a channel bundle.

    Args:
        source: a path to the bundle `.tflite`, or its bytes.
        expected_sha256: the hash the manifest records for it; checked first.

    Returns:
        A `Bundle` or a `ChannelBundle`, whichever the file holds.

    Raises:
        BundleError: for a hash mismatch, a file that is not a bundle, or a
            truncated or corrupt one.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name, path = bytes(source), "the bundle", None
    else:
        name = path = os.fspath(source)
        with open(path, "rb") as f:
            data = f.read()
    bundle_lib.check_sha256(data, expected_sha256, name, BundleError)
    try:
        model = fb.read_model(data)
    except fb.FlatbufferError as e:
        raise BundleError(f"{name} is truncated or corrupt: {e}") from e
    if is_channel_bundle(model):
        return from_bytes(data, name)
    # A weight bundle (or no bundle): read as before, so its errors name the
    # path (the file is read again, from the page cache as a rule).
    return bundle_lib.read_bundle(data if path is None else path)


def materialize(source, level: int, *, expected_sha256: str | None = None) -> bytes:
    """The flatbuffer of `level`, made from a weight or channel bundle in pure
    Python/NumPy.

    Args:
        source: the bundle's path, or its bytes.
        level: which level, one of the bundle's `levels`.
        expected_sha256: the bundle's hash from `manifest.json`, if known.

    Returns:
        The `.tflite` bytes of that level.

    Raises:
        BundleError: as `read_bundle` and the bundle's `materialize`.
    """
    return read_bundle(source, expected_sha256=expected_sha256).materialize(level)
