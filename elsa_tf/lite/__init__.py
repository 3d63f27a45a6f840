"""elsa_tf on the device: make, run and choose levels with only a TFLite runtime.

This package imports NumPy, the standard library and, when a model runs, the
first TFLite runtime found (`ai_edge_litert`, then `tflite_runtime`, then
`tensorflow.lite`; see `runtime`). It never imports TensorFlow or Keras
otherwise.

>>> from elsa_tf import lite
>>> sorted(lite.SOURCES)
['auto', 'bundle', 'file']
"""

from elsa_tf.lite import runtime
from elsa_tf.lite._flatbuffer import FlatbufferError
from elsa_tf.lite.bundle import Bundle, BundleError

# Read either kind of bundle: weight levels (`bundle`) or channel levels.
from elsa_tf.lite.channel_bundle import ChannelBundle, materialize, read_bundle
from elsa_tf.lite.runner import (
    MANIFEST,
    SOURCES,
    Latency,
    LevelRunner,
    ManifestError,
    read_manifest,
    select_by_accuracy,
    select_by_latency,
)

__all__ = [
    "MANIFEST",
    "SOURCES",
    "Bundle",
    "BundleError",
    "ChannelBundle",
    "FlatbufferError",
    "Latency",
    "LevelRunner",
    "ManifestError",
    "materialize",
    "read_bundle",
    "read_manifest",
    "runtime",
    "select_by_accuracy",
    "select_by_latency",
]
