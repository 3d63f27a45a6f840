"""Which layers and operations the channel rules know, and why others pin.

The registries name the exact classes `elsa_tf.channels` follows (a subclass
may change `call`, so it is unknown), and `unsupported` says, for one layer
call, why its channels cannot be followed, or None. The rules themselves are
in `elsa_tf.channels`' docstring; how each registry's layers join channel
groups is in `elsa_tf.channel_tracing`.
"""

from __future__ import annotations

import keras
import numpy as np

# The layers that create channels, and the constructor argument holding their
# width: what `physical.narrow` rewrites.
PRODUCERS: dict[type, str] = {
    keras.layers.Dense: "units",
    keras.layers.Conv1D: "filters",
    keras.layers.Conv2D: "filters",
    keras.layers.Conv3D: "filters",
}

DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

# Depthwise then pointwise in one layer: produce channels from their
# pointwise kernel (`filters`).
SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)

# The layers whose weights follow their input's channels.
FOLLOWERS = (keras.layers.BatchNormalization, *DEPTHWISE)

# Weightless layers that act on every channel alone and keep the last axis.
# Each registry is tested class by class (tests/physical_test.py).
_RANKED = ("MaxPooling", "AveragePooling", "GlobalMaxPooling", "GlobalAveragePooling")
_RANKED += ("ZeroPadding", "Cropping", "UpSampling", "SpatialDropout")
PASS_THROUGH: tuple[type, ...] = tuple(
    getattr(keras.layers, name)
    for name in (
        *("Activation", "ReLU", "LeakyReLU", "ELU", "Identity", "Rescaling"),
        *("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout"),
        "ActivityRegularization",
        *(f"{kind}{rank}D" for kind in _RANKED for rank in (1, 2, 3)),
    )
)

MERGES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Average,
)

# Layers whose heads are a channel group (the rule in `elsa_tf.channels`).
ATTENTION = (keras.layers.MultiHeadAttention,)

# Keras operations (not layers) that a Functional model records where it was
# built with `keras.ops` or Python operators (`x + 3.0` in MobileNetV3's hard
# sigmoid): elementwise, by class name in `keras.ops`' modules.
ELEMENTWISE_OPS = {
    "keras.src.ops.numpy": frozenset(
        {
            *("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum"),
            *("Minimum", "Negative", "Abs", "Absolute", "Square", "Exp", "Tanh"),
            *("Clip", "Sign"),
        }
    ),
    "keras.src.ops.nn": frozenset(
        {
            *("Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSilu", "Silu"),
            *("Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Mish"),
        }
    ),
}

# Layers that rearrange channels: side by side, or interleaved with positions.
RESHAPES = (keras.layers.Concatenate, keras.layers.Flatten, keras.layers.Reshape)

# Activations whose output in one channel depends on the other channels.
MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax"})


def width(tensor) -> int:
    width = tensor.shape[-1] if len(tensor.shape) else 1
    return 1 if width is None else width


def argument(node, position: int, name: str):
    """The call argument at `position` or named `name` of `node`, or None."""
    args = node.arguments.args
    return args[position] if len(args) > position else node.arguments.kwargs.get(name)


def reason(op, why: str) -> str:
    return f"layer {op.name!r} ({type(op).__name__}) {why}"


def activation(op) -> str | None:
    activation = getattr(op, "activation", None)
    return getattr(activation, "__name__", None)


def declared(op) -> list:
    """The variables a known layer is expected to hold, by attribute."""
    kind = type(op)
    if kind in PRODUCERS or kind in DEPTHWISE:
        return [op.kernel, op.bias]
    if kind in SEPARABLE:
        return [op.depthwise_kernel, op.pointwise_kernel, op.bias]
    if kind is keras.layers.BatchNormalization:
        return [op.gamma, op.beta, op.moving_mean, op.moving_variance]
    if kind in ATTENTION:
        dense = (op.query_dense, op.key_dense, op.value_dense, op.output_dense)
        return [v for layer in dense for v in (layer.kernel, layer.bias)]
    return []


def is_elementwise(op) -> bool:
    kind = type(op)
    return kind.__name__ in ELEMENTWISE_OPS.get(kind.__module__, ())


def unsupported(op, node) -> str | None:
    """Why the rules cannot follow `op`'s channels, or None when they can."""
    kind = type(op)
    if is_elementwise(op):
        arguments = [*node.arguments.args, *node.arguments.kwargs.values()]
        # Python operators keep constants as arguments; `clip`, `leaky_relu`
        # and the like as attributes.
        attributes = [v for k, v in vars(op).items() if not k.startswith("_")]
        constants = [
            a
            for a in keras.tree.flatten([*arguments, *attributes])
            if not isinstance(a, (keras.KerasTensor, str)) and np.size(a) != 1
        ]
        if constants:
            return "applies a constant of more than one value"
        if kind.__name__ in ("Divide", "TrueDivide") and (
            len(node.input_tensors) != 1
            or not isinstance(node.arguments.args[0], keras.KerasTensor)
        ):
            # A dropped channel is zero, and dividing by it is not.
            return "divides by a tensor"
        if any(len(t.shape) < 2 for t in node.input_tensors):
            return "has an input without a channel axis"
        return None
    known = (*PRODUCERS, *SEPARABLE, *FOLLOWERS, *PASS_THROUGH, *MERGES, *RESHAPES)
    known += ATTENTION
    if isinstance(op, keras.Model):
        return "is a nested model, which channel_groups does not look inside"
    if kind not in known:
        return "is not a layer whose channels channel_groups can follow"
    if kind in ATTENTION:
        shape = op.get_config()["output_shape"]
        if shape is not None and np.size(shape) != 1:
            return f"has a multi-axis output_shape={shape!r}"
    elif kind not in MERGES and kind is not keras.layers.Concatenate:
        if len(node.input_tensors) != 1:
            return f"takes {len(node.input_tensors)} tensor inputs"
        if len(node.input_tensors[0].shape) < 2:
            return "has an input without a channel axis"
    if getattr(op, "data_format", "channels_last") != "channels_last":
        return f"has data_format={op.data_format!r}"
    try:
        expected = {id(v) for v in declared(op) if v is not None}
    except (AttributeError, ValueError):  # a quantized or LoRA kernel, for one
        expected = set()
    held = {id(v) for v in op.weights}
    if held != expected:
        extra = sorted(v.path for v in op.weights if id(v) not in expected)
        return f"holds weights it does not declare: {extra}"
    if getattr(op, "groups", 1) != 1:
        return f"is a grouped convolution (groups={op.groups})"
    if kind in (*DEPTHWISE, *SEPARABLE) and op.depth_multiplier != 1:
        return f"has depth_multiplier={op.depth_multiplier}"
    if kind is keras.layers.BatchNormalization:
        rank = len(node.input_tensors[0].shape)
        if op.axis % rank != rank - 1:
            return f"normalizes axis {op.axis}, not the channel axis"
    if kind is keras.layers.Rescaling:
        if np.size(op.scale) != 1 or np.size(op.offset) != 1:
            return "rescales each channel differently"
    return None
