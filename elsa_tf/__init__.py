"""elsa_tf: many sparse networks nested in one dense Keras 3 model (ELSA).

Nothing heavy is imported here: each public name is loaded from its module
on first use, so `import elsa_tf` stays cheap and the on-device runtime never
pulls in TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "embed": "elsa_tf.embedding",
    "extract": "elsa_tf.embedding",
    "set_level": "elsa_tf.embedding",
    "fit": "elsa_tf.training",
    "summary": "elsa_tf.reporting",
    "LevelSummary": "elsa_tf.reporting",
    "FreezingOptimizer": "elsa_tf.optimizer",
    "LevelScheduler": "elsa_tf.callbacks",
    "LevelSchedule": "elsa_tf.schedules",
    "ElsaWrapper": "elsa_tf.wrapper",
    "PrunableLayer": "elsa_tf.prunable",
    "export_tflite": "elsa_tf.export",
    "recalibrate_batch_norm": "elsa_tf.batch_norm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'elsa_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


def _register_serializables():
    # keras.saving.load_model finds our classes by their registered names, so
    # the modules that register them must be imported before a model is loaded.
    for module in sorted(set(_EXPORTS.values()) - {"elsa_tf.export"}):
        importlib.import_module(module)


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Registers elsa_tf's Keras classes as soon as Keras itself is imported.

    `import elsa_tf` must not import TensorFlow (the on-device runtime has
    none), yet `keras.saving.load_model` must find our classes after
    `import elsa_tf`: so registration waits for Keras to be imported.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_serializables()

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    _register_serializables()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
