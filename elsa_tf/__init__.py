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

__version__ = "0.6.0"

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
    "ElsaModel": "elsa_tf.elsa_model",
    "PrunableLayer": "elsa_tf.prunable",
    "export_tflite": "elsa_tf.export",
    "recalibrate_batch_norm": "elsa_tf.batch_norm",
    "finish_level": "elsa_tf.model_ops",
    "update_masks": "elsa_tf.model_ops",
    "function": "elsa_tf.level_function",
    "Sparsifier": "elsa_tf.sparsifiers",
    "GradualMagnitude": "elsa_tf.sparsifiers",
    "DynamicPruningWithFeedback": "elsa_tf.sparsifiers",
    "PolarizedGates": "elsa_tf.polarized_gates",
    "DataSieve": "elsa_tf.sieving_data",
    "SievingCallback": "elsa_tf.sieving_data",
    "front_loaded": "elsa_tf.budgets",
    "LayerFreezing": "elsa_tf.layer_freezing",
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
    # Loading a file saved by elsa_tf 0.1 then fails with a clear message.
    importlib.import_module("elsa_tf.legacy")


_keras_loaded = False  # the Keras module has been executed


def _initializing(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _register_when_ready(finished: str) -> None:
    """Registers now, unless one of our modules is still being imported.

    Keras can be imported while an elsa_tf module is half executed: that
    module imports TensorFlow, and TensorFlow touches `keras` at the end of
    its own import. Importing our other modules then would meet the half
    one. So registration waits until the last of our modules being imported
    has finished (`finished` is the module finishing now).
    """
    busy = [
        name
        for name in list(sys.modules)
        if name.startswith("elsa_tf.") and name != finished and _initializing(name)
    ]
    if busy:
        return
    for finder in [f for f in sys.meta_path if isinstance(f, _RegisterAfterKeras)]:
        sys.meta_path.remove(finder)
    _register_serializables()


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Registers elsa_tf's Keras classes as soon as Keras itself is imported.

    `import elsa_tf` must not import TensorFlow (the on-device runtime has
    none), yet `keras.saving.load_model` must find our classes after
    `import elsa_tf`, whatever is imported next and in which order: so
    registration runs once the Keras module is executed, or, if that happens
    in the middle of importing one of our modules, once that one is done
    (until then, this finder also watches our modules' imports). A mere
    probe, `importlib.util.find_spec("keras")` (which `import tensorflow`
    does), changes nothing.
    """

    def find_spec(self, fullname, path, target=None):
        is_keras = fullname == "keras"
        if not is_keras and not fullname.startswith("elsa_tf."):
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            global _keras_loaded
            try:
                exec_module(module)
                _keras_loaded = _keras_loaded or is_keras
            finally:
                # Also when one of our modules failed to import: the others
                # still register.
                if _keras_loaded and self in sys.meta_path:
                    _register_when_ready(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    _register_serializables()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())
