"""Keras's traced train function, kept per trace key.

A Keras model traces `train_function` once and calls it until `compile`
drops it. An embedded model's step depends on ELSA's state only through
`ElsaModel.trace_key()` (the level is read from a variable inside the step,
so every level after the first shares one trace), and, as any Keras step,
on the trainable variables (layer freezing changes them) and the `train_step`
in place (data sieving routes it). `switch(model)` keeps the functions in
place under the key they were traced for, and puts back the ones traced for
the model's key now, or drops them to be traced anew, as `tf.function` keeps
one concrete function per input signature. A level that comes back to a
known key then costs no tracing: on the digits CNN, tracing a level's train
step takes 0.4 to 0.8 s, about as long as the level's epochs.

The test and predict functions are left to Keras: they run at the view
level (`ElsaModel.call`), read from a variable, whatever the key.
Train functions are only kept while the model stays compiled the same way:
a new `compile` (a new optimizer, loss or metrics) forgets them.
"""

from __future__ import annotations

_ATTRIBUTE = "_elsa_compiled_functions"


class _Kept:
    """The kept train functions of one compiled model, and the key of the one
    in place."""

    def __init__(self, compiled_with: tuple):
        self.compiled_with = compiled_with
        self.functions: dict[tuple, object] = {}
        self.key = None  # the key the function in place is traced for


def _compiled_with(model) -> tuple:
    # What `compile` makes anew; functions traced before it are stale.
    return (
        getattr(model, "optimizer", None),
        getattr(model, "_compile_loss", None),
        getattr(model, "_compile_metrics", None),
        getattr(model, "steps_per_execution", None),
        getattr(model, "_compile_config", None),  # made anew by every compile
    )


def key(model) -> tuple:
    """Everything a traced step of `model` depends on, besides variable values.

    For any Keras model: the trainable variables and the train step. For an
    embedded model, also its `trace_key()`.
    """
    trace_key = getattr(model, "trace_key", None)
    return (
        trace_key() if trace_key is not None else None,
        tuple(id(v) for v in model.trainable_variables),
        vars(model).get("train_step"),
    )


def switch(model, in_fit: bool = False) -> bool:
    """Puts in place the train function traced for `model`'s key, if any.

    Call it after anything that changes the key (a level change, raw
    training turned on or off, layers frozen, the train step rerouted).

    Args:
        model: a Keras model; an embedded one, or any other whose training
            step changes only with its trainable variables and `train_step`.
        in_fit: inside `fit`, whose running loop calls `model.train_function`
            directly: a train function is then made at once if none is kept.

    Returns:
        Whether the train function in place changed.
    """
    compiled_with = _compiled_with(model)
    kept = vars(model).get(_ATTRIBUTE)
    if kept is None or not all(
        a is b for a, b in zip(kept.compiled_with, compiled_with)
    ):
        kept = _Kept(compiled_with)
        object.__setattr__(model, _ATTRIBUTE, kept)
    elif kept.key is not None:
        kept.functions[kept.key] = getattr(model, "train_function", None)
    before = getattr(model, "train_function", None)
    kept.key = key(model)
    model.train_function = kept.functions.get(kept.key)
    if in_fit and model.train_function is None:
        model.make_train_function()
    return model.train_function is not before


def refresh(model) -> None:
    """`switch(model)` if the model holds a train function or kept ones.

    For changes of the key outside `fit` (loading variables into the model,
    turning raw training on or off), before anything has been traced.
    """
    if vars(model).get(_ATTRIBUTE) is not None or (
        getattr(model, "train_function", None) is not None
    ):
        switch(model)
