r"""Time every level of an elsa_tf export on this device, without TensorFlow.

    python tools/benchmark_device.py --path=/tmp/elsa_digits/tflite
    python tools/benchmark_device.py --path=/tmp/elsa_digits/tflite \
        --source=bundle --batch=8 --num_threads=1,2,4 --out=/tmp/bench.json

Loads each level from its own file and/or makes it from the bundle
(`--source`, default every source the export has), times `invoke` on random
inputs of the model's input shape for each `--num_threads`, and prints a
markdown table: level, sparsity, size raw and gzipped, median milliseconds
and speedup per thread count over the reference: the densest level stored
dense, made from the bundle when there is one (a per-level file may be
sparse-stored, which is no faster and can be slower). Also times making each
level from the bundle (`Bundle.materialize`, digest check included). Only
NumPy, absl and `elsa_tf.lite` with a TFLite runtime are imported.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from elsa_tf import lite

SOURCES = ("file", "bundle")

FLAGS = flags.FLAGS
# `path` and `out` are also defined by other tools; allow_override lets the
# tests import them all into one process (each runs alone otherwise).
flags.DEFINE_string(
    "path", None, "An export directory or a bundle .tflite.", allow_override=True
)
flags.DEFINE_list(
    "source", None, "Where levels come from: file, bundle; default all there are."
)
flags.DEFINE_integer("batch", 1, "Batch size of the random inputs.")
flags.DEFINE_list("num_threads", ["1"], "Interpreter thread counts to time.")
flags.DEFINE_integer("warmup", 3, "Untimed runs before timing each level.")
flags.DEFINE_integer("repeats", 20, "Timed runs per level and thread count.")
flags.DEFINE_integer("materialize_repeats", 5, "Timed Bundle.materialize calls.")
flags.DEFINE_string(
    "out", None, "Where to write the results as JSON.", allow_override=True
)


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}. Received: {name}={value}")
    return int(value)


def parse_ints(name: str, values: Sequence[str]) -> list[int]:
    """A list flag (`--num_threads=1,2`) as integers."""
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(
            f"{name} must be integers. Received: {name}={','.join(values)!r}"
        ) from None


def _sources(path: str, manifest: dict | None, sources) -> list[str]:
    available = []
    if manifest is not None and any(row.get("file") for row in manifest["levels"]):
        available.append("file")
    if manifest is None or manifest.get("bundle"):
        available.append("bundle")
    if sources is None:
        return available
    sources = [sources] if isinstance(sources, str) else list(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(
            f"source must name some of {SOURCES}. Received: source={sources}"
        )
    missing = [s for s in sources if s not in available]
    if missing:
        raise ValueError(
            f"{path} has levels from {available} only. Received: source={sources}"
        )
    return list(dict.fromkeys(sources))


def _input_specs(runner: lite.LevelRunner, level: int, source: str):
    """(shape signature, dtype) of each input, from the manifest if any."""
    if runner.manifest is not None and runner.manifest.get("inputs"):
        return [(i["shape"], np.dtype(i["dtype"])) for i in runner.manifest["inputs"]]
    details = runner.load(level, source=source).interpreter.get_input_details()
    return [
        ([int(s) for s in d["shape_signature"]], np.dtype(d["dtype"])) for d in details
    ]


def _input_names(runner: lite.LevelRunner) -> list[str] | None:
    """The signature's input names, in the manifest's order (None without)."""
    manifest = runner.manifest
    if manifest is None or not manifest.get("signature"):
        return None
    return [i["name"] for i in manifest["inputs"]]


def random_inputs(specs, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random arrays for each input; an unknown leading dimension is `batch`.

    Float inputs are standard normal; integer ones 0 or 1.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, dtype in specs:
        shape = list(shape)
        if shape and shape[0] < 0:
            shape[0] = batch
        if any(s < 0 for s in shape):
            raise ValueError(
                "Only the batch dimension of an input may be unknown; give a "
                f"model with a fixed input shape. Received: shape={shape}"
            )
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            # Integer inputs are mostly indices (token ids, masks): 0 and 1
            # are valid for any vocabulary, where random int32s are not.
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
    return arrays


def _sparsities(runner: lite.LevelRunner) -> dict[int, float]:
    if runner.manifest is not None:
        return {r["level"]: r["achieved_sparsity"] for r in runner.manifest["levels"]}
    bundle = runner.bundle()
    achieved = bundle.header.get("achieved_sparsity") or bundle.level_sparsity()
    return dict(zip(bundle.levels, achieved))


def _reference(runner, rows, sources, levels, sparsity) -> dict:
    """The model speedups are measured against: the densest level, stored
    dense. The bundle holds it dense; without a bundle, the densest level's
    own file, whose storage the manifest says."""
    # The densest level: least sparse, the highest index on a tie.
    densest = min(levels, key=lambda k: (sparsity.get(k) or 0.0, -k))
    has_bundle = runner.manifest is None or bool(runner.manifest.get("bundle"))
    if has_bundle:
        source, storage = "bundle", "dense"
    else:
        source = "file"
        row = next(r for r in runner.manifest["levels"] if r["level"] == densest)
        storage = "sparse" if row.get("sparse_encoding") else "dense"
    timed = next(
        (r for r in rows if r["level"] == densest and r["source"] == source), None
    )
    return {
        "level": densest,
        "source": source,
        "storage": storage,
        "median_ms": dict(timed["median_ms"]) if timed else None,
    }


def _median_ms(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds) * 1e3)


def run(
    path: str,
    *,
    source: Sequence[str] | str | None = None,
    batch: int = 1,
    num_threads: Sequence[int] = (1,),
    warmup: int = 3,
    repeats: int = 20,
    materialize_repeats: int = 5,
    seed: int = 0,
) -> dict:
    """Times every level of an export directory or a bundle.

    Args:
        path: an export directory (with `manifest.json`) or a bundle `.tflite`.
        source: "file", "bundle" or both; None times every source `path` has.
        batch: the leading dimension of the random inputs.
        num_threads: interpreter thread counts, each timed separately.
        warmup: untimed runs before each timing.
        repeats: timed runs per level, source and thread count.
        materialize_repeats: timed `Bundle.materialize` calls per level (0
            skips them).
        seed: seed of the random inputs (the same inputs for every level).

    Returns:
        A JSON-serializable dict: `rows` (one per level and source, with
        `median_ms` and `speedup` keyed by thread count), `reference` (the
        densest level stored dense, which speedups divide: its level,
        source, storage and `median_ms`), `materialize` (one per level) and
        the settings; `text` renders it.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for a bad setting, a source `path` does not have, or an
            export whose files do not match its manifest.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such export or bundle: path={path!r}")
    batch = _positive("batch", batch)
    threads = [_positive("num_threads", t) for t in num_threads]
    if not threads:
        raise ValueError(f"num_threads must name a thread count. Received: {threads}")
    warmup = _positive("warmup", warmup, 0)
    repeats = _positive("repeats", repeats)
    materialize_repeats = _positive("materialize_repeats", materialize_repeats, 0)

    runners = {t: lite.LevelRunner(path, num_threads=t) for t in threads}
    first = runners[threads[0]]
    sources = _sources(path, first.manifest, source)
    levels = first.levels if "file" in sources else first.bundle().levels
    specs = _input_specs(first, levels[0], sources[0])
    inputs = random_inputs(specs, batch, seed)
    names = _input_names(first)
    if names and len(names) == len(inputs) > 1:
        inputs = dict(zip(names, inputs))  # In the manifest's order, by name.
    sparsity = _sparsities(first)

    rows = []
    for src in sources:
        for level in levels:
            content = first.model_bytes(level, source=src)
            row = {
                "level": level,
                "source": src,
                "sparsity": sparsity.get(level),
                "bytes": len(content),
                "gzip_bytes": len(gzip.compress(content, compresslevel=9, mtime=0)),
                "median_ms": {},
                "p10_ms": {},
                "p90_ms": {},
            }
            for t in threads:
                runner = runners[t].load(level, source=src)
                latency = runner.latency(inputs, warmup=warmup, repeats=repeats)
                row["median_ms"][str(t)] = latency.median_ms
                row["p10_ms"][str(t)] = latency.p10_ms
                row["p90_ms"][str(t)] = latency.p90_ms
            rows.append(row)
    reference = _reference(first, rows, sources, levels, sparsity)
    if reference.get("median_ms") is None:
        reference["median_ms"] = {}
        for t in threads:
            runner = runners[t].load(reference["level"], source=reference["source"])
            latency = runner.latency(inputs, warmup=warmup, repeats=repeats)
            reference["median_ms"][str(t)] = latency.median_ms
    for r in rows:
        r["speedup"] = {
            t: reference["median_ms"][t] / ms for t, ms in r["median_ms"].items()
        }

    materialize = []
    if "bundle" in sources and materialize_repeats:
        bundle = first.bundle()
        for level in bundle.levels:
            materialize.append(
                {
                    "level": level,
                    "median_ms": _median_ms(
                        lambda level=level: bundle.materialize(level),
                        materialize_repeats,
                    ),
                }
            )
    return {
        "path": os.path.abspath(path),
        "runtime": lite.runtime.name(),
        "batch": batch,
        "num_threads": threads,
        "inputs": [
            {"shape": list(a.shape), "dtype": a.dtype.name}
            for a in (inputs.values() if isinstance(inputs, dict) else inputs)
        ],
        "warmup": warmup,
        "repeats": repeats,
        "materialize_repeats": materialize_repeats,
        "reference": reference,
        "rows": rows,
        "materialize": materialize,
    }


def markdown(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text(results: dict) -> str:
    """`run`'s results as markdown tables."""
    threads = [str(t) for t in results["num_threads"]]
    shapes = ", ".join(
        f"{'x'.join(map(str, i['shape']))} {i['dtype']}" for i in results["inputs"]
    )
    headers = ["level", "source", "sparsity", "bytes", "gzip bytes"]
    for t in threads:
        unit = "thread" if t == "1" else "threads"
        headers += [f"ms ({t} {unit})", f"speedup ({t} {unit})"]
    rows = []
    for r in results["rows"]:
        cells = [r["level"], r["source"]]
        cells.append("-" if r["sparsity"] is None else f"{r['sparsity']:.4f}")
        cells += [r["bytes"], r["gzip_bytes"]]
        for t in threads:
            cells += [f"{r['median_ms'][t]:.4f}", f"{r['speedup'][t]:.2f}x"]
        rows.append(cells)
    ref = results["reference"]
    out = [
        f"{results['path']} on {results['runtime']}: inputs {shapes}; median of "
        f"{results['repeats']} runs after {results['warmup']} warm-up runs",
        f"Speedup is over level {ref['level']} from its {ref['source']}, stored "
        f"{ref['storage']}: "
        + ", ".join(
            f"{ms:.4f} ms ({t} {'thread' if t == '1' else 'threads'})"
            for t, ms in ref["median_ms"].items()
        ),
        "",
        markdown(headers, rows),
    ]
    if results["materialize"]:
        out += [
            "",
            f"Making each level from the bundle (median of "
            f"{results['materialize_repeats']}):",
            "",
            markdown(
                ["level", "materialize ms"],
                [[m["level"], f"{m['median_ms']:.3f}"] for m in results["materialize"]],
            ),
        ]
    return "\n".join(out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.path:
        raise app.UsageError("--path is required: an export directory or a bundle.")
    results = run(
        FLAGS.path,
        source=FLAGS.source,
        batch=FLAGS.batch,
        num_threads=parse_ints("num_threads", FLAGS.num_threads),
        warmup=FLAGS.warmup,
        repeats=FLAGS.repeats,
        materialize_repeats=FLAGS.materialize_repeats,
    )
    print(text(results))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"\nResults written to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
