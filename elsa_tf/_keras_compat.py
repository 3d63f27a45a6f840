"""The one place elsa_tf touches Keras internals.

A layer does not list its sublayers publicly (`Model.layers` exists for
models only), yet prunable weights sit inside composite layers (a keras_hub
`TransformerEncoder`, a `MultiHeadAttention`). Keras 2 (tf_keras) layers have
the same private method, which `batch_norm` relies on too.
"""


def sublayers(layer) -> list:
    """The layers `layer` tracks directly (its attributes, lists of layers)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def walk(layer):
    """Every layer below `layer` (not itself), depth first, each once.

    Sublayers of models and of composite layers alike.
    """
    seen, stack = {id(layer)}, list(reversed(sublayers(layer)))
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(reversed(sublayers(node)))


def copy_call_state(source, clone) -> None:
    """Marks `clone` as called when `source` was.

    `Model.export` refuses a subclassed model that was never called, even
    though the copy was built from the source's recorded input shapes
    (`build_from_config`), which are what `export` then reads.
    """
    if getattr(source, "_called", False):
        clone._called = True
