"""A clear error for files saved by elsa_tf 0.1.

elsa_tf 0.1 wrapped every layer of a Functional or Sequential model in an
`ElsaWrapper`, each holding the level maps of its own weights. Since 0.2 one
`ElsaModel` owns the whole model's levels, so that any model (subclassed,
keras_hub) can be embedded. A 0.1 file names `ElsaWrapper`: loading it
raises this error instead of Keras's "Could not locate class".
"""

from __future__ import annotations

import keras

LEGACY_VERSION = "0.1"


@keras.saving.register_keras_serializable(package="elsa_tf")
class ElsaWrapper(keras.layers.Layer):
    """Stands for the 0.1 layer wrapper; it cannot be created."""

    def __init__(self, *args, **kwargs):
        raise ValueError(
            f"This model was saved by elsa_tf {LEGACY_VERSION}, whose "
            "per-layer ElsaWrapper was replaced by one ElsaModel in elsa_tf "
            "0.2: it cannot be loaded by this version. Load it with "
            f"`pip install 'elsa_tf=={LEGACY_VERSION}.*'`, or embed the "
            "original model again with elsa_tf.embed and retrain."
        )

    @classmethod
    def from_config(cls, config):
        return cls()
