r"""Export every level of a saved embedded model to TFLite.

    python tools/export_tflite.py --model_path=/tmp/elsa_train/model.keras \
        --out=/tmp/elsa_train/tflite
    python tools/export_tflite.py --model_path=model.keras --out=export_int8 \
        --quantization=int8 --representative_data=calibration.npz \
        --evaluation_data=test.npz --levels=0,2 --overwrite

Writes one `.tflite` per level, `bundle.tflite` and `manifest.json` with
`elsa_tf.export_tflite` and prints a table of what was written. Data files are
`.npz` archives: `x` holds the inputs (the calibration samples for
`--quantization=int8`), `y` the labels (integer or one-hot) for
`--evaluation_data`, whose top-1 accuracy per level goes into the manifest.
Levels are stored dense, each patched from one conversion of the densest
level; `--sparse_encoding` also converts each level with TFLite's sparse
storage, which makes sparse levels smaller files and the export several
times slower.

A wrong path, a file that is not a saved `.keras` model, or an existing,
non-empty `--out` without `--overwrite` stops the tool with one line. The
TFLite converter's log (about 170 lines) is shown with `-v 0` or higher.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from elsa_tf.experiments import startup

QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")

FLAGS = flags.FLAGS
# `model` and `out` are also defined by tools/inspect_model.py; allow_override
# lets the tests import both tools into one process (each runs alone otherwise).
flags.DEFINE_string(
    "model_path", None, "Path of a saved embedded .keras model.", allow_override=True
)
flags.DEFINE_string(
    "out", None, "Directory to write the export to.", allow_override=True
)
# Also defined, identically, by the training program (elsa-train), which the
# tests import into the same process.
flags.DEFINE_enum(
    "quantization",
    "float32",
    QUANTIZATIONS,
    "TFLite quantization of the export.",
    allow_override=True,
)
flags.DEFINE_list("levels", None, "Levels to export, e.g. 0,2; default all.")
flags.DEFINE_string(
    "representative_data", None, ".npz with inputs `x` for int8 calibration."
)
flags.DEFINE_string(
    "evaluation_data", None, ".npz with `x` and `y`: accuracy of each level."
)
flags.DEFINE_bool(
    "sparse_encoding",
    False,
    "Also convert each level with TFLite's sparse storage and keep it where it "
    "is smaller and not slower (one more conversion per level).",
)
flags.DEFINE_bool("bundle", True, "Also write bundle.tflite.")
# Also defined, identically, by the training program (elsa-train).
flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing, non-empty --out.",
    allow_override=True,
)


def load_npz(path: str, name: str, keys: Sequence[str]) -> tuple[np.ndarray, ...]:
    """The arrays `keys` of an `.npz` file given as the flag `name`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if it is not an `.npz` archive or lacks one of `keys`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {name}={path!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(
            f"{name} must be an .npz archive. Received: {name}={path!r} ({e})"
        ) from e
    if not hasattr(data, "files"):
        raise ValueError(
            f"{name} must be an .npz archive (np.savez), not a single array. "
            f"Received: {name}={path!r}"
        )
    with data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(
                f"{name} must hold the arrays {list(keys)}; {path} holds "
                f"{data.files}. Received: {name}={path!r}"
            )
        return tuple(data[k] for k in keys)


def parse_levels(values: Sequence[str] | None) -> list[int] | None:
    """`--levels` as integers (None: every level)."""
    if not values:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(
            f"levels must be integers. Received: levels={','.join(values)!r}"
        ) from None


def run(
    model_path: str,
    out_dir: str,
    *,
    quantization: str = "float32",
    levels: Sequence[int] | None = None,
    representative_data: str | None = None,
    evaluation_data: str | None = None,
    sparse_encoding: bool = False,
    bundle: bool = True,
    overwrite: bool = False,
) -> dict:
    """Exports a saved embedded model; returns the manifest written.

    Args:
        model_path: the saved `.keras` model.
        out_dir: the export directory to create.
        quantization: one of `QUANTIZATIONS` ("float32" is no quantization).
        levels: the level indices to export; None exports all.
        representative_data: `.npz` with `x`, required for "int8".
        evaluation_data: `.npz` with `x` and `y`.
        sparse_encoding, bundle, overwrite: as for `elsa_tf.export_tflite`.

    Raises:
        FileNotFoundError: if the model or a data file does not exist.
        ValueError: for an unknown quantization, "int8" without
            representative data, a bad data file, or what
            `elsa_tf.export_tflite` rejects (a level out of range, an existing
            `out_dir` without `overwrite`).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {QUANTIZATIONS}. "
            f"Received: quantization={quantization!r}"
        )
    if quantization == "int8" and not representative_data:
        raise ValueError(
            "quantization='int8' calibrates on sample inputs: give "
            "representative_data, an .npz with the inputs as `x`. "
            f"Received: representative_data={representative_data!r}"
        )
    startup.check_saved_model(model_path)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out must be a directory. Received: --out={out_dir!r}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(
            f"--out={out_dir!r} exists and is not empty: pass --overwrite to "
            "replace it, or another --out."
        )
    representative = None
    if representative_data:
        (representative,) = load_npz(representative_data, "representative_data", ["x"])
    evaluation = None
    if evaluation_data:
        evaluation = load_npz(evaluation_data, "evaluation_data", ["x", "y"])

    startup.import_tensorflow_quietly()
    import keras

    import elsa_tf  # Registers elsa_tf's classes, which load_model looks up.

    model = keras.saving.load_model(model_path)
    return elsa_tf.export_tflite(
        model,
        out_dir,
        levels=levels,
        quantization=None if quantization == "float32" else quantization,
        representative_data=representative,
        sparse_encoding=sparse_encoding,
        evaluation_data=evaluation,
        bundle=bundle,
        overwrite=overwrite,
    )


def markdown(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table(manifest: dict) -> str:
    """The manifest as a markdown table, one row a level, then the bundle."""
    accuracy = any(row.get("accuracy") is not None for row in manifest["levels"])
    headers = ["level", "target", "achieved", "file", "bytes", "sparse storage"]
    rows = []
    for row in manifest["levels"]:
        cells = [
            row["level"],
            f"{row['target_sparsity']:.2f}",
            f"{row['achieved_sparsity']:.4f}",
            row["file"],
            row["bytes"],
            "yes" if row["sparse_encoding"] else "no",
        ]
        if accuracy:
            cells.append(f"{row['accuracy']:.4f}")
        rows.append(cells)
    text = f"Quantization: {manifest['quantization']}\n\n"
    text += markdown(headers + ["accuracy"] * accuracy, rows)
    entry = manifest.get("bundle")
    if entry:
        text += (
            f"\n\nBundle {entry['file']}: {entry['bytes']} bytes, levels "
            f"{entry['levels']}, level map {entry['map_bytes']} bytes, "
            f"{'exact' if entry['exact'] else 'inexact (int8 scales)'}"
        )
    return text


@contextlib.contextmanager
def _nothing():
    yield


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.model_path or not FLAGS.out:
        raise app.UsageError(
            "--model_path (the saved embedded model) and --out (the export "
            f"directory) are required. Received: --model_path={FLAGS.model_path!r}, "
            f"--out={FLAGS.out!r}"
        )
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # the converter logs at INFO
    try:
        with startup.captured_stderr() if not verbose else _nothing():
            manifest = run(
                FLAGS.model_path,
                FLAGS.out,
                quantization=FLAGS.quantization,
                levels=parse_levels(FLAGS.levels),
                representative_data=FLAGS.representative_data,
                evaluation_data=FLAGS.evaluation_data,
                sparse_encoding=FLAGS.sparse_encoding,
                bundle=FLAGS.bundle,
                overwrite=FLAGS.overwrite,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"FATAL {e}", file=sys.stderr)
        sys.exit(1)
    print(table(manifest))
    print(f"\nWritten to {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
    app.run(main)
