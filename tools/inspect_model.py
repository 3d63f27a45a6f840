r"""Inspect a saved embedded model, and extract one of its levels.

    python tools/inspect_model.py --model_path=/tmp/elsa_train/model.keras --per_layer
    python tools/inspect_model.py --model_path=/tmp/elsa_train/model.keras \
        --extract_level=1 --out=/tmp/level1.keras

Prints `elsa_tf.summary` of the model; with `--extract_level`, writes that
level as a plain Keras model (loadable without elsa_tf). A wrong path or a
file that is not a saved `.keras` model stops it with one line.
"""

from __future__ import annotations

import sys

from absl import app, flags

from elsa_tf.experiments import startup

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "Path of a saved embedded .keras model.")
flags.DEFINE_bool("per_layer", False, "Also print every prunable weight.")
flags.DEFINE_integer("extract_level", None, "A level to extract into --out.")
flags.DEFINE_string("out", None, "Where to save the extracted level (.keras).")


def run(model_path: str, per_layer: bool = False, extract_level=None, out=None):
    """Returns the summary of a saved embedded model; extracts a level if asked.

    Raises:
        FileNotFoundError: if `model_path` does not exist.
        ValueError: if `extract_level` is given without `out`, or is out of
            range for the model.
    """
    startup.check_saved_model(model_path)
    if extract_level is not None and not out:
        raise ValueError(
            f"Give --out to save the extracted level. Received: out={out!r}"
        )
    startup.import_tensorflow_quietly()
    import keras

    import elsa_tf

    model = keras.saving.load_model(model_path)
    rows = elsa_tf.summary(model, per_layer=per_layer)
    if extract_level is not None:
        elsa_tf.extract(model, extract_level).save(out)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.model_path:
        raise app.UsageError("--model_path is required: the saved embedded model.")
    try:
        rows = run(FLAGS.model_path, FLAGS.per_layer, FLAGS.extract_level, FLAGS.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"FATAL {e}", file=sys.stderr)
        sys.exit(1)
    print(rows)
    if FLAGS.extract_level is not None:
        print(f"Level {FLAGS.extract_level} saved to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
