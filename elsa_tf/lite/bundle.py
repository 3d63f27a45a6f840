"""The bundle: one `.tflite` file from which every level can be made.

A bundle is the densest level's `.tflite` file (dense storage, so each weight
has a fixed place in the file) with one extra metadata entry,
`"elsa_tf.bundle"`. Its payload is:

* `MAGIC`, a little-endian uint32 header length and a JSON header;
* the *level map*: for every element of every nested buffer (the weights
  levels share), the index of the first level that uses it, or `num_levels`
  when no level does. The codes are stored in order of decreasing weight
  magnitude (a stable order the reader recomputes from the weights), where
  sparse levels' weights come first, then LZMA-compressed: on a trained model
  this is well below the map's order-0 entropy;
* *overrides*: whole buffers of a level that are not a masked copy of the
  densest level's (the shared weights of `shared="per_level"`), compressed.

Level `k` is made by copying the file and zeroing every nested element whose
code is above `k` (pure NumPy, no TensorFlow), then writing the level's
overrides. A SHA-256 of the bytes each level writes, recorded at export,
is checked after every materialization: a bundle whose map does not match its
weights raises `BundleError` rather than yield a wrong model.

`encode` (used at export) builds the payload from the K per-level files in
dense storage; it finds the map from the files themselves, so it needs to know
nothing about how the converter laid out, transposed or folded the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import struct
from collections.abc import Sequence

import numpy as np

from elsa_tf.lite import _flatbuffer as fb

METADATA_NAME = "elsa_tf.bundle"
MAGIC = b"ELSABNDL"
FORMAT_VERSION = 1
# The file's own length is written into its header after the file is built,
# over a placeholder of fixed width, so that writing it changes no offset.
FILE_BYTES_PLACEHOLDER = "0" * 12
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]


class BundleError(ValueError):
    """A bundle that cannot give a correct model: corrupt, truncated, or
    whose level map does not match its weights."""


def _compress(data: bytes) -> bytes:
    return lzma.compress(
        data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=_LZMA_FILTERS
    )


def _decompress(data: bytes, what: str) -> bytes:
    try:
        return lzma.decompress(data, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise BundleError(f"The bundle's {what} is corrupt: {e}.") from e


def _elements(data, ref: fb.BufferRef, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(data, dtype, ref.size // dtype.itemsize, offset=ref.start)


def magnitude_order(values: np.ndarray) -> np.ndarray:
    """A stable order of `values` by decreasing magnitude, from their bits.

    The key is coarse (a float's exponent and top 3 mantissa bits, an
    integer's absolute value) so that NumPy's radix sort makes it fast; the
    encoder and the reader compute the same order from the same bytes.
    """
    if values.dtype == np.float32:
        key = (values.view(np.uint32) & 0x7FFFFFFF) >> 20
    elif values.dtype == np.float16:
        key = (values.view(np.uint16) & 0x7FFF) >> 7
    elif values.dtype == np.float64:
        key = (values.view(np.uint64) & 0x7FFFFFFFFFFFFFFF) >> 49
    else:
        key = np.minimum(np.abs(values.astype(np.int64)), 0xFFFF)
    return np.argsort(0xFFFF - key.astype(np.uint16), kind="stable")


def _level_codes(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per element, the first level whose array holds it (nonzero), or K.

    Returns None when the nonzero patterns do not nest (an element used by a
    level and dropped by a denser one).
    """
    used = [a != 0 for a in arrays]
    if any(np.any(lo & ~hi) for lo, hi in zip(used, used[1:])):
        return None
    codes = np.full(arrays[0].shape, len(arrays), np.uint8)
    for k in range(len(arrays) - 1, -1, -1):
        codes[used[k]] = k
    return codes


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What `encode` measured: map bits and entropy, in bytes."""

    nested_elements: int
    map_bytes: int
    map_entropy_bytes: float
    override_bytes: int
    inexact_buffers: int


def encode(
    level_files: Sequence[bytes], *, header: dict | None = None
) -> tuple[bytes, EncodeStats]:
    """Builds a bundle payload from every level's file, in dense storage.

    Args:
        level_files: the `.tflite` bytes of levels 0..K-1, converted without
            sparse encoding, from one graph (same buffers, same sizes).
        header: extra JSON-serializable fields stored in the header.

    Returns:
        The payload to store as the densest file's `METADATA_NAME` metadata,
        and statistics of the map.

    Nested buffers must be exact masked copies of the densest level's for
    float types. For int8 weights (dynamic and full-integer quantization) the
    per-level files are quantized with their own scales; the bundle then keeps
    the densest level's scales, and its levels agree with the per-level files
    to within the quantization step.
    """
    if not level_files:
        raise ValueError("encode needs at least one level file.")
    models = [fb.read_model(f) for f in level_files]
    base_data, base = level_files[-1], models[-1]
    for k, m in enumerate(models):
        if [b.size for b in m.buffers] != [b.size for b in base.buffers]:
            raise BundleError(
                f"Level {k}'s file does not have the densest level's buffers: "
                "the levels were not converted from one graph in dense storage."
            )
    num_levels = len(level_files)
    owners = fb.constant_tensors(base)
    nested, overrides, codes, blobs = [], [], [], []
    inexact = 0
    for ref in base.buffers:
        views = [
            bytes(fb.buffer_bytes(f, m.buffers[ref.index]))
            for f, m in zip(level_files, models)
        ]
        if all(v == views[-1] for v in views[:-1]):
            continue  # Shared by every level.
        tensor = owners.get(ref.index)
        dtype = tensor.dtype if tensor is not None else None
        if dtype is not None and not tensor.sparse and dtype.kind in "fiu":
            arrays = [
                _elements(f, m.buffers[ref.index], dtype)
                for f, m in zip(level_files, models)
            ]
            level_codes = _level_codes(arrays)
            if level_codes is not None:
                exact = all(
                    np.array_equal(a, np.where(level_codes <= k, arrays[-1], 0))
                    for k, a in enumerate(arrays)
                )
                if exact or dtype == np.int8:
                    inexact += not exact
                    nested.append(
                        {
                            "buffer": ref.index,
                            "tensor": tensor.name,
                            "dtype": dtype.name,
                            "count": int(level_codes.size),
                            "exact": bool(exact),
                        }
                    )
                    codes.append(level_codes[magnitude_order(arrays[-1])])
                    continue
        for k, v in enumerate(views[:-1]):
            if v != views[-1]:
                blob = _compress(v)
                overrides.append({"level": k, "buffer": ref.index, "length": len(blob)})
                blobs.append(blob)

    flat = np.concatenate(codes) if codes else np.zeros(0, np.uint8)
    packed_map = _compress(flat.tobytes())
    counts = np.bincount(flat, minlength=num_levels + 1)[: num_levels + 1]
    p = counts[counts > 0] / max(flat.size, 1)
    entropy_bytes = float(-(p * np.log2(p)).sum() * flat.size / 8)

    full_header = dict(header or {})
    full_header.update(
        format="elsa_tf.bundle",
        format_version=FORMAT_VERSION,
        num_levels=num_levels,
        codec="xz",
        map_order="magnitude",
        map_length=len(packed_map),
        nested=nested,
        overrides=overrides,
    )
    # Digests of what each level writes, taken from the decoding path itself.
    payload_without_digests = _pack(full_header, packed_map, blobs)
    bundle = Bundle(base_data, base, _parse(payload_without_digests))
    full_header["digests"] = [
        hashlib.sha256(bundle._level_regions(k)).hexdigest() for k in range(num_levels)
    ]
    stats = EncodeStats(
        nested_elements=int(flat.size),
        map_bytes=len(packed_map),
        map_entropy_bytes=entropy_bytes,
        override_bytes=sum(len(b) for b in blobs),
        inexact_buffers=inexact,
    )
    return _pack(full_header, packed_map, blobs), stats


def _pack(header: dict, packed_map: bytes, blobs: Sequence[bytes]) -> bytes:
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<I", len(text)), text, packed_map, *blobs])


@dataclasses.dataclass(frozen=True)
class _Payload:
    header: dict
    packed_map: bytes
    blobs: tuple[bytes, ...]


def _parse(payload: bytes) -> _Payload:
    if payload[: len(MAGIC)] != MAGIC or len(payload) < len(MAGIC) + 4:
        raise BundleError("The bundle's metadata does not start with elsa_tf's mark.")
    (length,) = struct.unpack_from("<I", payload, len(MAGIC))
    start = len(MAGIC) + 4
    if start + length > len(payload):
        raise BundleError("The bundle's header is truncated.")
    try:
        header = json.loads(payload[start : start + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"The bundle's header is corrupt: {e}.") from e
    if header.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"Unsupported bundle format version {header.get('format_version')!r}; "
            f"this elsa_tf reads version {FORMAT_VERSION}."
        )
    pos = start + length
    packed_map = payload[pos : pos + header["map_length"]]
    pos += header["map_length"]
    blobs = []
    for entry in header["overrides"]:
        blobs.append(payload[pos : pos + entry["length"]])
        pos += entry["length"]
    if pos != len(payload):
        raise BundleError(
            f"The bundle's payload is {len(payload)} bytes; its header "
            f"describes {pos}. It is truncated or was modified."
        )
    return _Payload(header, packed_map, tuple(blobs))


class BundleLevels:
    """What every kind of bundle has: the densest file's bytes (`data`) and
    a header naming the levels it holds. Subclasses set `_data` and
    `header`."""

    _data: bytes
    header: dict

    @property
    def num_levels(self) -> int:
        return int(self.header["num_levels"])

    @property
    def levels(self) -> list[int]:
        """The model's level indices the bundle holds, sparsest first."""
        return list(self.header.get("levels", range(self.num_levels)))

    @property
    def data(self) -> bytes:
        """The bundle's own bytes: the densest level, ready to run."""
        return self._data

    def _position(self, level) -> int:
        """Where `level` is among the bundle's levels (its code in the map).

        Raises:
            TypeError: for a level that is not an int.
            BundleError: for a level the bundle does not hold (a damaged
                header may also hide one).
        """
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise TypeError(f"level must be an int. Received: level={level!r}")
        if int(level) not in self.levels:
            raise BundleError(
                f"This bundle holds levels {self.levels}. Received: level={level}"
            )
        return self.levels.index(int(level))


class Bundle(BundleLevels):
    """A bundle read into memory; `materialize(level)` makes any level."""

    def __init__(self, data: bytes, model: fb.ModelRef, payload: _Payload):
        self._data = data
        self._model = model
        self.header = payload.header
        self._payload = payload
        self._codes = None

    def codes(self) -> list[np.ndarray]:
        """The level map, one uint8 array per nested buffer (K = unused)."""
        if self._codes is None:
            flat = np.frombuffer(
                _decompress(self._payload.packed_map, "level map"), np.uint8
            )
            counts = [entry["count"] for entry in self.header["nested"]]
            if flat.size != sum(counts):
                raise BundleError(
                    f"The bundle's level map has {flat.size} entries but its "
                    f"weights have {sum(counts)}: the map does not match them."
                )
            if flat.size and flat.max() > self.num_levels:
                raise BundleError(
                    f"The bundle's level map holds level {int(flat.max())}, but "
                    f"the bundle has {self.num_levels} levels."
                )
            for entry, count in zip(self.header["nested"], counts):
                ref = self._buffer(entry["buffer"])
                if ref.size != count * np.dtype(entry["dtype"]).itemsize:
                    raise BundleError(
                        f"Buffer {entry['buffer']} ({entry['tensor']!r}) holds "
                        f"{ref.size} bytes, but the level map has {count} "
                        f"{entry['dtype']} entries for it: the map does not "
                        "match the weights."
                    )
            codes = []
            for entry, stored in zip(
                self.header["nested"], np.split(flat, np.cumsum(counts)[:-1])
            ):
                ref = self._buffer(entry["buffer"])
                values = _elements(self._data, ref, np.dtype(entry["dtype"]))
                unsorted = np.empty_like(stored)
                unsorted[magnitude_order(values)] = stored
                codes.append(unsorted)
            self._codes = codes
        return self._codes

    def _buffer(self, index: int) -> fb.BufferRef:
        if not 0 <= index < len(self._model.buffers):
            raise BundleError(
                f"The bundle's header names buffer {index}, but the model has "
                f"{len(self._model.buffers)} buffers."
            )
        return self._model.buffers[index]

    def _write_level(self, out: np.ndarray, level: int) -> None:
        # `level` is a position among `levels`: the code the map stores.
        for entry, codes in zip(self.header["nested"], self.codes()):
            ref = self._buffer(entry["buffer"])
            itemsize = np.dtype(entry["dtype"]).itemsize
            region = out[ref.start : ref.start + ref.size]
            if ref.start % itemsize == 0:  # Aligned: zero whole words, 7x faster.
                region.view(f"u{itemsize}")[codes > level] = 0
            else:
                region.reshape(-1, itemsize)[codes > level] = 0
        for entry, blob in zip(self.header["overrides"], self._payload.blobs):
            if entry["level"] != level:
                continue
            ref = self._buffer(entry["buffer"])
            values = _decompress(blob, f"override of buffer {entry['buffer']}")
            if len(values) != ref.size:
                raise BundleError(
                    f"The bundle's override of buffer {entry['buffer']} at level "
                    f"{level} is {len(values)} bytes; the buffer is {ref.size}."
                )
            out[ref.start : ref.start + ref.size] = np.frombuffer(values, np.uint8)

    def _regions(self, out) -> bytes:
        indices = [e["buffer"] for e in self.header["nested"]]
        indices += [e["buffer"] for e in self.header["overrides"]]
        seen, parts = set(), []
        for i in indices:
            if i not in seen:
                seen.add(i)
                ref = self._buffer(i)
                parts.append(bytes(out[ref.start : ref.start + ref.size]))
        return b"".join(parts)

    def _level_regions(self, level: int) -> bytes:
        out = np.frombuffer(bytearray(self._data), np.uint8)
        self._write_level(out, level)
        return self._regions(out)

    def materialize(self, level: int, *, verify: bool = True) -> bytes:
        """The `.tflite` flatbuffer of `level`, ready for an interpreter.

        Raises:
            BundleError: if `verify` and the level made does not match the
                digest recorded at export.
        """
        position = self._position(level)
        out = np.frombuffer(bytearray(self._data), np.uint8)
        self._write_level(out, position)
        if verify:
            digest = hashlib.sha256(self._regions(out)).hexdigest()
            expected = self.header["digests"][position]
            if digest != expected:
                raise BundleError(
                    f"Level {level} made from the bundle does not match the "
                    "digest recorded at export: the level map does not match "
                    "the weights, or the file was modified."
                )
        return out.tobytes()

    def level_sparsity(self) -> list[float]:
        """Fraction of the nested weights each of `levels` does not use."""
        flat = np.concatenate(self.codes()) if self.codes() else np.zeros(0)
        counts = np.cumsum(np.bincount(flat, minlength=self.num_levels + 1))
        total = max(flat.size, 1)
        return [float(1 - counts[k] / total) for k in range(self.num_levels)]


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(data: bytes, expected: str | None, name: str, error=BundleError):
    """Raises `error` if `data` does not hash to the manifest's `expected`."""
    if expected is None:
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise error(
            f"SHA-256 of {name} is {digest}, but the manifest records "
            f"{expected}: the file is not the one exported."
        )


def metadata_payload(
    data: bytes, name: str, metadata_name: str, what: str, hint: str = ""
) -> tuple[fb.ModelRef, bytes]:
    """A bundle's model and the payload of its `metadata_name` entry.

    Args:
        data: the file's bytes.
        name: the file, for messages.
        metadata_name: the metadata entry the kind of bundle writes.
        what: the kind of bundle, for messages ("an elsa_tf bundle").
        hint: a sentence added to the message for a file without the entry.

    Raises:
        BundleError: for bytes that are not a TFLite model, or a model
            without the entry.
    """
    try:
        model = fb.read_model(data)
    except fb.FlatbufferError as e:
        raise BundleError(f"{name} is truncated or corrupt: {e}") from e
    if metadata_name not in model.metadata:
        raise BundleError(
            f"{name} is a TFLite model but not {what}: it has no "
            f"{metadata_name!r} metadata.{hint}"
        )
    ref = model.buffers[model.metadata[metadata_name]]
    return model, bytes(fb.buffer_bytes(data, ref))


def read_bundle(source, *, expected_sha256: str | None = None) -> Bundle:
    """Reads a bundle from a path or from its bytes.

    Args:
        source: a path to the bundle `.tflite`, or its bytes.
        expected_sha256: the hash the manifest records for it; checked first.

    Raises:
        BundleError: for a hash mismatch, a file that is not a bundle, or a
            truncated or corrupt one.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "the bundle"
    else:
        name = os.fspath(source)
        with open(name, "rb") as f:
            data = f.read()
    check_sha256(data, expected_sha256, name, BundleError)
    model, raw = metadata_payload(
        data,
        name,
        METADATA_NAME,
        "an elsa_tf bundle",
        hint=" Per-level files run as they are.",
    )
    payload = _parse(raw)
    expected_bytes = int(payload.header.get("file_bytes", len(data)))
    if expected_bytes != len(data):
        raise BundleError(
            f"{name} is {len(data)} bytes, but the bundle was written with "
            f"{expected_bytes}: it is truncated or was modified."
        )
    return Bundle(data, model, payload)


def materialize(source, level: int, *, expected_sha256: str | None = None) -> bytes:
    """The flatbuffer of `level`, made from a bundle in pure Python/NumPy.

    Args:
        source: the bundle's path, or its bytes.
        level: which level, in [0, number of levels).
        expected_sha256: the bundle's hash from `manifest.json`, if known.

    Returns:
        The `.tflite` bytes of that level: the bundle's weights with those
        whose level index is above `level` zeroed.
    """
    return read_bundle(source, expected_sha256=expected_sha256).materialize(level)
