"""Export channel levels as physically narrower TFLite files.

A model embedded with `granularity="channel"` has levels that are narrower
dense networks. `export_tflite` sends such a model here: every level is
`extract(model, level, physical=True)` (fewer filters and units) converted
on its own, so a level that keeps half of the channels is a file of about a
quarter of the densest level's weights and multiply-adds, not a full-width
file with zeroed channels. Each file is run with the TFLite runtime on the
probe inputs and compared with the embedded model at its level, with the
tolerance patched files are held to (1e-4 of the largest output, 1e-2 for
float16; `"dynamic"` and `"int8"` files, which quantize each level with its
own scales, must give finite outputs of the right shapes, as converted
levels of other models are not compared either).

No bundle is written: the bundle patches the densest file's buffers into
each level, which cannot change a tensor's shape. The manifest's `"bundle"`
is None and its `"bundle_note"` says so.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from elsa_tf import channels, embedding, export, model_ops, reporting
from elsa_tf.lite import runtime

BUNDLE_NOTE = (
    "No bundle for granularity='channel': each level is a physically narrower "
    "network, whose tensors have other shapes than the densest level's, and a "
    "bundle makes levels by rewriting the densest file's buffers. Use the "
    "per-level files."
)


def is_channel_model(model) -> bool:
    """Whether `model` is embedded at channel granularity (raises, as
    `model_ops.owner` does, for a model that is not embedded)."""
    return model_ops.owner(model).granularity == "channel"


def widths(narrowed) -> dict[str, int]:
    """The width (`units` or `filters`) of every layer that creates channels
    (`channels.PRODUCERS`), by layer name."""
    found = {}
    for layer in narrowed.layers:
        key = channels.PRODUCERS.get(type(layer))
        if key is not None:
            found[layer.name] = int(layer.get_config()[key])
    return found


def _check(model, level: int, content: bytes, probe, quantization, file_name: str):
    """Raises unless the file computes what the embedded model computes at
    `level` on `probe`, within `export`'s tolerance for `quantization`."""
    want = export._keras_outputs(model, level, probe)
    got = export._flat_outputs(runtime.predict(runtime.interpreter(content), probe))
    tolerance = export._PATCH_TOLERANCE.get(quantization, np.inf)
    if export._agree(got, want, tolerance):
        return
    shapes = [np.shape(g) for g in got], [np.shape(w) for w in want]
    if shapes[0] != shapes[1]:
        detail = f"output shapes {shapes[0]} against Keras's {shapes[1]}"
    else:
        error = max(
            float(np.abs(np.float64(g) - w).max(initial=0.0))
            / max(float(np.abs(w).max(initial=0.0)), 1e-6)
            for g, w in zip(got, want)
        )
        detail = f"a difference of {error:.3g} of the largest output"
    raise RuntimeError(
        f"The exported {file_name} (level {level}, physically narrowed) does not "
        f"compute what the Keras model computes at that level: {detail} "
        f"(tolerance {tolerance:g}, quantization={quantization!r})."
    )


def write(
    model,
    out_dir,
    *,
    levels,
    quantization,
    representative_data,
    sparse_encoding,
    evaluation_data,
    bundle,
    preprocessing,
) -> dict:
    """`export._write` for a channel-granularity model: every level narrowed
    and converted on its own, checked, and written with `manifest.json`.

    Takes `export_tflite`'s checked arguments. `sparse_encoding` changes
    nothing: a narrowed level holds no pruned zeros for sparse storage to
    leave out, so no sparse form is made and each row's `"storage_reason"`
    says `"narrowed"`.
    """
    del sparse_encoding  # See the docstring: recorded in each row's reason.
    rows_by_level = {row["level"]: row for row in reporting.summary(model)}
    name = quantization or "float32"
    narrowed, contents = {}, {}
    with tempfile.TemporaryDirectory(prefix="elsa_saved_model_") as directory:
        # Densest first: its file gives the signature and the probe inputs.
        for level in reversed(levels):
            narrowed[level] = embedding.extract(model, level, physical=True)
            saved = export._saved_model(
                narrowed[level], os.path.join(directory, str(level))
            )
            contents[level] = export._convert(
                saved, quantization, representative_data, False
            )
    file_names = {
        level: export.level_file_name(level, rows_by_level[level]["target_sparsity"])
        for level in levels
    }
    export._check_runs(contents[levels[-1]], file_names[levels[-1]])
    signature = export._signature(contents[levels[-1]])
    probe = export._probe_inputs(signature, evaluation_data, representative_data)
    rows = []
    for level in levels:
        content, file_name = contents[level], file_names[level]
        export._check_runs(content, file_name)
        _check(model, level, content, probe, quantization, file_name)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(content)
        summary = rows_by_level[level]
        row = {
            "level": level,
            "target_sparsity": summary["target_sparsity"],
            "achieved_sparsity": summary["achieved_sparsity"],
            "file": file_name,
            "bytes": len(content),
            "sha256": export._sha256(content),
            "quantization": name,
            "made_by": "converted",
            # As for other models, None for the densest level; every other
            # level is converted because it is narrower.
            "patch_fallback": None if level == levels[-1] else "narrowed",
            "sparse_encoding": False,
            "storage_reason": "narrowed",
            "dense_bytes": len(content),
            "kept_channels": summary["kept_channels"],
            "total_channels": summary["total_channels"],
            "parameters": int(narrowed[level].count_params()),
            "widths": widths(narrowed[level]),
        }
        if evaluation_data is not None:
            row["accuracy"] = export._accuracy(content, evaluation_data)
        rows.append(row)
    manifest = export.manifest_of(model, name, rows, signature, preprocessing)
    if bundle:
        manifest["bundle"] = None
        manifest["bundle_note"] = BUNDLE_NOTE
    export.save_manifest(out_dir, manifest)
    return manifest
