"""Any Keras 3 model: subclassed, keras.applications and keras_hub, end to end.

Each model is built offline from constructor arguments at a tiny size (never
`from_preset`, which downloads), then embedded, trained, checked for nesting
and exact freezing, summarized, saved and loaded, extracted (its class kept)
and exported to TFLite.
"""

import keras
import numpy as np
import pytest
from conftest import run_readme_block

import elsa_tf
from elsa_tf import model_ops

keras_hub = pytest.importorskip("keras_hub")

SPARSITIES = [0.9, 0.5, 0.0]


@keras.saving.register_keras_serializable(package="elsa_tf_test")
class TwoTowers(keras.Model):
    """A subclassed model with its own `call`, BatchNorm and a helper method."""

    def __init__(self, units=8, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units, self.classes = units, classes
        self.left = keras.layers.Dense(units, activation="relu", name="left")
        self.right = keras.layers.Dense(units, activation="relu", name="right")
        self.norm = keras.layers.BatchNormalization(name="norm")
        self.head = keras.layers.Dense(classes, name="head")

    def call(self, x, training=None):
        h = self.norm(self.left(x) + self.right(x), training=training)
        return self.head(h)

    def top_class(self, x):
        return np.argmax(self(x), axis=-1)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "classes": self.classes}


def _rng():
    return np.random.default_rng(0)


def _tokens(n, vocabulary=50, length=8):
    rng = _rng()
    return {
        "token_ids": rng.integers(0, vocabulary, (n, length)).astype("int32"),
        "padding_mask": np.ones((n, length), "int32"),
    }


def _two_towers():
    model = TwoTowers()
    model(np.zeros((1, 6), "float32"))
    x = _rng().normal(size=(32, 6)).astype("float32")
    return model, x, np.argmax(x[:, :3], axis=1)


def _mobilenet_v2():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3
    )
    model = keras.Model(model.input, model.layers[-2].output)  # logits
    x = _rng().normal(size=(16, 32, 32, 3)).astype("float32")
    return model, x, np.arange(16) % 3


# Token ids in [0, 50), sequences of 8: the size every text model here is built at.
TINY_TEXT_BACKBONE = dict(
    vocabulary_size=50,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=8,
)


def _bert_classifier():
    backbone = keras_hub.models.BertBackbone(**TINY_TEXT_BACKBONE)
    model = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    x = _tokens(16)
    x["segment_ids"] = np.zeros((16, 8), "int32")
    return model, x, np.arange(16) % 3


def _gpt2_causal_lm():
    backbone = keras_hub.models.GPT2Backbone(**TINY_TEXT_BACKBONE)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    x = _tokens(16)
    return model, x, np.roll(x["token_ids"], -1, axis=1)


def _vit_classifier():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=3, preprocessor=None
    )
    x = _rng().random((16, 16, 16, 3)).astype("float32")
    return model, x, np.arange(16) % 3


MODELS = {
    "subclassed": _two_towers,
    "mobilenet_v2": _mobilenet_v2,
    "bert_text_classifier": _bert_classifier,
    "gpt2_causal_lm": _gpt2_causal_lm,
    "vit_image_classifier": _vit_classifier,
}
KERAS_HUB = {"bert_text_classifier", "gpt2_causal_lm", "vit_image_classifier"}


def _predict(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0)))


def _kernel_and_embedding_size(model):
    return sum(
        int(np.prod(w.shape))
        for w in model.weights
        if len(w.shape) >= 2 and w.name in ("kernel", "embeddings")
    )


@pytest.mark.parametrize("name", sorted(KERAS_HUB))
def test_transformer_blocks_are_pruned(name):
    base, _, _ = MODELS[name]()
    owner = model_ops.owner(elsa_tf.embed(base, SPARSITIES))
    prunable = sum(int(np.prod(w.shape)) for w in owner.prunable_weights)
    assert prunable >= 0.9 * _kernel_and_embedding_size(base)
    # The attention projections inside the transformer blocks are pruned.
    assert any(path.endswith("/query") for path in owner.weight_owners)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_path(name, tmp_path):
    base, x, y = MODELS[name]()
    model = elsa_tf.embed(base, SPARSITIES)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elsa_tf.fit(
        model,
        x,
        y,
        levels=[0],
        epochs_per_level=1,
        optimizer="adam",
        loss=loss,
        batch_size=8,
        verbose=0,
    )
    level0 = _predict(elsa_tf.extract(model, 0), x)
    elsa_tf.fit(
        model,
        x,
        y,
        epochs_per_level=1,
        optimizer="adam",
        loss=loss,
        batch_size=8,
        verbose=0,
    )
    # Level 0 did not move while the denser levels trained around it.
    np.testing.assert_array_equal(_predict(elsa_tf.extract(model, 0), x), level0)
    rows = elsa_tf.summary(model)
    assert [r["status"] for r in rows] == ["finished"] * 3
    for row in rows:
        assert abs(row["achieved_sparsity"] - row["target_sparsity"]) < 0.01
    owner = model_ops.owner(model)
    for level_map in owner.level_maps:
        m = level_map.numpy()
        assert m.max() <= 2  # every weight is used by the dense level
    # Save and load change nothing; extraction keeps the user's class.
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    for k in range(len(SPARSITIES)):
        elsa_tf.set_level(model, k)
        elsa_tf.set_level(loaded, k)
        expected = _predict(model, x)
        np.testing.assert_array_equal(_predict(loaded, x), expected)
        extracted = elsa_tf.extract(model, k)
        assert type(extracted) is type(base)
        np.testing.assert_array_equal(_predict(extracted, x), expected)
    if name == "subclassed":
        assert elsa_tf.extract(model, 1).top_class(x[:2]).shape == (2,)
    # TFLite, every level, against Keras.
    manifest = elsa_tf.export_tflite(model, tmp_path / "tflite", evaluation_data=None)
    from elsa_tf import lite

    runner = lite.LevelRunner(tmp_path / "tflite")
    for k in range(len(SPARSITIES)):
        elsa_tf.set_level(model, k)
        np.testing.assert_allclose(
            runner.load(k).run(x), _predict(model, x), rtol=1e-4, atol=1e-4
        )
    assert manifest["num_levels"] == len(SPARSITIES)


def test_readme_keras_hub_example_runs_verbatim_in_a_new_process(tmp_path):
    result = run_readme_block("keras-hub", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "GPT2CausalLM" in lines
    assert sum("finished" in line for line in lines) == 3
