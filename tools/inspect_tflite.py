r"""Inspect an elsa_tf TFLite export, bundle or level file, without TensorFlow.

    python tools/inspect_tflite.py --path=/tmp/elsa_digits/tflite
    python tools/inspect_tflite.py --path=/tmp/elsa_digits/tflite/bundle.tflite
    python tools/inspect_tflite.py --per_tensor \
        --path=/tmp/elsa_digits/tflite/level0_sparsity0.90.tflite

An export directory: the model's named inputs and outputs and its input
preprocessing, then each level's file, its size raw and gzipped, whether its
SHA-256 matches the manifest, its target and achieved sparsity, its storage
(sparse, or dense and why: `storage_reason` in the manifest, with both forms'
latency when they were timed at export) and accuracy.
A bundle: its levels, level map and, per nested tensor, the fraction of its
elements each level does not use. Any `.tflite` with `--per_tensor`: the
sparsity of each constant tensor (zeros for dense storage; for sparse
storage, 1 - stored elements / elements). Only NumPy, absl and
`elsa_tf.lite` are imported, so this runs on the device itself.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from elsa_tf import lite

# elsa_tf.lite has no public reader of a file's tensors: its own is used here.
from elsa_tf.lite import _flatbuffer as fb
from elsa_tf.lite import bundle as bundle_lib
from elsa_tf.lite import channel_bundle

FLAGS = flags.FLAGS
# `path` is also defined by tools/benchmark_device.py; allow_override lets
# the tests import both tools into one process (each runs alone otherwise).
flags.DEFINE_string(
    "path",
    None,
    "An export directory, a bundle, or a per-level .tflite file.",
    allow_override=True,
)
flags.DEFINE_bool("per_tensor", False, "Also list each constant tensor's sparsity.")


def gzip_size(data: bytes) -> int:
    """Bytes after gzip -9: what the file costs to ship compressed."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _model(data: bytes, path: str) -> fb.ModelRef:
    try:
        return fb.read_model(data)
    except fb.FlatbufferError as e:
        raise ValueError(f"{path} is not a TFLite file: {e}") from e


def tensor_sparsity(data: bytes, model: fb.ModelRef) -> list[dict]:
    """Per constant tensor: storage, element counts and sparsity.

    A dense-stored tensor's sparsity is its fraction of zero elements. A
    sparse-encoded one stores only (blocks of) its nonzero elements, so its
    sparsity is 1 - stored / elements. Tensors of a type NumPy cannot read
    have no sparsity (None).
    """
    rows = []
    for tensor in fb.constant_tensors(model).values():
        ref = model.buffers[tensor.buffer]
        elements = math.prod(tensor.shape)
        dtype = tensor.dtype
        stored = ref.size // dtype.itemsize if dtype is not None else None
        if dtype is None or not elements:
            sparsity = None
        elif tensor.sparse:
            sparsity = 1 - stored / elements
        else:
            values = np.frombuffer(data, dtype, stored, offset=ref.start)
            sparsity = float(np.count_nonzero(values == 0) / stored)
        rows.append(
            {
                "tensor": tensor.name,
                "dtype": dtype.name if dtype is not None else f"type{tensor.type}",
                "shape": list(tensor.shape),
                "storage": "sparse" if tensor.sparse else "dense",
                "elements": elements,
                "stored": stored,
                "sparsity": sparsity,
            }
        )
    return rows


def _file_report(path: str, per_tensor: bool) -> dict:
    data = _read(path)
    model = _model(data, path)
    tensors = tensor_sparsity(data, model)
    known = [t for t in tensors if t["sparsity"] is not None]
    elements = sum(t["elements"] for t in known)
    zeros = sum(t["sparsity"] * t["elements"] for t in known)
    report = {
        "kind": "file",
        "path": path,
        "bytes": len(data),
        "gzip_bytes": gzip_size(data),
        "constant_tensors": len(tensors),
        "sparse_tensors": sum(t["storage"] == "sparse" for t in tensors),
        "constant_elements": elements,
        "constant_sparsity": zeros / elements if elements else None,
    }
    if per_tensor:
        report["tensors"] = tensors
    return report


def _bundle_report(path: str, bundle: lite.Bundle, per_tensor: bool) -> dict:
    header = bundle.header
    tensors = []
    for entry, codes in zip(header["nested"], bundle.codes()):
        tensors.append(
            {
                "tensor": entry["tensor"],
                "dtype": entry["dtype"],
                "count": entry["count"],
                "exact": entry["exact"],
                # Code k: first used by the k-th level held; > k: unused there.
                "sparsity": [
                    float(np.mean(codes > k)) for k in range(bundle.num_levels)
                ],
            }
        )
    report = {
        "kind": "bundle",
        "path": path,
        "bytes": len(bundle.data),
        "gzip_bytes": gzip_size(bundle.data),
        "levels": bundle.levels,
        "quantization": header.get("quantization"),
        "target_sparsity": header.get("target_sparsity"),
        "level_sparsity": bundle.level_sparsity(),
        "map_bytes": header["map_length"],
        "nested_elements": sum(t["count"] for t in tensors),
        "overrides": len(header["overrides"]),
        "override_bytes": sum(e["length"] for e in header["overrides"]),
        "nested": tensors,
    }
    if per_tensor:
        report["tensors"] = tensor_sparsity(bundle.data, _model(bundle.data, path))
    return report


def _edit_kind(edit: dict) -> str:
    """What one edit of a channel bundle does, in a word or two."""
    if "vector" in edit:
        return f"{edit['vector'][-1]} vector"
    if "bytes" in edit:
        return "own bytes"
    return "scaled slice" if "scale" in edit else "slice"


def _channel_bundle_report(path: str, bundle) -> dict:
    """A channel bundle: each level's constant elements once made (its
    weights, narrower than the densest level's) and its edits by kind."""
    rows = []
    for position, level in enumerate(bundle.levels):
        made = bundle.materialize(level)
        constants = fb.constant_tensors(fb.read_model(made))
        kinds = {}
        for edit in bundle.edits()[position]:
            kind = _edit_kind(edit)
            kinds[kind] = kinds.get(kind, 0) + 1
        rows.append(
            {
                "level": level,
                "constant_elements": int(
                    sum(np.prod(t.shape, dtype=np.int64) for t in constants.values())
                ),
                "edits": kinds,
            }
        )
    return {
        "kind": "channel_bundle",
        "path": path,
        "bytes": len(bundle.data),
        "gzip_bytes": gzip_size(bundle.data),
        "levels": rows,
    }


def _check(path: str, entry: dict) -> tuple[bytes | None, dict]:
    """A file of the manifest: its bytes and size, gzip size and hash status."""
    file_path = os.path.join(path, entry["file"])
    if not os.path.isfile(file_path):
        return None, {"bytes": None, "gzip_bytes": None, "sha256": "missing"}
    data = _read(file_path)
    digest = hashlib.sha256(data).hexdigest()
    return data, {
        "bytes": len(data),
        "gzip_bytes": gzip_size(data),
        "sha256": "ok" if digest == entry["sha256"] else "mismatch",
    }


def _export_report(path: str, per_tensor: bool) -> dict:
    manifest = lite.read_manifest(path)
    levels, per_file = [], {}
    for row in manifest["levels"]:
        data, checked = _check(path, row)
        levels.append(
            {
                "level": row["level"],
                "file": row["file"],
                **checked,
                "target_sparsity": row["target_sparsity"],
                "achieved_sparsity": row["achieved_sparsity"],
                "sparse_encoding": row.get("sparse_encoding"),
                "storage_reason": row.get("storage_reason"),
                "latency_ms": row.get("latency_ms"),
                "accuracy": row.get("accuracy"),
            }
        )
        if per_tensor and data is not None:
            per_file[row["file"]] = tensor_sparsity(data, _model(data, row["file"]))
    report = {
        "kind": "export",
        "path": path,
        "model": manifest.get("model"),
        "quantization": manifest.get("quantization"),
        "inputs": manifest.get("inputs"),
        "outputs": manifest.get("outputs"),
        "preprocessing": manifest.get("preprocessing"),
        "levels": levels,
        "bundle": None,
    }
    if manifest.get("bundle"):
        entry = manifest["bundle"]
        report["bundle"] = {"file": entry["file"], **_check(path, entry)[1]}
    if per_tensor:
        report["tensors"] = per_file
    return report


def run(path: str, per_tensor: bool = False) -> dict:
    """What an export directory, a bundle or a `.tflite` file holds.

    Args:
        path: an export directory (with `manifest.json`), a bundle, or any
            `.tflite` file.
        per_tensor: also report each constant tensor's sparsity (of every
            level file, for an export directory).

    Returns:
        A dict whose `"kind"` is `"export"`, `"bundle"`, `"channel_bundle"`
        or `"file"`; `text` renders it.

    Raises:
        FileNotFoundError: if `path` does not exist.
        elsa_tf.lite.ManifestError: for a directory without a valid manifest.
        elsa_tf.lite.BundleError: for a corrupt bundle.
        ValueError: for a file that is not a TFLite model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _export_report(path, per_tensor)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such export or file: path={path!r}")
    data = _read(path)
    model = _model(data, path)
    if bundle_lib.METADATA_NAME in model.metadata:
        return _bundle_report(path, lite.read_bundle(path), per_tensor)
    if channel_bundle.METADATA_NAME in model.metadata:
        return _channel_bundle_report(path, lite.read_bundle(path))
    return _file_report(path, per_tensor)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tensor_table(rows: Sequence[dict]) -> str:
    return markdown(
        ["tensor", "dtype", "shape", "storage", "elements", "stored", "sparsity"],
        [
            [
                r["tensor"],
                r["dtype"],
                "x".join(map(str, r["shape"])) or "scalar",
                r["storage"],
                r["elements"],
                r["stored"],
                r["sparsity"],
            ]
            for r in rows
        ],
    )


def _storage(row: dict) -> str | None:
    """`sparse`, or `dense` with the manifest's reason and timings."""
    if row["sparse_encoding"] is None:
        return None
    words = "sparse" if row["sparse_encoding"] else "dense"
    if row.get("storage_reason"):
        words += f" ({row['storage_reason'].replace('_', ' ')})"
    timing = row.get("latency_ms")
    if timing:
        words += f", {timing['dense']:.4f} ms dense / {timing['sparse']:.4f} sparse"
    return words


def _signature_lines(report: dict) -> list[str]:
    def describe(specs):
        return ", ".join(
            f"{s['name']} {'x'.join('?' if d < 0 else str(d) for d in s['shape'])} "
            f"{s['dtype']}"
            for s in specs
        )

    lines = []
    if report.get("inputs"):
        lines.append(f"Inputs: {describe(report['inputs'])}")
    if report.get("outputs"):
        lines.append(f"Outputs: {describe(report['outputs'])}")
    if report.get("preprocessing"):
        items = ", ".join(f"{k}={v}" for k, v in report["preprocessing"].items())
        lines.append(f"Preprocessing: {items}")
    return lines


def text(report: dict) -> str:
    """`run`'s report as markdown tables."""
    kind = report["kind"]
    if kind == "export":
        out = [
            f"Export {report['path']}: model {report['model']}, "
            f"{report['quantization']}",
            "",
            *_signature_lines(report),
            "",
            markdown(
                ["level", "file", "bytes", "gzip bytes", "sha256"]
                + ["target", "achieved", "storage", "accuracy"],
                [
                    [r["level"], r["file"], r["bytes"], r["gzip_bytes"], r["sha256"]]
                    + [r["target_sparsity"], r["achieved_sparsity"]]
                    + [_storage(r), r["accuracy"]]
                    for r in report["levels"]
                ],
            ),
        ]
        b = report["bundle"]
        if b:
            out += [
                "",
                f"Bundle {b['file']}: {_fmt(b['bytes'])} bytes, "
                f"{_fmt(b['gzip_bytes'])} gzipped, sha256 {b['sha256']}",
            ]
        for name, rows in report.get("tensors", {}).items():
            out += ["", f"{name}:", "", _tensor_table(rows)]
        return "\n".join(out)
    if kind == "channel_bundle":
        return "\n".join(
            [
                f"Channel bundle {report['path']}: {report['bytes']} bytes "
                f"({report['gzip_bytes']} gzipped): each level a narrower "
                "network made from the densest file",
                "",
                markdown(
                    ["level", "constant elements", "edits"],
                    [
                        [
                            r["level"],
                            r["constant_elements"],
                            ", ".join(
                                f"{k} {n}" for k, n in sorted(r["edits"].items())
                            ),
                        ]
                        for r in report["levels"]
                    ],
                ),
            ]
        )
    if kind == "bundle":
        levels = report["levels"]
        out = [
            f"Bundle {report['path']}: {report['bytes']} bytes "
            f"({report['gzip_bytes']} gzipped), {report['quantization']}, "
            f"levels {levels}",
            f"Level map: {report['map_bytes']} bytes for "
            f"{report['nested_elements']} nested weights; "
            f"{report['overrides']} override buffers, "
            f"{report['override_bytes']} bytes",
            "Sparsity of the nested weights per level: "
            + ", ".join(
                f"{level}: {s:.4f}"
                for level, s in zip(levels, report["level_sparsity"])
            ),
            "",
            markdown(
                ["tensor", "dtype", "count", "exact"]
                + [f"level {level}" for level in levels],
                [
                    [t["tensor"], t["dtype"], t["count"], t["exact"]] + t["sparsity"]
                    for t in report["nested"]
                ],
            ),
        ]
        if "tensors" in report:
            out += ["", "Constant tensors (densest level):", ""]
            out.append(_tensor_table(report["tensors"]))
        return "\n".join(out)
    out = [
        f"{report['path']}: {report['bytes']} bytes ({report['gzip_bytes']} "
        f"gzipped), {report['constant_tensors']} constant tensors "
        f"({report['sparse_tensors']} sparse-encoded), "
        f"{report['constant_elements']} elements, sparsity "
        f"{_fmt(report['constant_sparsity'])}"
    ]
    if "tensors" in report:
        out += ["", _tensor_table(report["tensors"])]
    return "\n".join(out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.path:
        raise app.UsageError(
            "--path is required: an export directory, a bundle or a .tflite file."
        )
    print(text(run(FLAGS.path, FLAGS.per_tensor)))


if __name__ == "__main__":
    app.run(main)
