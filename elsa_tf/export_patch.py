"""Every level from one converted file: find the weights, zero them per level.

In ELSA, level `k`'s weights are the densest level's with those whose level
code is above `k` set to zero, so one conversion (the densest level) holds
every level: level `k`'s file is that file with some weight elements zeroed.
This module is the pure NumPy half of that (the Keras half, and the check of
every patched file against Keras, is in `elsa_tf.export`):

* `level_codes`: from one weight's values at each level (sparsest first), the
  index of the first level that uses each element, or None when the values
  are not nested masked copies of the densest one.
* `find_buffers`: where the converter put each such weight. It may transpose
  or reshape a kernel (a Dense kernel `[in, out]` becomes FULLY_CONNECTED's
  `[out, in]`, a Conv2D kernel `HWIO` becomes `OHWI`, an EinsumDense kernel is
  reshaped), and fold a BatchNormalization into it, scaling every slice along
  one axis by a constant. So a buffer matches a weight when, for some order of
  the weight's axes, its elements equal the weight's times a constant per
  slice along one of the buffer's axes. A zero stays zero under such a scale,
  which is what makes patching exact.
* `patch`: a copy of the file with every mapped element whose code is above a
  level zeroed, in place: sizes and offsets do not change.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from elsa_tf.lite import _flatbuffer as fb

# How closely a buffer must match a weight times a per-slice scale. Folding a
# scale costs float32 about one rounding (6e-8 relative) and estimating the
# scale one more; float16 storage rounds to 11 significant bits (4.9e-4) and
# flushes the smallest magnitudes to zero.
_TOLERANCE = {
    np.dtype("float32"): (1e-5, 0.0),
    np.dtype("float16"): (2e-3, 2.0**-23),
}
# Axis orders tried for weights of higher rank are limited to these two
# (same, reversed): 7! orders would take long and no layer has one.
_MAX_PERMUTED_RANK = 6
# About this many elements are compared before a candidate (buffer, axis
# order) is checked whole.
_SAMPLE = 512


def level_codes(values: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per element, the position of the first level that uses it, or K.

    Args:
        values: one weight's values at each of K levels, sparsest first.

    Returns:
        A uint8 array of the weight's shape (K: no level uses the element), or
        None when some level's values are not the densest level's with
        elements zeroed, or when a level uses an element a denser one drops.
    """
    base = values[-1]
    codes = np.where(base != 0, len(values) - 1, len(values)).astype(np.uint8)
    for position in range(len(values) - 2, -1, -1):
        used = values[position] != 0
        if not np.array_equal(values[position], np.where(used, base, 0)):
            return None
        if np.any(codes[used] > position + 1):  # Not nested in the denser level.
            return None
        codes[used] = position
    return codes


@dataclasses.dataclass(frozen=True)
class Weight:
    """A weight whose elements some levels zero: its name, densest-level
    values and level codes (`level_codes`), all in the Keras layout."""

    name: str
    values: np.ndarray
    codes: np.ndarray


@dataclasses.dataclass(frozen=True)
class BufferPatch:
    """One buffer to patch: its index, the tensor reading it, its element
    type, and each element's level code in the buffer's order."""

    buffer: int
    tensor: str
    dtype: np.dtype
    codes: np.ndarray


def _orders(rank: int):
    if rank <= _MAX_PERMUTED_RANK:
        return itertools.permutations(range(rank))
    return [tuple(range(rank)), tuple(reversed(range(rank)))]


def _sample(shape) -> np.ndarray:
    """Flat indices of a small grid of a buffer's elements, the first few
    along every axis, so that each slice along any axis holds several."""
    per_axis = max(2, int(_SAMPLE ** (1 / max(len(shape), 1))))
    grid = np.meshgrid(*[np.arange(min(d, per_axis)) for d in shape], indexing="ij")
    return np.ravel_multi_index([g.reshape(-1) for g in grid], shape)


def _sample_fits(buffer, weight, order, flat) -> list[int]:
    """The buffer axes along which the elements at `flat` fit a per-slice
    scale of the weight laid out in `order`: a cheap filter before `_fits`."""
    coords = np.unravel_index(flat, [weight.shape[a] for a in order])
    source = [None] * weight.ndim
    for axis, c in zip(order, coords):
        source[axis] = c
    w = weight[tuple(source)].astype(np.float64)
    b = buffer.reshape(-1)[flat].astype(np.float64)
    if np.any(b[w == 0] != 0):
        return []
    # Ratios of values rounded to subnormal float16 are not kept to 1%.
    both = (w != 0) & (np.abs(b) >= np.finfo(buffer.dtype).tiny)
    ratio = b[both] / w[both]
    axes = []
    for axis, coord in enumerate(np.unravel_index(flat, buffer.shape)):
        low = np.full(buffer.shape[axis], np.inf)
        high = np.full(buffer.shape[axis], -np.inf)
        np.minimum.at(low, coord[both], ratio)
        np.maximum.at(high, coord[both], ratio)
        seen = np.isfinite(low)
        if np.all(high[seen] - low[seen] <= 1e-2 * np.abs(high[seen])):
            axes.append(axis)
    return axes


def _fits(buffer, laid_out, axis, rtol, atol) -> bool:
    """Whether `buffer` is `laid_out` (both shaped as the buffer's tensor)
    times a constant per slice along `axis`, up to `rtol` / `atol`."""
    b = np.moveaxis(buffer, axis, 0).reshape(buffer.shape[axis], -1)
    w = np.moveaxis(laid_out, axis, 0).reshape(buffer.shape[axis], -1)
    if np.any(b[w == 0] != 0):
        return False
    rows = np.arange(len(w))
    largest = np.argmax(np.abs(w), axis=1)
    pivot = w[rows, largest]
    scale = np.zeros(len(w))
    np.divide(b[rows, largest], pivot, out=scale, where=pivot != 0)
    if not scale.any():
        return False  # An all-zero buffer fits anything.
    expected = scale[:, None] * w
    return bool(np.all(np.abs(b - expected) <= rtol * np.abs(expected) + atol))


def _match(buffer, weight) -> tuple[int, ...] | None:
    """The axis order in which `buffer` holds `weight` (up to a per-slice
    scale), or None."""
    rtol, atol = _TOLERANCE[buffer.dtype]
    flat, as_float = _sample(buffer.shape), None
    for order in _orders(weight.ndim):
        axes = _sample_fits(buffer, weight, order, flat)
        if not axes:
            continue
        laid_out = np.transpose(weight, order).reshape(buffer.shape)
        if as_float is None:
            as_float = buffer.astype(np.float64)
        if any(_fits(as_float, laid_out, axis, rtol, atol) for axis in axes):
            return order
    return None


def find_buffers(
    content: bytes, weights: Sequence[Weight]
) -> tuple[list[BufferPatch], list[str]]:
    """Finds the buffers of a `.tflite` file that hold each weight.

    Args:
        content: the file, converted from the densest level in dense storage.
        weights: the weights that differ between levels.

    Returns:
        The buffers to patch, and the names of the weights found in none (or
        found in a buffer another weight claims with other codes): with any
        such weight, the file cannot be patched into the other levels.
    """
    model = fb.read_model(content)
    candidates, owners = [], fb.constant_tensors(model)
    for ref in model.buffers:
        tensor = owners.get(ref.index)
        if (
            tensor is None
            or tensor.sparse
            or tensor.dtype not in _TOLERANCE
            or not tensor.shape
        ):
            continue
        count = ref.size // tensor.dtype.itemsize
        if math.prod(tensor.shape) != count:
            continue
        values = np.frombuffer(content, tensor.dtype, count, offset=ref.start)
        candidates.append((tensor, values.reshape(tensor.shape)))
    found: dict[int, BufferPatch] = {}
    missing = []
    for weight in weights:
        matched = False
        for tensor, values in candidates:
            if values.size != weight.values.size:
                continue
            order = _match(values, weight.values)
            if order is None:
                continue
            codes = np.transpose(weight.codes, order).reshape(-1)
            known = found.get(tensor.buffer)
            if known is not None and not np.array_equal(known.codes, codes):
                missing.append(weight.name)  # Two weights, one buffer.
                matched = True
                break
            found[tensor.buffer] = BufferPatch(
                tensor.buffer, tensor.name, tensor.dtype, codes
            )
            matched = True
        if not matched:
            missing.append(weight.name)
    return sorted(found.values(), key=lambda p: p.buffer), missing


def patch(content: bytes, patches: Sequence[BufferPatch], position: int) -> bytes:
    """The file with every patched element whose code is above `position`
    zeroed: the level at that position among the codes' levels."""
    model = fb.read_model(content)
    out = np.frombuffer(bytearray(content), np.uint8)
    for p in patches:
        ref = model.buffers[p.buffer]
        region = out[ref.start : ref.start + ref.size]
        drop = p.codes > position
        if ref.start % p.dtype.itemsize == 0:  # Aligned: zero whole words.
            region.view(f"u{p.dtype.itemsize}")[drop] = 0
        else:
            region.reshape(-1, p.dtype.itemsize)[drop] = 0
    return out.tobytes()
