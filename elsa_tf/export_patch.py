"""Every level from one converted file: find the weights, patch them per level.

In ELSA, level `k`'s weights are the densest level's with those whose level
code is above `k` set to zero, so one conversion (the densest level) holds
every level: level `k`'s file is that file with some weight elements zeroed.
With `shared="per_level"` (or `"per_level_statistics"`) a level also has its
own shared weights (biases, normalization parameters and statistics), which
the file holds as they are or folded into a kernel, and which are rewritten.
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
  slice along one of the buffer's axes (where every slice is one element, as
  in a bias, only an unscaled copy matches). A zero stays zero under such a
  scale, which is what makes patching exact.
* `plan_writes`: for weights that differ between levels other than by zeroed
  elements, the buffers to rewrite and their contents at every level. A
  weight the converter stored as it is (a bias, a LayerNormalization's scale
  and offset) is found by its densest value, up to axis order and reshape. A
  BatchNormalization (`batch_norm_scale` `s`, `folded_shift`) is stored
  either as a multiplication by `s` and an addition of `beta - mean * s`, or
  folded into the layer before it: that layer's kernel times `s` along its
  output channels (`channel_axes`, `fold`) and its bias `b` replaced by
  `(b - mean) * s + beta`. Which normalization a kernel holds is read from
  the kernel's buffer (`pair_batch_norm`): its per-slice scale must equal
  the densest `s` of the BatchNormalization the model's graph says takes the
  layer's output or, without a graph, of exactly one, not a constant; and
  the folded bias must be found too. Every rewritten buffer's densest-level
  contents are recomputed from the Keras weights and must reproduce the
  converted file's; anything ambiguous is declined (the weight is reported
  as not placed, and the levels are converted instead).
* `patch`: a copy of the file with every mapped element whose code is above a
  level zeroed, and every planned buffer rewritten, in place: sizes and
  offsets do not change.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Collection, Mapping, Sequence

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


@dataclasses.dataclass(frozen=True)
class BufferWrite:
    """One buffer to rewrite: its index, the tensor reading it, its element
    type, and its contents at each level (sparsest first), in the buffer's
    order and type."""

    buffer: int
    tensor: str
    dtype: np.dtype
    values: tuple[np.ndarray, ...]


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
    scale of the weight laid out in `order`: a cheap filter before
    `_slice_scale`."""
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


def _slice_scale(buffer, laid_out, axis, rtol, atol) -> np.ndarray | None:
    """The constant per slice along `axis` by which `buffer` is `laid_out`
    (both shaped as the buffer's tensor), up to `rtol` / `atol`, NaN for a
    slice where `laid_out` is all zero; or None if there is none."""
    b = np.moveaxis(buffer, axis, 0).reshape(buffer.shape[axis], -1)
    w = np.moveaxis(laid_out, axis, 0).reshape(buffer.shape[axis], -1)
    if np.any(b[w == 0] != 0):
        return None
    rows = np.arange(len(w))
    largest = np.argmax(np.abs(w), axis=1)
    pivot = w[rows, largest]
    scale = np.full(len(w), np.nan)
    np.divide(b[rows, largest], pivot, out=scale, where=pivot != 0)
    known = np.nan_to_num(scale)
    if not known.any():
        return None  # An all-zero buffer fits anything.
    expected = known[:, None] * w
    if np.all(np.abs(b - expected) <= rtol * np.abs(expected) + atol):
        return scale
    return None


def _match_scaled(buffer, weight):
    """`(order, axis, scale)`: the axis order in which `buffer` holds
    `weight`, times `scale` (`_slice_scale`) per slice along the buffer's
    `axis`; or None."""
    rtol, atol = _TOLERANCE[buffer.dtype]
    flat, as_float = _sample(buffer.shape), None
    for order in _orders(weight.ndim):
        axes = _sample_fits(buffer, weight, order, flat)
        if not axes:
            continue
        laid_out = np.transpose(weight, order).reshape(buffer.shape)
        if as_float is None:
            as_float = buffer.astype(np.float64)
        for axis in axes:
            scale = _slice_scale(as_float, laid_out, axis, rtol, atol)
            if scale is None:
                continue
            # A scale per element fits any buffer without misplaced zeros
            # (a bias the size of a kernel): only an unscaled copy tells.
            known = scale[np.isfinite(scale)]
            if buffer.size == buffer.shape[axis] and np.any(np.abs(known - 1) > rtol):
                continue
            return order, axis, scale
    return None


def _match(buffer, weight) -> tuple[int, ...] | None:
    """The axis order in which `buffer` holds `weight` (up to a per-slice
    scale), or None."""
    found = _match_scaled(buffer, weight)
    return None if found is None else found[0]


def _candidates(content: bytes) -> list[tuple[fb.TensorRef, np.ndarray]]:
    """Every dense floating-point constant buffer of a file, with the tensor
    reading it and its values shaped as that tensor (a view of `content`)."""
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
    return candidates


def _factors(shape, buffer_shape, order, axis, scale) -> np.ndarray:
    """`scale`, one per slice along the buffer's `axis`, as one factor per
    element of a weight of `shape` laid out in `order` (the Keras layout)."""
    along = [1] * len(buffer_shape)
    along[axis] = -1
    laid = np.broadcast_to(scale.reshape(along), buffer_shape)
    return np.transpose(laid.reshape([shape[a] for a in order]), np.argsort(order))


def _scaled_locations(candidates, weight: np.ndarray):
    """`(tensor, buffer, order, factors)` for every buffer holding `weight`
    in `order` times a per-slice scale, `factors` being that scale per
    element of `weight` (NaN where its slice of `weight` is all zero)."""
    for tensor, buffer in candidates:
        if buffer.size != weight.size:
            continue
        found = _match_scaled(buffer, weight)
        if found is not None:
            order, axis, scale = found
            factors = _factors(weight.shape, buffer.shape, order, axis, scale)
            yield tensor, buffer, order, factors


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
    candidates = _candidates(content)
    found: dict[int, BufferPatch] = {}
    missing = []
    for weight in weights:
        matched = False
        for tensor, _, order, _ in _scaled_locations(candidates, weight.values):
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


# -- weights that differ between levels other than by zeroed elements --------


def batch_norm_scale(gamma, variance, epsilon: float) -> np.ndarray:
    """What a BatchNormalization multiplies each channel by at inference,
    `gamma / sqrt(variance + epsilon)` (gamma None: a layer without scale),
    as `tf.nn.batch_normalization` computes it."""
    scale = 1.0 / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    return scale if gamma is None else np.asarray(gamma, np.float64) * scale


def folded_shift(bias, gamma, beta, mean, variance, epsilon: float) -> np.ndarray:
    """`(bias - mean) * s + beta`, `s` being `batch_norm_scale`: the bias of
    a layer with bias `bias` once a BatchNormalization after it is folded in.
    With `bias` None (a layer without one, or a normalization on its own) it
    is what the normalization adds after its scale; beta None: no center."""
    shifted = -np.asarray(mean, np.float64)
    if bias is not None:
        shifted = shifted + np.asarray(bias, np.float64).reshape(shifted.shape)
    out = shifted * batch_norm_scale(gamma, variance, epsilon)
    return out if beta is None else out + np.asarray(beta, np.float64)


def _channel_map(shape, axes) -> np.ndarray:
    """Each element's channel when the axes `[start, stop)` of `shape`
    enumerate the channels (the later axes fastest)."""
    start, stop = axes
    channels = np.arange(math.prod(shape[start:stop]))
    local = channels.reshape(tuple(shape[start:stop]) + (1,) * (len(shape) - stop))
    return np.broadcast_to(local, shape)


def channel_axes(factors: np.ndarray, scale: np.ndarray, rtol: float):
    """The consecutive axes of a kernel that enumerate a normalization's
    channels, read from the factors its converted buffer scales it by.

    Args:
        factors: per element of the kernel (Keras layout), the factor its
            buffer multiplies it by; NaN where unknown.
        scale: the normalization's scale per channel (`batch_norm_scale`).
        rtol: relative tolerance of the comparison.

    Returns:
        `(start, stop)` such that `factors` equals `scale` with the channels
        enumerated by axes `start` to `stop - 1` (the last fastest): the last
        axis of a Dense or Conv kernel, the last two (`channel * multiplier`)
        of a DepthwiseConv2D one. None when no such axes fit, or when axes
        that enumerate the channels differently both fit.
    """
    known = np.isfinite(factors)
    if not known.any():
        return None
    fits = []
    # Fewest axes first: axes of size 1 around them enumerate the same.
    for length in range(1, factors.ndim + 1):
        for start in range(factors.ndim - length + 1):
            axes = (start, start + length)
            if math.prod(factors.shape[axes[0] : axes[1]]) != scale.size:
                continue
            channels = _channel_map(factors.shape, axes)
            expected = scale.reshape(-1)[channels[known]]
            if np.all(np.abs(factors[known] - expected) <= rtol * np.abs(expected)):
                fits.append((axes, channels))
    if not fits or any(not np.array_equal(fits[0][1], c) for _, c in fits[1:]):
        return None
    return fits[0][0]


def fold(kernel: np.ndarray, scale: np.ndarray, axes) -> np.ndarray:
    """`kernel` times `scale` along the channels that `axes` (see
    `channel_axes`) enumerate: what a folded normalization makes of it."""
    channels = _channel_map(kernel.shape, axes)
    return np.asarray(kernel, np.float64) * np.asarray(scale, np.float64)[channels]


def pair_batch_norm(
    factors: np.ndarray,
    scales: Sequence[np.ndarray],
    rtol: float,
    follows: int | None = None,
):
    """Which BatchNormalization the converter folded into a kernel.

    Args:
        factors: per element of the kernel (Keras layout), the factor its
            buffer multiplies it by (NaN where unknown).
        scales: each normalization's densest-level `batch_norm_scale`.
        rtol: relative tolerance of the comparison.
        follows: the index of the normalization that takes the kernel's
            layer's output, when the model's graph says; the converter can
            fold no other.

    Returns:
        `(fits, axes)`: the indices of every normalization whose scale the
        factors fit (`channel_axes`), and the channel axes of the one folded
        in, or None (declined). With `follows`, that one is folded in if it
        fits. Without, the only one that fits is, unless its scale is one
        constant on the kernel's known channels (a constant factor could
        come from anything).
    """
    fits = {j: channel_axes(factors, s, rtol) for j, s in enumerate(scales)}
    fits = {j: axes for j, axes in fits.items() if axes is not None}
    if follows is not None:
        return list(fits), fits.get(follows)
    if len(fits) != 1:
        return list(fits), None
    ((j, axes),) = fits.items()
    channels = np.unique(_channel_map(factors.shape, axes)[np.isfinite(factors)])
    known = np.asarray(scales[j], np.float64).reshape(-1)[channels]
    if np.ptp(known) <= rtol * np.abs(known).max():
        return [j], None
    return [j], axes


@dataclasses.dataclass(frozen=True)
class Layer:
    """A kernel and its layer's bias (None: no bias), by name in
    `plan_writes`'s `values`: the converter folds a BatchNormalization that
    follows the layer into both. `follows`: the index in `plan_writes`'s
    `norms` of the one that takes the layer's output, when the model's graph
    says (see `pair_batch_norm`)."""

    kernel: str
    bias: str | None = None
    follows: int | None = None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for n in (self.kernel, self.bias) if n)


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """A BatchNormalization: its variables by name in `plan_writes`'s
    `values` (gamma, beta: None when the layer has no scale, no center) and
    its epsilon."""

    mean: str
    variance: str
    gamma: str | None = None
    beta: str | None = None
    epsilon: float = 1e-3

    @property
    def names(self) -> frozenset[str]:
        return frozenset(
            n for n in (self.mean, self.variance, self.gamma, self.beta) if n
        )

    def levels(self, values: Mapping[str, Sequence[np.ndarray]]) -> list[dict]:
        """Its `gamma`, `beta`, `mean`, `variance` and `epsilon` at each
        level: the arguments of `batch_norm_scale` and `folded_shift`."""

        def at(name, position):
            return None if name is None else values[name][position]

        return [
            {
                "gamma": at(self.gamma, p),
                "beta": at(self.beta, p),
                "mean": at(self.mean, p),
                "variance": at(self.variance, p),
                "epsilon": self.epsilon,
            }
            for p in range(len(values[self.mean]))
        ]


def _scales(params: Sequence[dict]) -> list[np.ndarray]:
    return [batch_norm_scale(q["gamma"], q["variance"], q["epsilon"]) for q in params]


def _shift_size(bias, gamma, beta, mean, variance, epsilon) -> np.ndarray:
    """The size of `folded_shift`'s terms, against which its rounding is
    measured: it may be near zero while they are not."""
    terms = np.abs(np.asarray(mean, np.float64))
    if bias is not None:
        terms = terms + np.abs(np.asarray(bias, np.float64)).reshape(terms.shape)
    size = terms * np.abs(batch_norm_scale(gamma, variance, epsilon))
    return size if beta is None else size + np.abs(np.asarray(beta, np.float64))


@dataclasses.dataclass(frozen=True)
class _Claim:
    """Buffer `tensor.buffer` holds what `names` make: `contents` at each
    level, in the buffer's order and type."""

    names: frozenset[str]
    tensor: fb.TensorRef
    contents: tuple[np.ndarray, ...]


def _distinct(array: np.ndarray) -> bool:
    # A constant (zeros, ones) could be any constant the converter made.
    flat = np.asarray(array).reshape(-1)
    return bool(flat.size) and bool(np.any(flat != flat[0]))


def _claim(names, tensor, buffer, order, levels, size) -> _Claim | None:
    """The claim that `buffer` holds `levels` laid out in `order`, if its
    densest level reproduces the buffer (within the tolerance, relative to
    `size` per element) and every level's contents are finite."""
    rtol, atol = _TOLERANCE[buffer.dtype]

    def lay_out(a):
        return np.transpose(np.asarray(a, np.float64), order).reshape(buffer.shape)

    error = np.abs(buffer.astype(np.float64) - lay_out(levels[-1]))
    if not np.all(error <= rtol * lay_out(size) + atol):
        return None
    with np.errstate(over="ignore"):  # Overflow gives inf, declined below.
        contents = tuple(lay_out(v).astype(buffer.dtype) for v in levels)
    if not all(np.isfinite(c).all() for c in contents):
        return None
    return _Claim(frozenset(names), tensor, contents)


def _exact_claims(candidates, names, levels, size=None) -> list[_Claim]:
    """Claims of every buffer that holds `levels[-1]` as it is, up to axis
    order and reshape; none for a constant."""
    if not _distinct(levels[-1]):
        return []
    size = np.abs(levels[-1]) if size is None else size
    claims = []
    for tensor, buffer in candidates:
        if buffer.size != np.size(levels[-1]):
            continue
        for order in _orders(np.ndim(levels[-1])):
            claim = _claim(names, tensor, buffer, order, levels, size)
            if claim is not None:
                claims.append(claim)
                break
    return claims


def _fold_claims(candidates, values, layer, norm, location) -> list[_Claim] | None:
    """Claims of a kernel's buffer and its layer's bias buffers, with `norm`
    folded into them, at each level; None when the folded bias is in no
    buffer or the folded kernel does not reproduce its buffer."""
    tensor, buffer, order, axes = location
    params = norm.levels(values)
    scales = _scales(params)
    if layer.bias is None:
        biases = [None] * len(params)
    elif np.size(values[layer.bias][-1]) == scales[-1].size:
        biases = values[layer.bias]
    else:
        return None  # Not one bias per channel: not what folding gives.
    names = layer.names | norm.names
    shifts = [folded_shift(b, **q) for b, q in zip(biases, params)]
    shift_claims = _exact_claims(
        candidates, names, shifts, _shift_size(biases[-1], **params[-1])
    )
    kernels = [fold(k, s, axes) for k, s in zip(values[layer.kernel], scales)]
    kernel = _claim(names, tensor, buffer, order, kernels, np.abs(kernels[-1]))
    if kernel is None or not shift_claims:
        return None
    return [kernel, *shift_claims]


def _standalone_claims(candidates, norm, params) -> list[_Claim] | None:
    """Claims of the buffers of a normalization stored on its own, as a
    multiplication by its scale and an addition of its shift; None unless
    both are found."""
    scales = _scales(params)
    shifts = [folded_shift(None, **q) for q in params]
    found = _exact_claims(candidates, norm.names, scales)
    added = _exact_claims(
        candidates, norm.names, shifts, _shift_size(None, **params[-1])
    )
    return found + added if found and added else None


def _norm_claims(candidates, values, varying, layers, norms):
    """Claims for every normalization folded into a layer, or stored on its
    own, where it or that layer differs between levels; and the names of the
    normalizations that cannot be rewritten exactly."""
    params = [norm.levels(values) for norm in norms]
    scales = [_scales(p)[-1] for p in params]
    folded: dict[int, list[_Claim]] = {}
    declined: set[int] = set()
    for layer in layers if norms else ():
        kernel = values[layer.kernel][-1]
        for tensor, buffer, order, factors in _scaled_locations(candidates, kernel):
            rtol = _TOLERANCE[buffer.dtype][0]
            fits, axes = pair_batch_norm(factors, scales, rtol, layer.follows)
            if axes is None:
                declined.update(fits)  # Which one is folded in is unclear.
                continue
            j = fits[0] if layer.follows is None else layer.follows
            if varying.isdisjoint(layer.names | norms[j].names):
                continue  # Zeroing the kernel's elements is exact.
            location = (tensor, buffer, order, axes)
            claims = _fold_claims(candidates, values, layer, norms[j], location)
            if claims is None:
                declined.add(j)
            else:
                folded.setdefault(j, []).extend(claims)
    claims, unplaced = [], set()
    for j, norm in enumerate(norms):
        if j in folded:
            # A layer called twice could have it folded once and stored on
            # its own once (its scale in a buffer): decline that.
            alone = _exact_claims(candidates, norm.names, _scales(params[j]))
            if j in declined or alone:
                unplaced |= norm.names
            else:
                claims += folded[j]
        elif not varying.isdisjoint(norm.names):
            alone = (
                None
                if j in declined
                else _standalone_claims(candidates, norm, params[j])
            )
            if alone is None:
                unplaced |= norm.names
            else:
                claims += alone
    return claims, unplaced


def _merge(claims: Sequence[_Claim]) -> tuple[list[BufferWrite], set[str]]:
    """One write per claimed buffer; the names of claims that disagree about
    a buffer's contents instead."""
    by_buffer: dict[int, list[_Claim]] = {}
    for claim in claims:
        by_buffer.setdefault(claim.tensor.buffer, []).append(claim)
    writes, conflicts = [], set()
    for buffer, group in sorted(by_buffer.items()):
        first = group[0]
        if all(
            all(np.array_equal(a, b) for a, b in zip(first.contents, c.contents))
            for c in group[1:]
        ):
            tensor = first.tensor
            writes.append(
                BufferWrite(buffer, tensor.name, tensor.dtype, first.contents)
            )
        else:
            conflicts.update(*(c.names for c in group))
    return writes, conflicts


def plan_writes(
    content: bytes,
    values: Mapping[str, Sequence[np.ndarray]],
    varying: Collection[str],
    layers: Sequence[Layer] = (),
    norms: Sequence[BatchNorm] = (),
) -> tuple[list[BufferWrite], list[str]]:
    """The buffers to rewrite at each level, for weights that differ between
    levels other than by zeroed elements.

    Args:
        content: the file, converted from the densest level in dense storage.
        values: each weight's value at each level (sparsest first, densest
            last), by name, for every name in `varying`, `layers`, `norms`.
        varying: the names of the weights that differ between levels other
            than by zeroed elements.
        layers: every kernel with its layer's bias, into which the converter
            may have folded a BatchNormalization.
        norms: every BatchNormalization.

    Returns:
        The buffers to rewrite, and the names in `varying` it could not
        place: with any, the file cannot be patched into the other levels.
    """
    varying = set(varying)
    if not varying:
        return [], []
    candidates = _candidates(content)
    claims, unplaced = _norm_claims(candidates, values, varying, layers, norms)
    placed = set().union(*(c.names for c in claims))
    in_norms = set().union(*(n.names for n in norms))
    for name in sorted(varying - placed - in_norms):
        # A weight the converter kept as it is, in as many buffers as found.
        found = _exact_claims(candidates, {name}, values[name])
        claims += found
        if not found:
            unplaced.add(name)
    writes, conflicts = _merge(claims)
    return writes, sorted((unplaced | conflicts) & varying)


def consistent(patches: Sequence[BufferPatch], writes: Sequence[BufferWrite]) -> bool:
    """Whether every buffer both zeroed and rewritten is rewritten with zeros
    where it is zeroed, at every level."""
    codes = {p.buffer: p.codes for p in patches}
    return all(
        np.all(contents.reshape(-1)[codes[w.buffer] > position] == 0)
        for w in writes
        if w.buffer in codes
        for position, contents in enumerate(w.values)
    )


def patch(
    content: bytes,
    patches: Sequence[BufferPatch],
    position: int,
    writes: Sequence[BufferWrite] = (),
) -> bytes:
    """The file with every patched element whose code is above `position`
    zeroed, and every written buffer holding its contents at `position`: the
    level at that position among the codes' levels."""
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
    for w in writes:
        ref = model.buffers[w.buffer]
        contents = np.ascontiguousarray(w.values[position], w.dtype.newbyteorder("<"))
        out[ref.start : ref.start + ref.size] = contents.reshape(-1).view(np.uint8)
    return out.tobytes()
