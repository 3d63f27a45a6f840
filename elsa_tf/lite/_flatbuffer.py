"""A bounds-checked reader of the parts of a `.tflite` flatbuffer elsa_tf uses.

Pure Python and NumPy: it needs neither TensorFlow nor the `flatbuffers`
package, so it runs on a device that has only a TFLite runtime. It reads the
model's buffers (where each one's bytes lie in the file), its tensors (type,
shape, buffer, whether sparse-encoded) and its metadata entries, following the
TFLite schema (tensorflow/compiler/mlir/lite/schema/schema.fbs). Every offset is
checked against the file's length, so a truncated or corrupt file raises
`FlatbufferError` instead of reading garbage.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

FILE_IDENTIFIER = b"TFL3"

# Field indices in the schema's tables (the vtable slot of field i is 4 + 2i).
_MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 2, 4, 6
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME = 0, 1, 2, 3
_TENSOR_SPARSITY = 6
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_METADATA_NAME, _METADATA_BUFFER = 0, 1

# TFLite TensorType -> NumPy dtype, for the types whose bytes elsa_tf reads.
TENSOR_TYPES = {
    0: np.dtype("float32"),
    1: np.dtype("float16"),
    2: np.dtype("int32"),
    3: np.dtype("uint8"),
    4: np.dtype("int64"),
    6: np.dtype("bool"),
    7: np.dtype("int16"),
    9: np.dtype("int8"),
    10: np.dtype("float64"),
    12: np.dtype("uint64"),
    15: np.dtype("uint32"),
    16: np.dtype("uint16"),
}


class FlatbufferError(ValueError):
    """The bytes are not a well-formed TFLite flatbuffer."""


@dataclasses.dataclass(frozen=True)
class BufferRef:
    """Where one buffer's bytes lie in the file: `data[start:start + size]`."""

    index: int
    start: int
    size: int


@dataclasses.dataclass(frozen=True)
class TensorRef:
    subgraph: int
    index: int
    name: str
    type: int
    shape: tuple[int, ...]
    buffer: int
    sparse: bool

    @property
    def dtype(self) -> np.dtype | None:
        return TENSOR_TYPES.get(self.type)


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What `read_model` found: buffers, tensors and metadata of a model."""

    buffers: tuple[BufferRef, ...]
    tensors: tuple[TensorRef, ...]
    metadata: dict[str, int]
    inputs: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]


class _Reader:
    def __init__(self, data):
        self.data = memoryview(data)
        self.n = len(self.data)

    def _check(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or pos + size > self.n:
            raise FlatbufferError(
                f"Truncated or corrupt TFLite file: {what} at byte {pos} "
                f"(+{size}) lies outside the file's {self.n} bytes."
            )

    def unpack(self, fmt: str, pos: int, what: str):
        size = struct.calcsize(fmt)
        self._check(pos, size, what)
        return struct.unpack_from(fmt, self.data, pos)[0]

    def field(self, table: int, field: int) -> int:
        """Position of a table's field, or 0 when it is absent."""
        vtable = table - self.unpack("<i", table, "table")
        vtable_size = self.unpack("<H", vtable, "vtable")
        slot = 4 + 2 * field
        if slot + 2 > vtable_size:
            return 0
        offset = self.unpack("<H", vtable + slot, "vtable entry")
        return table + offset if offset else 0

    def scalar(self, table: int, field: int, fmt: str, default=0):
        pos = self.field(table, field)
        return self.unpack(fmt, pos, "scalar field") if pos else default

    def indirect(self, pos: int) -> int:
        return pos + self.unpack("<I", pos, "offset")

    def vector(self, table: int, field: int) -> tuple[int, int]:
        """(position of the first element, length) of a vector field."""
        pos = self.field(table, field)
        if not pos:
            return 0, 0
        vec = self.indirect(pos)
        length = self.unpack("<I", vec, "vector length")
        return vec + 4, length

    def tables(self, table: int, field: int) -> list[int]:
        start, length = self.vector(table, field)
        self._check(start, 4 * length, "vector of tables")
        return [self.indirect(start + 4 * i) for i in range(length)]

    def ints(self, table: int, field: int, dtype: str) -> tuple[int, ...]:
        start, length = self.vector(table, field)
        size = np.dtype(dtype).itemsize * length
        self._check(start, size, "vector of scalars")
        return tuple(
            int(v) for v in np.frombuffer(self.data, dtype, length, offset=start)
        )

    def string(self, table: int, field: int) -> str:
        start, length = self.vector(table, field)
        self._check(start, length, "string")
        return bytes(self.data[start : start + length]).decode("utf-8", "replace")


def read_model(data) -> ModelRef:
    """Reads the buffers, tensors and metadata of a `.tflite` flatbuffer.

    Args:
        data: the file's bytes (`bytes`, `bytearray` or `memoryview`).

    Raises:
        FlatbufferError: if the bytes are not a TFLite model, or an offset
            points outside them.
    """
    reader = _Reader(data)
    if reader.n < 8 or bytes(reader.data[4:8]) != FILE_IDENTIFIER:
        raise FlatbufferError(
            "Not a TFLite model: the file identifier at bytes 4-8 is "
            f"{bytes(reader.data[4:8])!r}, expected {FILE_IDENTIFIER!r}."
        )
    model = reader.indirect(0)

    buffers = []
    for i, table in enumerate(reader.tables(model, _MODEL_BUFFERS)):
        start, size = reader.vector(table, _BUFFER_DATA)
        external = reader.scalar(table, _BUFFER_OFFSET, "<Q")
        if external > 1:  # Data stored after the flatbuffer (models > 2 GB).
            start, size = external, reader.scalar(table, _BUFFER_SIZE, "<Q")
        reader._check(start, size, f"buffer {i}")
        buffers.append(BufferRef(i, start, size))

    tensors, inputs, outputs = [], [], []
    for s, subgraph in enumerate(reader.tables(model, _MODEL_SUBGRAPHS)):
        inputs.append(reader.ints(subgraph, _SUBGRAPH_INPUTS, "<i4"))
        outputs.append(reader.ints(subgraph, _SUBGRAPH_OUTPUTS, "<i4"))
        for t, table in enumerate(reader.tables(subgraph, _SUBGRAPH_TENSORS)):
            buffer = reader.scalar(table, _TENSOR_BUFFER, "<I")
            if buffer >= len(buffers):
                raise FlatbufferError(
                    f"Corrupt TFLite file: tensor {t} of subgraph {s} names "
                    f"buffer {buffer}, but the model has {len(buffers)} buffers."
                )
            tensors.append(
                TensorRef(
                    subgraph=s,
                    index=t,
                    name=reader.string(table, _TENSOR_NAME),
                    type=reader.scalar(table, _TENSOR_TYPE, "<b"),
                    shape=reader.ints(table, _TENSOR_SHAPE, "<i4"),
                    buffer=buffer,
                    sparse=bool(reader.field(table, _TENSOR_SPARSITY)),
                )
            )

    metadata = {}
    for table in reader.tables(model, _MODEL_METADATA):
        buffer = reader.scalar(table, _METADATA_BUFFER, "<I")
        if buffer >= len(buffers):
            raise FlatbufferError(
                f"Corrupt TFLite file: a metadata entry names buffer {buffer}, "
                f"but the model has {len(buffers)} buffers."
            )
        metadata[reader.string(table, _METADATA_NAME)] = buffer
    return ModelRef(
        buffers=tuple(buffers),
        tensors=tuple(tensors),
        metadata=metadata,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    )


def buffer_bytes(data, ref: BufferRef) -> memoryview:
    """The bytes of one buffer, as a view into `data`."""
    return memoryview(data)[ref.start : ref.start + ref.size]


def constant_tensors(model: ModelRef) -> dict[int, TensorRef]:
    """Buffer index -> the first tensor that reads it, for non-empty buffers."""
    owners = {}
    for tensor in model.tensors:
        if model.buffers[tensor.buffer].size and tensor.buffer not in owners:
            owners[tensor.buffer] = tensor
    return owners


# Fields a channel bundle rewrites (`elsa_tf.lite.channel_bundle`): the
# vectors that carry a width, by the table that holds them.
_SUBGRAPH_OPERATORS = 3
_TENSOR_QUANTIZATION, _TENSOR_SHAPE_SIGNATURE = 4, 7
_OPERATOR_OPCODE, _OPERATOR_INPUTS, _OPERATOR_OUTPUTS = 0, 1, 2
_OPERATOR_OPTIONS_TYPE, _OPERATOR_OPTIONS = 3, 4
TENSOR_VECTORS = {
    "shape": (_TENSOR_SHAPE, "<i4"),
    "shape_signature": (_TENSOR_SHAPE_SIGNATURE, "<i4"),
}
QUANTIZATION_VECTORS = {
    "min": (0, "<f4"),
    "max": (1, "<f4"),
    "scale": (2, "<f4"),
    "zero_point": (3, "<i8"),
}


@dataclasses.dataclass(frozen=True)
class VectorRef:
    """Where a vector's elements lie: `length` items of `dtype` from `start`.

    Its length, a uint32, is the 4 bytes before `start`.
    """

    start: int
    length: int
    dtype: str

    @property
    def size(self) -> int:
        return self.length * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class OperatorRef:
    subgraph: int
    index: int
    opcode_index: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options_type: int


def _item(reader: _Reader, table: int, field: int, index: int, what: str) -> int:
    start, length = reader.vector(table, field)
    if not 0 <= index < length:
        raise FlatbufferError(
            f"Corrupt or different TFLite file: {what} {index} does not exist "
            f"(there are {length})."
        )
    reader._check(start, 4 * length, "vector of tables")
    return reader.indirect(start + 4 * index)


def _vector_ref(reader: _Reader, table: int, field: int, dtype: str, what: str):
    pos = reader.field(table, field)
    if not pos:
        return None
    vec = reader.indirect(pos)
    length = reader.unpack("<I", vec, "vector length")
    ref = VectorRef(vec + 4, length, dtype)
    reader._check(ref.start, ref.size, what)
    return ref


def locate(data, path: tuple) -> VectorRef | None:
    """Finds a vector that a channel bundle rewrites; None if it is absent.

    Args:
        data: the file's bytes.
        path: one of `("tensor", subgraph, tensor, name)` with a name of
            `TENSOR_VECTORS` or `QUANTIZATION_VECTORS`; `("options", subgraph,
            operator, options_type, field)` for an int32 vector field of an
            operator's builtin options, whose union type must be
            `options_type`; or `("buffer", index)` for a buffer's data.

    Raises:
        FlatbufferError: for an offset outside the file, an index that does
            not exist, an options table of another type, or a path of another
            form.
    """
    reader = _Reader(data)
    if reader.n < 8:
        raise FlatbufferError(f"Truncated TFLite file: {reader.n} bytes.")
    model = reader.indirect(0)
    kind = path[0] if path else None
    if kind == "buffer" and len(path) == 2:
        table = _item(reader, model, _MODEL_BUFFERS, path[1], "buffer")
        if reader.scalar(table, _BUFFER_OFFSET, "<Q") > 1:
            raise FlatbufferError(
                f"Buffer {path[1]} is stored outside the flatbuffer; a channel "
                "bundle rewrites only buffers inside it."
            )
        return _vector_ref(reader, table, _BUFFER_DATA, "<u1", "buffer data")
    if kind in ("tensor", "options") and len(path) in (4, 5):
        subgraph = _item(reader, model, _MODEL_SUBGRAPHS, path[1], "subgraph")
    if kind == "tensor" and len(path) == 4:
        table = _item(reader, subgraph, _SUBGRAPH_TENSORS, path[2], "tensor")
        name = path[3]
        if name in TENSOR_VECTORS:
            field, dtype = TENSOR_VECTORS[name]
        elif name in QUANTIZATION_VECTORS:
            table = reader.field(table, _TENSOR_QUANTIZATION)
            if not table:
                return None
            table = reader.indirect(table)
            field, dtype = QUANTIZATION_VECTORS[name]
        else:
            raise FlatbufferError(f"No tensor vector is called {name!r}.")
        return _vector_ref(reader, table, field, dtype, f"tensor {name}")
    if kind == "options" and len(path) == 5:
        table = _item(reader, subgraph, _SUBGRAPH_OPERATORS, path[2], "operator")
        found = reader.scalar(table, _OPERATOR_OPTIONS_TYPE, "<B")
        if found != path[3]:
            raise FlatbufferError(
                f"Operator {path[2]} has builtin options of type {found}, not "
                f"{path[3]}."
            )
        pos = reader.field(table, _OPERATOR_OPTIONS)
        if not pos:
            return None
        options = reader.indirect(pos)
        return _vector_ref(reader, options, path[4], "<i4", "options vector")
    raise FlatbufferError(f"Not a path to a vector. Received: path={path!r}")


def read_vector(data, ref: VectorRef | None) -> np.ndarray | None:
    """The elements of a vector `locate` found (None for an absent one)."""
    if ref is None:
        return None
    return np.frombuffer(data, ref.dtype, ref.length, offset=ref.start)


def read_operators(data) -> tuple[OperatorRef, ...]:
    """Every operator of every subgraph: opcode, inputs, outputs and the type
    of its builtin options.

    Raises:
        FlatbufferError: as `read_model`.
    """
    reader = _Reader(data)
    if reader.n < 8:
        raise FlatbufferError(f"Truncated TFLite file: {reader.n} bytes.")
    model = reader.indirect(0)
    found = []
    for s, subgraph in enumerate(reader.tables(model, _MODEL_SUBGRAPHS)):
        for i, table in enumerate(reader.tables(subgraph, _SUBGRAPH_OPERATORS)):
            found.append(
                OperatorRef(
                    subgraph=s,
                    index=i,
                    opcode_index=reader.scalar(table, _OPERATOR_OPCODE, "<I"),
                    inputs=reader.ints(table, _OPERATOR_INPUTS, "<i4"),
                    outputs=reader.ints(table, _OPERATOR_OUTPUTS, "<i4"),
                    options_type=reader.scalar(table, _OPERATOR_OPTIONS_TYPE, "<B"),
                )
            )
    return tuple(found)
