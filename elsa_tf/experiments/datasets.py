"""Datasets for the training program, as seeded `tf.data` input pipelines.

`load(name)` returns a `Dataset`: its shapes and sizes, plus pipelines for the
train and test splits. Every source ends in the same pipeline: inputs as
float32 (uint8 pixels scaled to [0, 1]), labels as int64; training data
shuffled over the whole split with a seed, reshuffled every epoch, augmented
(CIFAR only), batched and prefetched.

Sources:

- `"digits"`: scikit-learn's bundled 8x8 digits, the offline default. `seed`
  picks the 75/25 train/test split (the split of the digits main job since
  its first version, so results saved with it stay comparable).
- `"mnist"`, `"fashion_mnist"`, `"cifar10"`, `"cifar100"`: tensorflow-datasets,
  read from `data_dir` (tfds's default `~/tensorflow_datasets` when None).
  Nothing is downloaded: prepare the data where there is a network and pass its
  folder as `data_dir`.
- `"mnist1d"`: MNIST-1D generated locally by the `mnist1d` package.
- a path ending in `.npz` with `x_train`, `y_train`, `x_test`, `y_test`.

Example:

>>> data = load("digits", seed=0)
>>> data.input_shape, data.num_classes, data.num_train, data.num_test
((8, 8, 1), 10, 1348, 449)
>>> x, y = next(iter(data.train(32, seed=0)))
>>> x.shape, x.dtype.name, y.dtype.name
(TensorShape([32, 8, 8, 1]), 'float32', 'int64')
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections.abc import Callable

import numpy as np
import tensorflow as tf

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "mnist1d",
)

# The zoo model each dataset is trained with when the CLI gets no --model.
DEFAULT_MODEL: dict[str, str] = {
    "digits": "cnn",
    "mnist": "lenet5",
    "fashion_mnist": "lenet5",
    "cifar10": "resnet20",
    "cifar100": "resnet20",
    "mnist1d": "cnn1d",
}
# A .npz file can hold anything; an MLP (it flattens) fits every shape.
_NPZ_MODEL = "mlp"

# The datasets read from tensorflow-datasets, the ones `data_dir` is for.
TFDS_NAMES: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100")
AUGMENTED = ("cifar10", "cifar100")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The standard CIFAR recipe (He et al., 2016): zero-pad 4 pixels, crop back.
_CIFAR_PAD = 4


def default_model(dataset: str) -> str:
    """The zoo model trained on `dataset` when none is given.

    Args:
        dataset: a name in `DATASETS` or a path to a `.npz` file.

    Returns:
        A name in `elsa_tf.experiments.zoo.MODELS`.

    Raises:
        ValueError: `dataset` is neither.
    """
    if _is_npz(dataset):
        return _NPZ_MODEL
    _check_name(dataset)
    return DEFAULT_MODEL[dataset]


class _Split:
    """One split's examples: in-memory arrays, or a tfds `tf.data.Dataset`.

    Inputs are kept in their stored dtype (uint8 images stay uint8, a quarter
    of float32's memory in the cache and the shuffle buffer) and made float
    per batch by `_to_float`.
    """

    def __init__(self, x=None, y=None, *, source=None, size=None):
        self._x, self._y = x, y
        if source is None:
            source = tf.data.Dataset.from_tensor_slices((x, y))
            size = len(y)
        self._source = source
        # Decoded once, then read from memory. Built once per split so that
        # every pipeline derived from it shares the one cache.
        self.cached = source if x is not None else source.cache()
        self.size = int(size)

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first `limit` examples (all when None), in the stored order."""
        if self._x is None:
            # Kept: evaluation reads the whole test split again and again.
            if limit is None:
                self._x, self._y = _to_numpy(self.cached)
            else:
                return _to_numpy(self._source.take(limit))
        return self._x[:limit], self._y[:limit]


def _to_numpy(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in ds.batch(4096):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _to_float(x):
    """uint8 pixels to [0, 1]; anything else as float32, unchanged."""
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32)


def _to_float_np(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype("float32") / 255.0
    return x.astype("float32")


def _pad_crop_flip(images, seed):
    """CIFAR augmentation of a batch, a pure function of `seed` ([2] int64).

    Each image is zero-padded by 4 pixels, cropped back to its size at a random
    offset, and mirrored left-right with probability 1/2. Done for the whole
    batch with two gathers: per-image ops took 4x longer on CPU.
    """
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    p = _CIFAR_PAD
    padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    dy, dx = (
        tf.random.stateless_uniform([n, 1], s, 0, 2 * p + 1, dtype=tf.int32)
        for s in (seeds[0], seeds[1])
    )
    flip = tf.random.stateless_uniform([n, 1], seeds[2]) < 0.5
    rows = dy + tf.range(h)[None]
    cols = dx + tf.where(flip, tf.range(w - 1, -1, -1)[None], tf.range(w)[None])
    crop = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(crop, cols, axis=2, batch_dims=1)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset: its shapes, sizes and input pipelines.

    Attributes:
        name: the name given to `load` (the path, for a `.npz` file).
        input_shape: one example's shape, without the batch dimension.
        num_classes: labels are ints in `[0, num_classes)`.
        num_train: examples in the training split.
        num_test: examples in the test split.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int
    _train: _Split = dataclasses.field(repr=False, kw_only=True)
    _test: _Split = dataclasses.field(repr=False, kw_only=True)
    _augment: Callable | None = dataclasses.field(
        default=None, repr=False, kw_only=True
    )

    def train(
        self,
        batch_size: int,
        *,
        seed: int,
        augment: bool = True,
        repeat: bool = False,
    ) -> tf.data.Dataset:
        """The training split as batches of (float32 inputs, int64 labels).

        Shuffled over the whole split, in a new order every time the dataset is
        iterated (every epoch), the same orders for the same `seed`. The last
        batch of an epoch may be smaller.

        Args:
            batch_size: examples per batch.
            seed: seeds the shuffle and the augmentation.
            augment: apply the dataset's standard augmentation: for CIFAR, pad
                4 pixels, crop back at random and flip left-right at random.
                The other datasets have none.
            repeat: repeat forever (each pass reshuffled) instead of one epoch.

        Returns:
            A `tf.data.Dataset` of `(x, y)` batches.

        Raises:
            ValueError: `batch_size` is not a positive int.
        """
        _check_batch_size(batch_size)
        ds = self._train.cached.shuffle(
            self._train.size, seed=seed, reshuffle_each_iteration=True
        )
        if repeat:
            ds = ds.repeat()
        augment_fn = self._augment if augment else None
        return self._batches(ds, batch_size, augment_fn, seed)

    def train_examples(self) -> tf.data.Dataset:
        """The training split as single (float32 input, int64 label)
        examples, in the stored order, not augmented: what data sieving
        numbers (`elsa_tf.DataSieve`), then shuffles and batches itself."""
        return self._train.cached.map(
            lambda x, y: (_to_float(x), tf.cast(y, tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def test(self, batch_size: int) -> tf.data.Dataset:
        """The test split as batches of (float32 inputs, int64 labels), in order.

        Args:
            batch_size: examples per batch.

        Returns:
            A `tf.data.Dataset` of `(x, y)` batches, not shuffled.

        Raises:
            ValueError: `batch_size` is not a positive int.
        """
        _check_batch_size(batch_size)
        return self._batches(self._test.cached, batch_size)

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole test split as numpy arrays: float32 inputs, int64 labels."""
        x, y = self._test.arrays()
        return _to_float_np(x), y.astype("int64")

    def train_arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Training examples as numpy arrays, in the stored order, not augmented.

        Args:
            limit: return only the first `limit` examples; all when None.

        Returns:
            float32 inputs and int64 labels.

        Raises:
            ValueError: `limit` is not a positive int or None.
        """
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(
                f"limit must be a positive int or None. Received: limit={limit!r}"
            )
        x, y = self._train.arrays(limit)
        return _to_float_np(x), y.astype("int64")

    @staticmethod
    def _batches(
        ds: tf.data.Dataset,
        batch_size: int,
        augment_fn: Callable | None = None,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        ds = ds.batch(batch_size)
        if augment_fn is None:
            ds = ds.map(
                lambda x, y: (_to_float(x), tf.cast(y, tf.int64)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        else:
            # One random [2] seed per batch for the stateless ops: the same
            # seed gives the same augmentations in any parallel map order, and
            # each new pass over the dataset draws new ones.
            seeds = tf.data.Dataset.random(
                seed=seed, rerandomize_each_iteration=True
            ).batch(2)
            ds = tf.data.Dataset.zip(ds, seeds).map(
                lambda xy, s: (
                    _to_float(augment_fn(xy[0], s)),
                    tf.cast(xy[1], tf.int64),
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds.prefetch(tf.data.AUTOTUNE)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        ok = False
    else:
        ok = batch_size >= 1
    if not ok:
        raise ValueError(
            f"batch_size must be a positive int. Received: batch_size={batch_size!r}"
        )


def _is_npz(name) -> bool:
    return isinstance(name, str | os.PathLike) and os.fspath(name).endswith(".npz")


def _check_name(name) -> None:
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset. Expected one of {', '.join(DATASETS)} or a path to "
            f"a .npz file. Received: name={name!r}"
        )


# One example's shape in each named dataset, known before loading it, so that
# a model that cannot take the inputs is refused at start-up.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
    "mnist1d": (40,),
}


def input_shape(name: str) -> tuple[int, ...]:
    """One example's shape in dataset `name` (a `.npz` file is read for it).

    Raises:
        ValueError: `name` is unknown, or the `.npz` file is not a dataset.
        FileNotFoundError: the `.npz` file does not exist.
    """
    if _is_npz(name):
        return _load_npz(os.fspath(name)).input_shape
    _check_name(name)
    return INPUT_SHAPES[name]


def load(name: str, *, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Loads dataset `name` into a `Dataset`.

    Args:
        name: one of `DATASETS`, or a path ending in `.npz` holding the arrays
            `x_train`, `y_train`, `x_test`, `y_test` (uint8 inputs are scaled
            to [0, 1]; uint8 `(N, H, W)` images, as `keras.datasets` stores
            MNIST, get a channel axis).
        data_dir: where tensorflow-datasets finds prepared data (tfds's
            default when None). Only the tfds datasets read it.
        seed: picks the train/test split of `"digits"`, which has none of its
            own. The other datasets have a fixed split, so that `seed` varies
            only training; `"mnist1d"` is always generated with the package's
            own seed, the recipe of the published MNIST-1D.

    Returns:
        A `Dataset`.

    Raises:
        ValueError: `name` is unknown, or the `.npz` file's arrays are not a
            classification dataset.
        FileNotFoundError: the `.npz` file, or the tfds dataset in `data_dir`,
            does not exist.
    """
    if _is_npz(name):
        return _load_npz(os.fspath(name))
    _check_name(name)
    if name == "digits":
        x_train, y_train, x_test, y_test = digits_split(seed)
        return _from_arrays(name, x_train, y_train, x_test, y_test, num_classes=10)
    if name == "mnist1d":
        x_train, y_train, x_test, y_test = _mnist1d()
        return _from_arrays(name, x_train, y_train, x_test, y_test, num_classes=10)
    assert name in TFDS_NAMES, name  # DATASETS lists no other source.
    return _load_tfds(name, data_dir)


def _from_arrays(name, x_train, y_train, x_test, y_test, *, num_classes) -> Dataset:
    return Dataset(
        name=name,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_classes=int(num_classes),
        num_train=len(y_train),
        num_test=len(y_test),
        _train=_Split(x_train, y_train),
        _test=_Split(x_test, y_test),
    )


def digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, split by a seeded permutation.

    Args:
        seed: seeds the permutation.
        test_fraction: the share of examples held out for testing.

    Returns:
        `(x_train, y_train, x_test, y_test)`: float32 `(N, 8, 8, 1)` images in
        [0, 1] and int64 labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D from the package's default arguments: 4,000 train and 1,000
    test signals of length 40, standardized. Generated once per process."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global `random` and `np.random` generators;
    # restore them so loading data does not change anyone else's draws.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        # Never the package's get_dataset(): it downloads a pickle.
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        data["x"].astype("float32"),
        data["y"].astype("int64"),
        data["x_test"].astype("float32"),
        data["y_test"].astype("int64"),
    )


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        # Read only: with nothing prepared, tfds raises at once instead of
        # trying to download.
        splits = {
            split: builder.as_dataset(
                split=split, as_supervised=True, shuffle_files=False
            )
            for split in ("train", "test")
        }
    except AssertionError:  # What tfds raises when the data is not prepared.
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (looked in "
            f"{builder.data_dir}), and it cannot be downloaded from here. Prepare "
            'it on a machine with network access, e.g. `python -c "import '
            f"tensorflow_datasets as tfds; tfds.builder('{name}', "
            "data_dir='DIR').download_and_prepare()\"`, copy DIR here and pass "
            "--data_dir=DIR."
        ) from None
    info = builder.info
    sizes = {}
    for split, ds in splits.items():
        # The data actually read; tfds declares it for whole splits (also
        # when mocked, where the info's split sizes are unknown).
        cardinality = int(ds.cardinality())
        sizes[split] = (
            cardinality if cardinality >= 0 else info.splits[split].num_examples
        )
    return Dataset(
        name=name,
        input_shape=tuple(int(d) for d in info.features["image"].shape),
        num_classes=int(info.features["label"].num_classes),
        num_train=sizes["train"],
        num_test=sizes["test"],
        _train=_Split(source=splits["train"], size=sizes["train"]),
        _test=_Split(source=splits["test"], size=sizes["test"]),
        _augment=_pad_crop_flip if name in AUGMENTED else None,
    )


def _load_npz(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such .npz file. Received: name={path!r}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in _NPZ_KEYS if k not in f.files]
        if missing:
            raise ValueError(
                f"{path} lacks the array(s) {', '.join(missing)}; a dataset "
                f"needs {', '.join(_NPZ_KEYS)}. Received: keys={sorted(f.files)}"
            )
        arrays = {k: f[k] for k in _NPZ_KEYS}

    def bad(what: str, received: str):
        return ValueError(f"{path}: {what}. Received: {received}")

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        # keras.datasets stores some labels as (N, 1) columns.
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise bad(
                f"y_{split} must hold one integer label per example",
                f"y_{split}.shape={y.shape}, y_{split}.dtype={y.dtype}",
            )
        if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
            raise bad(
                f"x_{split} and y_{split} must hold the same, nonzero number of "
                "examples",
                f"x_{split}.shape={x.shape}, y_{split}.shape={y.shape}",
            )
        if y.min() < 0:
            raise bad(f"y_{split} must hold labels >= 0", f"min(y_{split})={y.min()}")
        if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
            raise bad(f"x_{split} must be real numbers", f"x_{split}.dtype={x.dtype}")
        if x.dtype == np.uint8 and x.ndim == 3:
            x = x[..., None]  # (N, H, W) grayscale images get a channel axis.
        if x.dtype != np.uint8:
            x = x.astype("float32")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype("int64")

    x_train, y_train = arrays["x_train"], arrays["y_train"]
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
        raise bad(
            "x_train and x_test examples must have the same shape and dtype",
            f"x_train.shape={x_train.shape}, x_train.dtype={x_train.dtype}, "
            f"x_test.shape={x_test.shape}, x_test.dtype={x_test.dtype}",
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return _from_arrays(path, x_train, y_train, x_test, y_test, num_classes=num_classes)
