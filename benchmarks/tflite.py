"""TFLite size and latency of every level, the bundle's storage, and its cost.

Three models are embedded with the same levels (default sparsities 0.9, 0.75,
0.5, 0.0; per-layer magnitude selection) and exported with
`elsa_tf.export_tflite`: the zoo's small digits CNN (`zoo.build("cnn")`, 8x8x1 inputs),
MobileNetV2 (`keras.applications`, 224x224x3, alpha 1.0, about 3.5M weights)
and a large MLP (1024-2048-2048-10, about 6.3M weights). Every figure below is
measured in one run, side by side:

1. per level, against the plain (never embedded) model converted with
   `tf.lite.TFLiteConverter` the same way (float32; "dynamic" also uses
   `tf.lite.Optimize.DEFAULT`): file bytes, gzip -9 bytes, and the median
   latency of one `invoke` with LiteRT at 1 and 2 threads, batch 1, with
   the runtime's default delegate (XNNPACK);
2. storage: the bundle (`bundle.tflite`: the densest level plus the level
   map) over the sum of the K per-level files (the K separately stored sparse
   models), over K dense-stored files, over the densest level's file (goal
   <= 1.10), and over the "physical limit" of the densest file plus the
   order-0 entropy of the level map (`manifest["bundle"]["map_entropy_bytes"]`),
   with the stored map over that entropy;
3. latency of block nesting: the MLP embedded again with `block_shape=(4, 1)`
   (1x4 blocks in TFLite's (out, in) kernel layout, which TFLite's sparse
   fully-connected kernel runs without DENSIFY), per level at 1 thread over
   the dense model, beside the elementwise (unstructured) levels, and beside
   the same block levels made from the bundle (`source="bundle"`), which are
   stored dense;
4. the time to make each level of the MobileNetV2 bundle with
   `elsa_tf.lite` (NumPy only): cold (`lite.materialize(path, level)`: read
   the file, decode the map, make the level, check its digest) and warm
   (`Bundle.materialize` on a bundle already read), median of a few runs,
   against the goal of 0.2 s.

It also reports how long `export_tflite` takes per model and where that time
goes (by wrapping the elsa_tf functions it calls; see `_phase_timer`), and
checks that each level made from the bundle computes what its per-level file
computes, and the dense baseline what the densest level computes.

No training: size and latency do not depend on how the weights were trained,
only on which are zero. Each level is made the way training would make it,
through the library's own level machinery: the free weights of the current
level (level map value == current level; at level 0 all of them, later the
weights the previous level pruned) get fresh random normal values, with the
standard deviation of that weight's initial values, then
`model_ops.finish_level` prunes the level to its exact target by magnitude,
freezes it and opens the next. So every level really adds weights and
magnitude selection picks among trained-looking values. The one figure this
shortcut affects is the compressed level map: elsa_tf stores the map in order
of weight magnitude, which is predictive of the level on such weights (each
level keeps the largest of its fresh draws) and on trained ones in a way this
benchmark does not measure; the map's order-0 entropy is not affected.

For "dynamic", `export_tflite` gives Dense layers per-tensor scales (so
that older runtimes run them) and stores a level dense when the converter
would expand its sparse int8 weights with DENSIFY; the plain baseline is
converted with the converter's defaults (per-channel scales), as a user
would convert it.

Latency: every file of a model (the dense baseline and every level; for the
MLP also the block levels) is loaded once per thread count and timed in
`--rounds` interleaved rounds, in a rotated order, so that all see the same
machine state; each round times every file the same number of single
`invoke`s, sized so that the whole comparison takes about
`--latency_budget_s` seconds. Medians are over all timed invokes. Files of
levels are loaded with `elsa_tf.lite.LevelRunner`; the dense baseline with
`elsa_tf.lite.runtime.interpreter`; both are timed by the same loop.

Commands used (from the repository root, 2 CPU cores, no GPU):

    python benchmarks/tflite.py --out=benchmarks/tflite_results.json

A quick smoke run:

    python benchmarks/tflite.py --models=cnn,mlp --mlp_units=64,128,10 \
        --latency_budget_s=0.5 --materialize_repeats=2
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import inspect
import io
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _output import write_json
from _timing import interleaved_invoke_ms
from absl import app, flags, logging  # noqa: E402

MODELS = ("cnn", "mobilenet_v2", "mlp")
LABELS = {
    "cnn": "digits CNN (8x8x1)",
    "mobilenet_v2": "MobileNetV2",
    "mlp": "MLP",
}
MATERIALIZE_GOAL_S = 0.2
BUNDLE_GOAL = 1.10

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to measure: {', '.join(MODELS)}.")
flags.DEFINE_list(
    "level_sparsities", ["0.9", "0.75", "0.5", "0.0"], "ELSA level sparsities."
)
flags.DEFINE_enum(
    "level_selection", "per_layer", ["per_layer", "global"], "embed()'s selection."
)
flags.DEFINE_list(
    "mlp_units", ["1024", "2048", "2048", "10"], "MLP input width, then layer widths."
)
flags.DEFINE_integer("mobilenet_size", 224, "MobileNetV2 input height and width.")
flags.DEFINE_list(
    "dynamic_models",
    ["cnn", "mlp"],
    'Models also exported with quantization="dynamic" (MobileNetV2 adds ~3 min).',
)
flags.DEFINE_list(
    "block_shape", ["4", "1"], "block_shape of the block-nested MLP; empty to skip."
)
flags.DEFINE_list("threads", ["1", "2"], "Interpreter thread counts to time.")
flags.DEFINE_float(
    "latency_budget_s",
    5.0,
    "Seconds of timed invokes per model, quantization and thread count.",
)
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.", lower_bound=1)
flags.DEFINE_integer(
    "materialize_repeats", 5, "Timed runs of each materialization.", lower_bound=1
)
flags.DEFINE_integer("random_seed", 0, "Seed for the weights and the input.")
flags.DEFINE_string(
    "export_dir", None, "Keep the exports here; by default a temporary directory."
)
flags.DEFINE_string("out", None, "Where to write the results as JSON.")


# -- models ----------------------------------------------------------------------------


def _build(name, *, seed, mlp_units, mobilenet_size):
    """The plain Keras model `name`, with seeded initial weights."""
    import keras

    keras.utils.set_random_seed(seed)
    if name == "cnn":
        from elsa_tf.experiments import zoo

        return zoo.build("cnn", (8, 8, 1), 10)
    if name == "mobilenet_v2":
        return keras.applications.MobileNetV2(
            weights=None, input_shape=(mobilenet_size, mobilenet_size, 3), alpha=1.0
        )
    if name == "mlp":
        inputs, *widths = mlp_units
        hidden = [keras.layers.Dense(u, activation="relu") for u in widths[:-1]]
        return keras.Sequential(
            [keras.Input((inputs,)), *hidden, keras.layers.Dense(widths[-1])],
            name="mlp",
        )
    raise ValueError(f"Unknown model {name!r}. Received: models must be in {MODELS}")


def _fill_levels(model, rng):
    """Makes every level: random free weights, then `finish_level` (see top)."""
    import keras

    from elsa_tf import model_ops

    owner = model_ops.owner(model)
    scales = {}
    for weight in owner.prunable_weights:
        std = float(np.std(keras.ops.convert_to_numpy(weight.value)))
        scales[id(weight)] = std if std > 0 else 0.05
    for level in range(len(model_ops.sparsities(model))):
        if model_ops.current_level(model) != level:
            raise RuntimeError(f"Expected level {level} to be the current level.")
        for weight, level_map in zip(owner.prunable_weights, owner.level_maps):
            free = level_map.numpy() == level
            value = keras.ops.convert_to_numpy(weight.value).copy()
            value[free] = rng.normal(0.0, scales[id(weight)], int(free.sum()))
            weight.assign(value)
        model_ops.finish_level(model)


def _convert_plain(model, quantization) -> bytes:
    """The plain model through TFLiteConverter, as a user would convert it."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantization == "dynamic":
        converter.optimizations = {tf.lite.Optimize.DEFAULT}
    elif quantization is not None:
        raise ValueError(f"Unsupported quantization {quantization!r}.")
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the signature.
        return bytes(converter.convert())


def _gzip_bytes(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=9, mtime=0))


# -- export, and where its time goes ---------------------------------------------------

# The functions export_tflite calls, wrapped where it looks them up. These are
# elsa_tf internals, some private, used only to attribute time; one that has
# moved or been renamed is skipped and its time shows under "other".
_EXPORT_PHASES = (
    ("elsa_tf.reporting", "summary", "summary"),
    ("elsa_tf.embedding", "extract", "extract"),
    ("elsa_tf.export", "_convert", "convert"),
    ("elsa_tf.export", "integer_densify_ops", "densify_scan"),
    ("elsa_tf.export", "paired_latency_ms", "storage_timing"),
    ("elsa_tf.export", "_check_runs", "check_runs"),
    ("elsa_tf.export", "_accuracy", "accuracy"),
    ("elsa_tf.export", "_signature", "signature"),
    ("elsa_tf.lite.bundle", "encode", "bundle_encode"),
    ("elsa_tf.export", "add_metadata", "add_metadata"),
)


@contextlib.contextmanager
def _phase_timer():
    """Yields a dict phase -> [seconds, calls] filled while export runs.

    `_convert` is split into dense and sparse-encoded conversions by its
    `sparse` argument.
    """
    phases = {}
    patched = []

    def wrap(fn, phase):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase
            if phase == "convert" and "sparse" in signature.parameters:
                sparse = signature.bind(*args, **kwargs).arguments["sparse"]
                name = "convert_sparse" if sparse else "convert_dense"
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = phases.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1

        return timed

    for module_name, attr, phase in _EXPORT_PHASES:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if callable(fn):
            patched.append((module, attr, fn))
            setattr(module, attr, wrap(fn, phase))
    try:
        yield phases
    finally:
        for module, attr, fn in patched:
            setattr(module, attr, fn)


def _export(model, out_dir, quantization):
    """`export_tflite` with its phases timed; returns (manifest, timing)."""
    import elsa_tf

    with _phase_timer() as phases, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        manifest = elsa_tf.export_tflite(
            model, out_dir, quantization=quantization, sparse_encoding=True
        )
        total = time.perf_counter() - start
    timing = {name: {"s": s, "calls": n} for name, (s, n) in phases.items()}
    timing["other"] = {"s": total - sum(s for s, _ in phases.values()), "calls": 0}
    return manifest, {"total_s": total, "phases": timing}


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- latency ---------------------------------------------------------------------------


def _interpreter(entry, x, threads):
    """A ready interpreter with `x` set, for an entry of a timing set."""
    from elsa_tf import lite

    if entry["kind"] == "content":
        interpreter = lite.runtime.interpreter(entry["content"], num_threads=threads)
        lite.runtime.feed(interpreter, x)
        return interpreter
    runner = lite.LevelRunner(entry["export_dir"], num_threads=threads)
    runner.load(entry["level"], source=entry["source"]).run(x)
    return runner.interpreter


def _time_set(entries, x, *, threads, budget_s, rounds):
    """Median invoke times (ms) of every entry, timed in interleaved rounds."""
    interpreters = {key: _interpreter(e, x, threads) for key, e in entries.items()}
    return interleaved_invoke_ms(interpreters, budget_s=budget_s, rounds=rounds)


# -- checks and materialization -------------------------------------------------------


def _max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return float(np.max(np.abs(a - b)))


def _checks(export_dir, num_levels, dense_content, x):
    """Max |output difference|: bundle-made vs per-level file, per level, and
    the dense baseline vs the densest level's file."""
    from elsa_tf import lite

    runner = lite.LevelRunner(export_dir, num_threads=1)
    file_out = [runner.load(k, source="file").run(x) for k in range(num_levels)]
    bundle_out = [runner.load(k, source="bundle").run(x) for k in range(num_levels)]
    dense_out = lite.runtime.predict(
        lite.runtime.interpreter(dense_content, num_threads=1), x
    )
    return {
        "bundle_vs_file": [_max_abs_diff(a, b) for a, b in zip(file_out, bundle_out)],
        "dense_vs_densest_file": _max_abs_diff(dense_out, file_out[-1]),
        "output_finite": bool(all(np.all(np.isfinite(o)) for o in file_out)),
    }


def _materialize_times(bundle_path, repeats):
    """Seconds to make each level of a bundle: cold, warm, warm unverified."""
    from elsa_tf import lite

    bundle = lite.read_bundle(bundle_path)
    rows = []
    for level in bundle.levels:
        cold, warm, unverified = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            lite.materialize(bundle_path, level)
            cold.append(time.perf_counter() - start)
        bundle.materialize(level)  # decodes and caches the map
        for _ in range(repeats):
            start = time.perf_counter()
            bundle.materialize(level)
            warm.append(time.perf_counter() - start)
            start = time.perf_counter()
            bundle.materialize(level, verify=False)
            unverified.append(time.perf_counter() - start)
        rows.append(
            {
                "level": level,
                "cold_s": float(np.median(cold)),
                "cold_max_s": float(np.max(cold)),
                "warm_s": float(np.median(warm)),
                "warm_unverified_s": float(np.median(unverified)),
            }
        )
    start = time.perf_counter()
    lite.read_bundle(bundle_path).codes()
    decode = time.perf_counter() - start
    return {
        "bundle_bytes": os.path.getsize(bundle_path),
        "read_and_decode_map_s": decode,
        "levels": rows,
    }


# -- one model -------------------------------------------------------------------------


def _variant(manifest, export_dir, timing, dense_content):
    """Sizes and storage ratios of one export against its dense baseline."""
    rows = []
    for row in manifest["levels"]:
        data = _read(os.path.join(export_dir, row["file"]))
        rows.append(
            {
                "level": row["level"],
                "target_sparsity": row["target_sparsity"],
                "achieved_sparsity": row["achieved_sparsity"],
                "bytes": row["bytes"],
                "gzip_bytes": _gzip_bytes(data),
                "sparse_encoding": row["sparse_encoding"],
            }
        )
    b = manifest["bundle"]
    k = len(rows)
    level_sum = sum(r["bytes"] for r in rows)
    densest = rows[-1]["bytes"]
    dense = len(dense_content)
    limit = densest + b["map_entropy_bytes"]
    bundle_data = _read(os.path.join(export_dir, b["file"]))
    storage = {
        "num_levels": k,
        "bundle_bytes": b["bytes"],
        "bundle_gzip_bytes": _gzip_bytes(bundle_data),
        "level_files_bytes": level_sum,
        "level_files_gzip_bytes": sum(r["gzip_bytes"] for r in rows),
        "k_dense_files_bytes": k * dense,
        "densest_file_bytes": densest,
        "map_bytes": b["map_bytes"],
        "map_entropy_bytes": b["map_entropy_bytes"],
        "exact": b.get("exact"),
        "bundle_over_level_files": b["bytes"] / level_sum,
        "bundle_over_k_dense_files": b["bytes"] / (k * dense),
        "bundle_over_densest_file": b["bytes"] / densest,
        "bundle_over_limit": b["bytes"] / limit,
        "map_over_entropy": b["map_bytes"] / b["map_entropy_bytes"],
    }
    return {
        "export_dir": export_dir,
        "levels": rows,
        "dense": {"bytes": dense, "gzip_bytes": _gzip_bytes(dense_content)},
        "storage": storage,
        "export_timing": timing,
    }


def run_model(
    name,
    *,
    sparsities,
    selection,
    mlp_units,
    mobilenet_size,
    dynamic,
    block_shape,
    threads,
    latency_budget_s,
    rounds,
    seed,
    workdir,
) -> dict:
    """Embeds, exports and measures one model; see the module docstring."""
    import elsa_tf

    build = functools.partial(
        _build, name, seed=seed, mlp_units=mlp_units, mobilenet_size=mobilenet_size
    )
    rng = np.random.default_rng(seed)
    base = build()
    x = rng.normal(size=(1, *base.input_shape[1:])).astype(np.float32)
    result = {
        "label": LABELS[name],
        "params": int(base.count_params()),
        "input_shape": list(base.input_shape[1:]),
        "variants": {},
        "setup_s": {},
    }

    embeddings = {"float32": dict(block_shape=None)}
    if block_shape is not None and name == "mlp":
        embeddings[f"float32_block{block_shape[0]}x{block_shape[1]}"] = dict(
            block_shape=block_shape
        )
    plain, dense_contents = None, {}
    quantizations = {"float32": None, **({"dynamic": "dynamic"} if dynamic else {})}
    for key, options in embeddings.items():
        start = time.perf_counter()
        model = elsa_tf.embed(
            base, sparsities=list(sparsities), selection=selection, **options
        )
        _fill_levels(model, rng)
        result["setup_s"][f"embed_and_fill_{key}"] = time.perf_counter() - start
        if plain is None:
            # The plain model holds the densest level's (all nonzero) weights.
            plain = build()
            plain.set_weights(elsa_tf.extract(model, len(sparsities) - 1).get_weights())
        variant_quantizations = quantizations if options["block_shape"] is None else {}
        for q_name, quantization in {"float32": None, **variant_quantizations}.items():
            if q_name not in dense_contents:
                start = time.perf_counter()
                dense_contents[q_name] = _convert_plain(plain, quantization)
                result["setup_s"][f"convert_plain_{q_name}"] = (
                    time.perf_counter() - start
                )
            variant_key = key if q_name == "float32" else q_name
            out_dir = os.path.join(workdir, name, variant_key)
            manifest, timing = _export(model, out_dir, quantization)
            variant = _variant(manifest, out_dir, timing, dense_contents[q_name])
            variant["quantization"] = q_name
            variant["block_shape"] = options["block_shape"]
            variant["checks"] = _checks(
                out_dir, len(sparsities), dense_contents[q_name], x
            )
            if options["block_shape"] is not None:
                # The plain model holds the elementwise embedding's weights.
                variant["checks"]["dense_vs_densest_file"] = None
            result["variants"][variant_key] = variant

    # One interleaved timing set per quantization: its dense baseline and the
    # levels of every variant with that quantization (files; block levels
    # also made from the bundle, which stores them dense).
    for q_name, content in dense_contents.items():
        entries = {"dense": {"kind": "content", "content": content}}
        for variant_key, variant in result["variants"].items():
            if variant["quantization"] != q_name:
                continue
            sources = ("file", "bundle") if variant["block_shape"] else ("file",)
            for source in sources:
                for row in variant["levels"]:
                    entries[f"{variant_key}/{source}/{row['level']}"] = {
                        "kind": "level",
                        "export_dir": variant["export_dir"],
                        "level": row["level"],
                        "source": source,
                    }
        for n in threads:
            stats = _time_set(
                entries, x, threads=n, budget_s=latency_budget_s, rounds=rounds
            )
            for variant_key, variant in result["variants"].items():
                if variant["quantization"] != q_name:
                    continue
                latency = variant.setdefault("latency", {})[str(n)] = {
                    "dense": stats["dense"]
                }
                for key, value in stats.items():
                    if key.startswith(variant_key + "/"):
                        _, source, level = key.split("/")
                        latency.setdefault(source, {})[level] = value
    return result


def run(
    models=MODELS,
    *,
    sparsities=(0.9, 0.75, 0.5, 0.0),
    selection: str = "per_layer",
    mlp_units=(1024, 2048, 2048, 10),
    mobilenet_size: int = 224,
    dynamic_models=("cnn", "mlp"),
    block_shape=(4, 1),
    threads=(1, 2),
    latency_budget_s: float = 5.0,
    rounds: int = 5,
    materialize_repeats: int = 5,
    seed: int = 0,
    export_dir: str | None = None,
) -> dict:
    """Exports every model's levels and measures sizes, latency and the bundle.

    Args:
        models: which of `MODELS` to measure.
        sparsities: the ELSA levels, sparsest first.
        selection: `embed`'s selection, `"per_layer"` or `"global"`.
        mlp_units: the MLP's input width, then its layer widths.
        mobilenet_size: MobileNetV2's input height and width.
        dynamic_models: models also exported with `quantization="dynamic"`.
        block_shape: the block-nested MLP's `block_shape`; None skips it.
        threads: interpreter thread counts to time.
        latency_budget_s: seconds of timed invokes per timing set and thread
            count.
        rounds: interleaved timing rounds.
        materialize_repeats: timed runs of each bundle materialization.
        seed: seed for the initial and level weights and the input.
        export_dir: where to keep the exports; None uses a temporary
            directory, removed at the end.

    Returns:
        A JSON-serializable dict: the configuration, the environment, and per
        model its variants (float32, dynamic, block) with sizes, storage,
        export timing, checks and latency, plus the bundle materialization
        times of MobileNetV2 (or the last model measured).
    """
    import keras
    import tensorflow as tf

    from elsa_tf import lite

    config = {
        "models": list(models),
        "sparsities": [float(s) for s in sparsities],
        "selection": selection,
        "mlp_units": [int(u) for u in mlp_units],
        "mobilenet_size": mobilenet_size,
        "dynamic_models": list(dynamic_models),
        "block_shape": list(block_shape) if block_shape else None,
        "threads": [int(n) for n in threads],
        "latency_budget_s": latency_budget_s,
        "rounds": rounds,
        "materialize_repeats": materialize_repeats,
        "seed": seed,
        "batch_size": 1,
    }
    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # Not installed: another runtime is used.
        litert = None
    environment = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": litert,
        "runtime": lite.runtime.name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    workdir = export_dir or tempfile.mkdtemp(prefix="elsa_tflite_bench_")
    start = time.perf_counter()
    try:
        results = {}
        for name in models:
            results[name] = run_model(
                name,
                sparsities=config["sparsities"],
                selection=selection,
                mlp_units=config["mlp_units"],
                mobilenet_size=mobilenet_size,
                dynamic=name in dynamic_models,
                block_shape=tuple(block_shape) if block_shape else None,
                threads=config["threads"],
                latency_budget_s=latency_budget_s,
                rounds=rounds,
                seed=seed,
                workdir=workdir,
            )
        source = "mobilenet_v2" if "mobilenet_v2" in results else list(results)[-1]
        variant = results[source]["variants"]["float32"]
        materialize = _materialize_times(
            os.path.join(variant["export_dir"], "bundle.tflite"), materialize_repeats
        )
        materialize["model"] = source
    finally:
        if export_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": config,
        "environment": environment,
        "models": results,
        "materialize": materialize,
        "wall_s": time.perf_counter() - start,
    }


# -- tables ----------------------------------------------------------------------------


def _r(value, fmt=".3f"):
    return "n/a" if value is None or value != value else format(value, fmt)


def _ms(value):
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _size_latency_table(results, quantization, threads):
    head = (
        "| model | level | sparsity | bytes | × dense | gzip -9 bytes | × dense"
        + "".join(f" | {n}-thread ms | × dense" for n in threads)
        + " |"
    )
    lines = [head, "|" + "---|" * (7 + 2 * len(threads))]
    for res in results.values():
        variant = res["variants"].get(quantization)
        if variant is None:
            continue
        dense = variant["dense"]
        lat = variant["latency"]
        label = f"{res['label']}, {res['params'] / 1e6:.2f}M params"
        cells = "".join(
            f" | {_ms(lat[str(n)]['dense']['median_ms'])} | 1" for n in threads
        )
        lines.append(
            f"| {label} | plain dense | 0 | {dense['bytes']:,} | 1 | "
            f"{dense['gzip_bytes']:,} | 1{cells} |"
        )
        for row in variant["levels"]:
            k = str(row["level"])
            cells = ""
            for n in threads:
                t = lat[str(n)]
                ms = t["file"][k]["median_ms"]
                cells += f" | {_ms(ms)} | {ms / t['dense']['median_ms']:.3f}"
            encoded = "" if row["sparse_encoding"] else " (stored dense)"
            lines.append(
                f"| | {k}{encoded} | {row['achieved_sparsity']:.3f} | "
                f"{row['bytes']:,} | {row['bytes'] / dense['bytes']:.3f} | "
                f"{row['gzip_bytes']:,} | "
                f"{row['gzip_bytes'] / dense['gzip_bytes']:.3f}{cells} |"
            )
    return lines


def format_tables(results) -> str:
    """The results as markdown tables."""
    cfg, env, models = results["config"], results["environment"], results["models"]
    threads = cfg["threads"]
    lines = [
        f"{env['runtime']} {env['ai_edge_litert'] or ''}, TensorFlow "
        f"{env['tensorflow']}, Keras {env['keras']}, {env['cpu_count']} CPUs. "
        f"Levels {cfg['sparsities']} ({cfg['selection']} selection), batch 1, "
        f"{cfg['rounds']} interleaved rounds of ~{cfg['latency_budget_s']} s per "
        "timing set; median invoke latency. Ratios are over the plain model "
        "converted the same way.",
        "",
        "### 1. Per-level files vs the plain dense model, float32",
        "",
        *_size_latency_table(models, "float32", threads),
    ]
    if any("dynamic" in m["variants"] for m in models.values()):
        lines += [
            "",
            '### 1b. The same, quantization="dynamic" (int8 weights); the '
            "baseline is the plain model with `Optimize.DEFAULT` (per-channel "
            "scales; the levels' Dense layers have per-tensor scales)",
            "",
            *_size_latency_table(models, "dynamic", threads),
        ]
    lines += [
        "",
        "### 2. Storage: the bundle (densest level + level map) against the "
        "alternatives",
        "",
        "limit = densest-level file + order-0 entropy of the level map.",
        "",
        "| model | K | bundle bytes | sum of K level files | K dense files "
        "| densest file | map bytes | map entropy bytes | bundle / sum of level "
        "files | bundle / K dense files | **bundle / densest file** (goal ≤ "
        f"{BUNDLE_GOAL:.2f}) | bundle / limit | map / entropy | gzip: bundle / "
        "sum of level files |",
        "|" + "---|" * 14,
    ]
    for res in models.values():
        for key, variant in res["variants"].items():
            s = variant["storage"]
            ok = "✓" if s["bundle_over_densest_file"] <= BUNDLE_GOAL else "✗"
            lines.append(
                f"| {res['label']}, {key} | {s['num_levels']} | "
                f"{s['bundle_bytes']:,} | {s['level_files_bytes']:,} | "
                f"{s['k_dense_files_bytes']:,} | {s['densest_file_bytes']:,} | "
                f"{s['map_bytes']:,} | {s['map_entropy_bytes']:,.0f} | "
                f"{s['bundle_over_level_files']:.3f} | "
                f"{s['bundle_over_k_dense_files']:.3f} | "
                f"**{s['bundle_over_densest_file']:.3f}** {ok} | "
                f"{s['bundle_over_limit']:.3f} | {s['map_over_entropy']:.3f} | "
                f"{s['bundle_gzip_bytes'] / s['level_files_gzip_bytes']:.3f} |"
            )
    block = [
        (res, v)
        for res in models.values()
        for v in res["variants"].values()
        if v["block_shape"]
    ]
    for res, variant in block:
        plain = res["variants"]["float32"]
        bs = variant["block_shape"]
        lines += [
            "",
            f"### 3. Block nesting: {res['label']} with block_shape={tuple(bs)} "
            "vs elementwise, float32",
            "",
            "Latency over the plain dense model (speedup = dense / level). "
            "'From bundle' is the block level made by `Bundle.materialize`, "
            "which stores it dense.",
            "",
        ]
        head = (
            "| level | sparsity (elementwise / block) "
            "| bytes × dense: elementwise | block"
        )
        for n in threads:
            head += (
                f" | {n}-thread: elementwise × dense | block × dense | "
                "**block speedup** | block from bundle × dense"
            )
        lines += [head + " |", "|" + "---|" * (4 + 4 * len(threads))]
        dense_bytes = variant["dense"]["bytes"]
        for row, prow in zip(variant["levels"], plain["levels"]):
            k = str(row["level"])
            cells = ""
            for n in threads:
                t, pt = variant["latency"][str(n)], plain["latency"][str(n)]
                d = t["dense"]["median_ms"]
                b = t["file"][k]["median_ms"]
                cells += (
                    f" | {pt['file'][k]['median_ms'] / d:.3f} | {b / d:.3f} | "
                    f"**{d / b:.2f}×** | {t['bundle'][k]['median_ms'] / d:.3f}"
                )
            lines.append(
                f"| {k} | {prow['achieved_sparsity']:.3f} / "
                f"{row['achieved_sparsity']:.3f} | "
                f"{prow['bytes'] / dense_bytes:.3f} | "
                f"{row['bytes'] / dense_bytes:.3f}{cells} |"
            )
        d1 = variant["latency"][str(threads[0])]["dense"]["median_ms"]
        lines.append("")
        lines.append(
            f"Dense {threads[0]}-thread median: {d1:.3f} ms "
            f"({variant['dense']['bytes']:,} bytes)."
        )

    m = results["materialize"]
    lines += [
        "",
        f"### 4. Making a level from the {LABELS[m['model']]} bundle "
        f"({m['bundle_bytes']:,} bytes), NumPy only, median of "
        f"{cfg['materialize_repeats']}",
        "",
        "cold = `lite.materialize(path, level)` (read the file, decode the map, "
        "make the level, check its digest); warm = `Bundle.materialize` on a "
        "bundle already read.",
        "",
        f"| level | **cold s** (goal < {MATERIALIZE_GOAL_S}) | cold max s | warm s "
        "| warm, verify=False s |",
        "|---|---|---|---|---|",
    ]
    for row in m["levels"]:
        ok = "✓" if row["cold_s"] < MATERIALIZE_GOAL_S else "✗"
        lines.append(
            f"| {row['level']} | **{row['cold_s']:.3f}** {ok} | "
            f"{row['cold_max_s']:.3f} | {row['warm_s']:.3f} | "
            f"{row['warm_unverified_s']:.3f} |"
        )
    lines += [
        "",
        f"Reading the bundle and decoding its map alone: "
        f"{m['read_and_decode_map_s']:.3f} s.",
        "",
        "### export_tflite: wall time and where it goes (s, calls)",
        "",
    ]
    phase_names = []
    for res in models.values():
        for variant in res["variants"].values():
            for phase in variant["export_timing"]["phases"]:
                if phase not in phase_names and phase != "other":
                    phase_names.append(phase)
    phase_names.append("other")
    lines += [
        "| model, variant | total s | " + " | ".join(phase_names) + " |",
        "|" + "---|" * (2 + len(phase_names)),
    ]
    for res in models.values():
        for key, variant in res["variants"].items():
            timing = variant["export_timing"]
            cells = []
            for phase in phase_names:
                p = timing["phases"].get(phase)
                if p is None:
                    cells.append("")
                elif phase == "other":
                    cells.append(f"{p['s']:.1f}")
                else:
                    cells.append(f"{p['s']:.1f} ({p['calls']})")
            lines.append(
                f"| {res['label']}, {key} | {timing['total_s']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    lines += ["", "Checks (max |output difference|, batch of one random input):", ""]
    for res in models.values():
        for key, variant in res["variants"].items():
            c = variant["checks"]
            per_level = ", ".join(_r(v, ".2e") for v in c["bundle_vs_file"])
            dense = c["dense_vs_densest_file"]
            dense = "n/a (other weights)" if dense is None else _r(dense, ".2e")
            lines.append(
                f"- {res['label']}, {key}: level made from the bundle vs its "
                f"per-level file {per_level}; plain dense vs densest-level file "
                f"{dense}; outputs finite: {c['output_finite']}."
            )
    lines.append("")
    lines.append(f"Total benchmark time after imports: {results['wall_s']:.0f} s.")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        # TensorFlow logs every SavedModel the converter writes at INFO.
        logging.set_verbosity(logging.WARNING)
    block = [int(b) for b in FLAGS.block_shape] if FLAGS.block_shape else None
    results = run(
        FLAGS.models,
        sparsities=[float(s) for s in FLAGS.level_sparsities],
        selection=FLAGS.level_selection,
        mlp_units=[int(u) for u in FLAGS.mlp_units],
        mobilenet_size=FLAGS.mobilenet_size,
        dynamic_models=FLAGS.dynamic_models,
        block_shape=block,
        threads=[int(n) for n in FLAGS.threads],
        latency_budget_s=FLAGS.latency_budget_s,
        rounds=FLAGS.rounds,
        materialize_repeats=FLAGS.materialize_repeats,
        seed=FLAGS.random_seed,
        export_dir=FLAGS.export_dir,
    )
    print(format_tables(results))
    if FLAGS.out:
        write_json(FLAGS.out, results)


if __name__ == "__main__":
    app.run(main)
