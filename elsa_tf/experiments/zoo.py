"""A small model zoo shared by the examples, the training program and benchmarks.

Every architecture is written once, as a function of the framework module it
is built with: `keras` (Keras 3, which elsa_tf embeds) or `tf_keras` (Keras 2,
which tfmot's `prune_low_magnitude` trains as the baseline). Both modules have
`Input`, `layers.*` and `Model` with the same meaning, so the two builds of a
model cannot drift apart: the same layers in the same order, with the same
names, weight shapes and parameter counts.

Models take float inputs as `datasets` gives them and return logits (no
softmax). Every layer is named, so names are the same in every build and in
every process (Keras's automatic names count up per process). The weights to
prune are the kernels of `Dense`, `Conv1D`, `Conv2D` and `DepthwiseConv2D`
layers, which both elsa_tf and tfmot know how to prune.

`width` scales every hidden layer's units or channels (rounded, at least 1);
1.0 is the architecture as published. The benchmarks use it to pick a size
where sparsity costs accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

MODELS: tuple[str, ...] = ("mlp", "cnn", "lenet5", "cnn1d", "resnet20", "mobilenetv2")
BACKENDS: tuple[str, ...] = ("keras", "tf_keras")

# Models on (height, width, channels) images, and the smallest side each
# takes: every 2x2 max pooling halves the side and must keep at least 1.
_IMAGE_MODELS: dict[str, int] = {"cnn": 2, "lenet5": 4, "resnet20": 1, "mobilenetv2": 1}


def _units(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


# -- architectures: (framework, input_shape, num_classes, width) -> model -----


def _mlp(K: ModuleType, input_shape, num_classes: int, width: float):
    """Flatten, Dense 300 -> Dense 100 (ReLU), logits.

    300-100 hidden units are LeNet-300-100 (LeCun et al. 1998), the MLP that
    magnitude pruning has been measured on since Han et al. (2015) and the
    lottery ticket papers, so results compare with theirs.
    """
    L = K.layers
    inputs = K.Input(shape=input_shape, name="input")
    h = L.Flatten(name="flatten")(inputs)
    h = L.Dense(_units(300, width), activation="relu", name="fc1")(h)
    h = L.Dense(_units(100, width), activation="relu", name="fc2")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="mlp")


def _cnn(K: ModuleType, input_shape, num_classes: int, width: float):
    """The digits example's CNN: (conv 3x3 -> BN -> ReLU) x2, pool, fc, logits.

    Layers and weights are created in the order of the first digits example's
    model, so a seed gives the same initial weights as before.
    The convolutions keep their biases next to BatchNormalization, as the
    original did: every kind of shared weight is present.
    """
    L = K.layers
    inputs = K.Input(shape=input_shape, name="input")
    h = L.Conv2D(_units(16, width), 3, padding="same", name="conv1")(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU(name="relu1")(h)
    h = L.Conv2D(_units(32, width), 3, padding="same", name="conv2")(h)
    h = L.BatchNormalization(name="bn2")(h)
    h = L.ReLU(name="relu2")(h)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(_units(64, width), activation="relu", name="fc")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="cnn")


def _lenet5(K: ModuleType, input_shape, num_classes: int, width: float):
    """LeNet-5 with ReLU and max pooling: conv 6@5x5, conv 16@5x5, 120, 84.

    The first convolution pads ("same"), as LeNet-5 on 28x28 MNIST usually
    does, so 28x28 inputs give LeNet-5's 16 5x5 maps. The second does not pad
    unless its input is under 6x6 (8x8 digits), where it would leave nothing
    to pool.
    """
    L = K.layers
    pooled = min(input_shape[0], input_shape[1]) // 2
    inputs = K.Input(shape=input_shape, name="input")
    h = L.Conv2D(_units(6, width), 5, padding="same", activation="relu", name="conv1")(
        inputs
    )
    h = L.MaxPooling2D(name="pool1")(h)
    h = L.Conv2D(
        _units(16, width),
        5,
        padding="valid" if pooled >= 6 else "same",
        activation="relu",
        name="conv2",
    )(h)
    h = L.MaxPooling2D(name="pool2")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(_units(120, width), activation="relu", name="fc1")(h)
    h = L.Dense(_units(84, width), activation="relu", name="fc2")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="lenet5")


def _conv_bn(L, x, filters: int, kernel: int, strides: int, name: str, act=None):
    """Conv (no bias: BN's beta is the bias) -> BN -> optional activation."""
    conv = L.Conv1D if len(x.shape) == 3 else L.Conv2D
    x = conv(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        # He et al.'s initialization, for ReLU networks.
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    if act == "relu":
        x = L.ReLU(name=f"{name}_relu")(x)
    elif act == "relu6":
        x = L.ReLU(max_value=6.0, name=f"{name}_relu6")(x)
    return x


def _cnn1d(K: ModuleType, input_shape, num_classes: int, width: float):
    """1-D CNN for MNIST-1D: 3 x (conv -> BN -> ReLU), flatten, fc 64, logits.

    Shaped like the convolutional baseline of Greydanus's MNIST-1D (three
    small convolutions, then a read-out of the flattened maps, which keeps
    where features are), wider and with BatchNormalization so shared weights
    are exercised. The two strided convolutions take a length-40 signal down
    to 10 positions.
    """
    L = K.layers
    inputs = K.Input(shape=input_shape, name="input")
    h = inputs
    if len(input_shape) == 1:
        h = L.Reshape((input_shape[0], 1), name="reshape")(h)
    h = _conv_bn(L, h, _units(32, width), 5, 1, "conv1", act="relu")
    h = _conv_bn(L, h, _units(64, width), 3, 2, "conv2", act="relu")
    h = _conv_bn(L, h, _units(64, width), 3, 2, "conv3", act="relu")
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(_units(64, width), activation="relu", name="fc")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="cnn1d")


def _resnet20(K: ModuleType, input_shape, num_classes: int, width: float):
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2).

    A 3x3 16-filter stem, then 3 stages of 3 basic blocks with 16, 32 and 64
    filters (the first block of stages 2 and 3 halves the side), global
    average pooling and the logits: 19 convolutions and one Dense layer.
    Where a block changes shape its shortcut is a 1x1 convolution with BN
    (the paper's option B) rather than option A's zero-padded identity: that
    needs a Lambda layer, which Keras 3 will not reload in safe mode and
    tfmot cannot wrap. It adds 2,944 weights to option A's 0.27M.
    """
    L = K.layers
    inputs = K.Input(shape=input_shape, name="input")
    channels = _units(16, width)
    h = _conv_bn(L, inputs, channels, 3, 1, "stem", act="relu")
    for stage, filters in enumerate((16, 32, 64), start=1):
        filters = _units(filters, width)
        for block in range(1, 4):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = _conv_bn(L, h, filters, 3, strides, f"{name}_1", act="relu")
            y = _conv_bn(L, y, filters, 3, 1, f"{name}_2")
            shortcut = h
            if strides != 1 or filters != channels:
                shortcut = _conv_bn(L, h, filters, 1, strides, f"{name}_shortcut")
            h = L.Add(name=f"{name}_add")([shortcut, y])
            h = L.ReLU(name=f"{name}_relu")(h)
            channels = filters
    h = L.GlobalAveragePooling2D(name="pool")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="resnet20")


# MobileNetV2's (expansion t, output channels c, repeats n, first stride s),
# cut to CIFAR size: ImageNet's 2x-strided stem and first stride-2 stage are
# stride 1 here (32x32 inputs, not 224x224), and the 160- and 320-channel
# stages are dropped, leaving ~0.4M parameters instead of 2.2M.
_MOBILENETV2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 3, 2),
    (6, 96, 2, 1),
)


def _mobilenetv2(K: ModuleType, input_shape, num_classes: int, width: float):
    """A small MobileNetV2 (Sandler et al. 2018) for 32x32 images.

    Stem conv 3x3 -> inverted residual blocks (1x1 expansion, depthwise 3x3,
    linear 1x1 bottleneck; BN after each, ReLU6 after the first two; identity
    shortcut where the shape allows) -> 1x1 head conv -> pooling -> logits.
    """
    L = K.layers
    inputs = K.Input(shape=input_shape, name="input")
    channels = _units(32, width)
    h = _conv_bn(L, inputs, channels, 3, 1, "stem", act="relu6")
    index = 0
    for expansion, filters, repeats, first_stride in _MOBILENETV2_BLOCKS:
        filters = _units(filters, width)
        for repeat in range(repeats):
            index += 1
            name = f"block{index}"
            strides = first_stride if repeat == 0 else 1
            y = h
            if expansion != 1:
                y = _conv_bn(
                    L, y, channels * expansion, 1, 1, f"{name}_expand", "relu6"
                )
            y = L.DepthwiseConv2D(
                3,
                strides=strides,
                padding="same",
                use_bias=False,
                depthwise_initializer="he_normal",
                name=f"{name}_depthwise",
            )(y)
            y = L.BatchNormalization(name=f"{name}_depthwise_bn")(y)
            y = L.ReLU(max_value=6.0, name=f"{name}_depthwise_relu6")(y)
            y = _conv_bn(L, y, filters, 1, 1, f"{name}_project")  # linear
            if strides == 1 and filters == channels:
                y = L.Add(name=f"{name}_add")([h, y])
            h, channels = y, filters
    # MobileNetV2's head is 4x its last bottleneck (1280 = 4 x 320).
    h = _conv_bn(L, h, 4 * channels, 1, 1, "head", act="relu6")
    h = L.GlobalAveragePooling2D(name="pool")(h)
    outputs = L.Dense(num_classes, name="logits")(h)
    return K.Model(inputs, outputs, name="mobilenetv2")


_BUILDERS: dict[str, Callable] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "lenet5": _lenet5,
    "cnn1d": _cnn1d,
    "resnet20": _resnet20,
    "mobilenetv2": _mobilenetv2,
}


# -- public API -----------------------------------------------------------------


def _check_name(name) -> None:
    if name not in MODELS:
        raise ValueError(
            f"Unknown model. Expected one of {MODELS}. Received: model={name!r}"
        )


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (
        not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or min(shape) < 1
    ):
        raise ValueError(
            "input_shape must be a non-empty tuple of positive ints, without the "
            f"batch dimension. Received: input_shape={input_shape!r}"
        )
    return shape


def check_compatible(name: str, input_shape: Sequence[int]) -> None:
    """Raises unless model `name` can be built for inputs of `input_shape`.

    Args:
        name: one of `MODELS`.
        input_shape: one example's shape, without the batch dimension.

    Raises:
        ValueError: for an unknown model, a malformed shape, or a shape the
            model does not take: the 2-D CNNs take `(height, width, channels)`
            images (LeNet-5 at least 4x4, the digits CNN at least 2x2),
            `"cnn1d"` takes `(length,)` or `(length, channels)` signals, and
            `"mlp"` takes any shape.
    """
    _check_name(name)
    shape = _check_shape(input_shape)
    received = f"Received: model={name!r}, input_shape={shape}"
    if name in _IMAGE_MODELS:
        if len(shape) != 3:
            raise ValueError(
                f"Model {name!r} takes (height, width, channels) images. {received}"
            )
        side = _IMAGE_MODELS[name]
        if min(shape[:2]) < side:
            raise ValueError(
                f"Model {name!r} takes images of at least {side}x{side}. {received}"
            )
    elif name == "cnn1d" and len(shape) not in (1, 2):
        raise ValueError(
            f"Model {name!r} takes (length,) or (length, channels) signals. {received}"
        )


def framework(backend: str) -> ModuleType:
    """The module that builds models for `backend`: `keras` or `tf_keras`.

    `tf_keras` is imported only here, when asked for: it is a separate
    package, and Keras 3 users need not have it.
    """
    if backend == "keras":
        import keras

        return keras
    if backend == "tf_keras":
        import tf_keras

        return tf_keras
    raise ValueError(
        f"Unknown backend. Expected one of {BACKENDS}. Received: {backend=}"
    )


def build(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    backend: str = "keras",
    width: float = 1.0,
):
    """Builds zoo model `name` for `input_shape` inputs and `num_classes` logits.

    Args:
        name: one of `MODELS`: `"mlp"` (LeNet-300-100), `"cnn"` (the digits
            example's CNN), `"lenet5"`, `"cnn1d"` (for MNIST-1D), `"resnet20"`
            (CIFAR ResNet-20) or `"mobilenetv2"` (a small MobileNetV2).
        input_shape: one example's shape, without the batch dimension.
        num_classes: the number of logits.
        backend: `"keras"` for a Keras 3 model (to embed with elsa_tf) or
            `"tf_keras"` for a Keras 2 model of the same architecture (to
            prune with tfmot).
        width: multiplies every hidden layer's units or channels; 1.0 is the
            published architecture.

    Returns:
        An uncompiled Functional model whose output is the logits, named
        `name`, with freshly initialized weights.

    Raises:
        ValueError: for an unknown model or backend, an input shape the model
            does not take (see `check_compatible`), or a non-positive
            `num_classes` or `width`.

    Example:

    >>> model = build("resnet20", (32, 32, 3), 10)
    >>> model.count_params()
    274042
    >>> model.output.shape
    (None, 10)
    """
    check_compatible(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"num_classes must be an int. Received: {num_classes=}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1. Received: {num_classes=}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"width must be a positive number. Received: {width=}")
    K = framework(backend)
    return _BUILDERS[name](K, tuple(input_shape), num_classes, float(width))
