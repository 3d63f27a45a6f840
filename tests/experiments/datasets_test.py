"""Every dataset source through the same pipeline: shapes, ranges, seeds."""

import doctest
import random
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from elsa_tf.experiments import datasets

TFDS = {
    # name: (input_shape, num_classes)
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
}
N = 12  # mocked examples per split


def _epoch(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _mocked(name, data_dir=None):
    with tfds.testing.mock_data(num_examples=N):
        return datasets.load(name, data_dir=data_dir)


def test_docstring_examples():
    result = doctest.testmod(datasets)
    assert result.attempted > 0 and result.failed == 0


def test_names_and_default_models():
    assert set(datasets.TFDS_NAMES) < set(datasets.DATASETS)
    assert set(TFDS) == set(datasets.TFDS_NAMES)
    assert set(datasets.DEFAULT_MODEL) == set(datasets.DATASETS)
    assert datasets.default_model("cifar10") == "resnet20"
    assert datasets.default_model("/tmp/my_data.npz") == "mlp"
    with pytest.raises(ValueError, match="Unknown dataset.*name='imagenet'"):
        datasets.default_model("imagenet")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        datasets.load("imagenet")
    message = str(info.value)
    assert "name='imagenet'" in message and ".npz" in message
    assert all(name in message for name in datasets.DATASETS)


@pytest.mark.parametrize("name", sorted(TFDS))
def test_tfds_dataset(name):
    input_shape, num_classes = TFDS[name]
    data = _mocked(name)
    assert (data.name, data.input_shape, data.num_classes) == (
        name,
        input_shape,
        num_classes,
    )
    assert datasets.input_shape(name) == input_shape  # known before loading
    assert (data.num_train, data.num_test) == (N, N)

    batches = list(data.train(5, seed=0, augment=False))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    for x, y in batches:
        assert x.dtype == tf.float32 and y.dtype == tf.int64
        assert x.shape[1:] == input_shape
        assert 0.0 <= x.numpy().min() and x.numpy().max() <= 1.0
        assert 0 <= y.numpy().min() and y.numpy().max() < num_classes

    # The pipelines and the arrays hold the same examples, scaled to [0, 1].
    x_test, y_test = data.test_arrays()
    assert x_test.dtype == np.float32 and y_test.dtype == np.int64
    assert x_test.shape == (N, *input_shape)
    assert x_test.max() > 0.5  # scaled, not truncated to 0 (mock pixels 0..255)
    np.testing.assert_array_equal(_epoch(data.test(5))[0], x_test)
    x_train, y_train = data.train_arrays()
    x_epoch, y_epoch = _epoch(data.train(5, seed=0, augment=False))
    np.testing.assert_array_equal(np.sort(y_epoch), np.sort(y_train))
    np.testing.assert_array_equal(np.sort(x_epoch, axis=0), np.sort(x_train, axis=0))
    x_first, y_first = data.train_arrays(limit=3)
    np.testing.assert_array_equal(x_first, x_train[:3])
    np.testing.assert_array_equal(y_first, y_train[:3])


def test_tfds_train_is_reshuffled_every_epoch_the_same_way_for_a_seed():
    data = _mocked("mnist")
    ds = data.train(4, seed=1)
    first, second = _epoch(ds), _epoch(ds)
    assert not np.array_equal(first[0], second[0])  # a new order every epoch
    np.testing.assert_array_equal(np.sort(first[1]), np.sort(second[1]))
    again = data.train(4, seed=1)
    for expected, x in zip([first, second], [_epoch(again), _epoch(again)]):
        np.testing.assert_array_equal(expected[0], x[0])
    assert not np.array_equal(first[0], _epoch(data.train(4, seed=2))[0])
    # Repeated, each pass is one of the same epochs.
    repeated = data.train(N, seed=1, repeat=True)
    for expected, (x, _) in zip([first, second], repeated.take(2)):
        np.testing.assert_array_equal(expected[0], x.numpy())


def _pad_crop_flip_of(augmented, image, pad=4):
    """(row offset, column offset, flipped) that make `augmented` from `image`,
    or None."""
    h, w = image.shape[:2]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    for flip in (False, True):
        target = augmented[:, ::-1] if flip else augmented
        for i in range(2 * pad + 1):
            for j in range(2 * pad + 1):
                if np.array_equal(padded[i : i + h, j : j + w], target):
                    return i, j, flip
    return None


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_augmentation_pads_crops_and_flips(name):
    data = _mocked(name)
    # The same seed shuffles the same way with and without augmentation.
    x_plain, y_plain = _epoch(data.train(N, seed=3, augment=False))
    x_aug, y_aug = _epoch(data.train(N, seed=3))
    np.testing.assert_array_equal(y_plain, y_aug)
    assert x_aug.shape == x_plain.shape == (N, 32, 32, 3)
    assert x_aug.dtype == np.float32 and 0.0 <= x_aug.min() and x_aug.max() <= 1.0
    assert not np.array_equal(x_aug, x_plain)
    found = [_pad_crop_flip_of(a, p) for a, p in zip(x_aug, x_plain)]
    assert None not in found
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(i, j) for i, j, _ in found}) > 3  # offsets vary per image
    # Seeded: the same seed gives the same augmentations.
    np.testing.assert_array_equal(_epoch(data.train(N, seed=3))[0], x_aug)


def test_augmentation_is_cifar_only():
    data = _mocked("mnist")
    a = _epoch(data.train(N, seed=3))[0]
    b = _epoch(data.train(N, seed=3, augment=False))[0]
    np.testing.assert_array_equal(a, b)


def test_tfds_data_dir_is_passed_through(tmp_path):
    with mock.patch.object(tfds, "builder", wraps=tfds.builder) as builder:
        _mocked("fashion_mnist", data_dir=str(tmp_path))
    builder.assert_called_once()
    assert builder.call_args.kwargs["data_dir"] == str(tmp_path)


def test_missing_tfds_dataset_fails_fast_and_says_what_to_do(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        datasets.load("cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10.0  # no download attempts, no retries
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert "download_and_prepare" in message and "--data_dir" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not list(tmp_path.rglob("*.tfrecord*"))  # nothing was downloaded


def _old_load_digits(seed, test_fraction=0.25):
    """The digits example's split before this module existed, verbatim."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_keeps_the_old_split(seed):
    old = _old_load_digits(seed)
    for a, b in zip(old, datasets.digits_split(seed)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    data = datasets.load("digits", seed=seed)
    assert (data.input_shape, data.num_classes) == ((8, 8, 1), 10)
    assert datasets.input_shape("digits") == data.input_shape
    assert (data.num_train, data.num_test) == (1348, 449)
    for a, b in zip(old, [*data.train_arrays(), *data.test_arrays()]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_epoch(data.test(100))[0], old[2])
    x, y = _epoch(data.train(100, seed=0))
    np.testing.assert_array_equal(np.sort(y), np.sort(old[1]))
    assert not np.array_equal(y, old[1])  # shuffled
    assert not np.array_equal(old[3], _old_load_digits(seed + 1)[3])


def test_mnist1d_is_generated_locally_without_touching_global_rngs():
    datasets._mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    with mock.patch("mnist1d.data.get_dataset", side_effect=AssertionError):
        data = datasets.load("mnist1d", seed=5)
    assert (np.random.rand(), random.random()) == (
        np.random.RandomState(123).rand(),
        random.Random(123).random(),
    )
    assert (data.input_shape, data.num_classes) == ((40,), 10)
    assert datasets.input_shape("mnist1d") == data.input_shape
    assert (data.num_train, data.num_test) == (4000, 1000)
    x, y = data.train_arrays()
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1.0) < 0.05  # standardized
    assert set(np.unique(y)) == set(range(10))
    # A fixed dataset: the seed varies training, not the data.
    x_other, _ = datasets.load("mnist1d", seed=6).train_arrays()
    np.testing.assert_array_equal(x, x_other)
    xb, yb = next(iter(data.train(64, seed=0)))
    assert xb.shape == (64, 40) and yb.shape == (64,)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _npz_arrays(rng, n_train=10, n_test=6, shape=(5, 4), dtype="uint8"):
    high = 256 if dtype == "uint8" else 1
    return dict(
        x_train=(rng.random((n_train, *shape)) * high).astype(dtype),
        y_train=np.arange(n_train) % 3,
        x_test=(rng.random((n_test, *shape)) * high).astype(dtype),
        y_test=np.arange(n_test) % 4,
    )


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0))
    path = _write_npz(tmp_path / "data.npz", **arrays)
    data = datasets.load(path)
    # uint8 (N, H, W) images, as keras.datasets stores MNIST, get a channel.
    assert (data.name, data.input_shape, data.num_classes) == (path, (5, 4, 1), 4)
    assert datasets.input_shape(path) == (5, 4, 1)
    assert (data.num_train, data.num_test) == (10, 6)
    x, y = data.test_arrays()
    np.testing.assert_allclose(x[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, arrays["y_test"])
    x_epoch, _ = _epoch(data.test(4))
    np.testing.assert_array_equal(x_epoch, x)
    assert datasets.default_model(path) == "mlp"


def test_npz_floats_and_label_columns(tmp_path):
    arrays = _npz_arrays(np.random.default_rng(0), shape=(7,), dtype="float64")
    arrays["y_train"] = arrays["y_train"][:, None]  # keras' CIFAR label layout
    data = datasets.load(_write_npz(tmp_path / "f.npz", **arrays))
    assert (data.input_shape, data.num_classes) == ((7,), 4)
    x, y = data.train_arrays()
    assert x.dtype == np.float32 and y.shape == (10,)
    np.testing.assert_allclose(x, arrays["x_train"], rtol=1e-6)  # not rescaled


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(y_test=None), "lacks the array\\(s\\) y_test.*Received: keys="),
        (dict(y_train=np.arange(9)), "same, nonzero number.*y_train.shape=\\(9,\\)"),
        (dict(y_train=np.linspace(0, 1, 10)), "integer label.*float64"),
        (dict(y_test=np.arange(6) - 1), "labels >= 0.*min\\(y_test\\)=-1"),
        (dict(x_test=np.zeros((6, 5, 3), "uint8")), "same shape and dtype"),
        (dict(x_test=np.zeros((0, 5, 4)), y_test=np.zeros(0, int)), "nonzero"),
    ],
)
def test_bad_npz_messages_name_the_file(tmp_path, change, error):
    arrays = _npz_arrays(np.random.default_rng(0))
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=error) as info:
        datasets.load(path)
    assert path in str(info.value)


def test_missing_npz(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=f"name='{path}'"):
        datasets.load(path)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_and_limit(bad):
    data = datasets.load("digits")
    with pytest.raises(ValueError, match=f"positive int. Received: batch_size={bad}"):
        data.train(bad, seed=0)
    with pytest.raises(ValueError, match=f"Received: batch_size={bad}"):
        data.test(bad)
    with pytest.raises(ValueError, match=f"Received: limit={bad}"):
        data.train_arrays(bad)
