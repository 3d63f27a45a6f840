"""The one place elsa_tf touches Keras internals.

Keras 3 has no public way to tell a Functional model from a subclassed one
(`keras.Model(inputs, outputs)` returns a `Functional` instance whose class is
not exported), and cloning only works for the former.
"""

from keras.src.models.functional import Functional  # no public alias


def is_functional(model) -> bool:
    return isinstance(model, Functional)
