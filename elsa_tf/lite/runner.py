"""Run, time and choose levels on the device, from an export or a bundle.

An *export* is the directory `elsa_tf.export_tflite` writes: one `.tflite` per
level, the bundle and `manifest.json`. `LevelRunner` loads a level from its
per-level file or makes it from the bundle, checking the manifest's SHA-256 of
every file it reads; it runs batches and measures latency on the device.
`select_by_accuracy` and `select_by_latency` pick a level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from elsa_tf.lite import bundle as bundle_lib
from elsa_tf.lite import channel_bundle, runtime

MANIFEST = "manifest.json"
SOURCES = ("auto", "file", "bundle")


class ManifestError(ValueError):
    """An export directory whose manifest or files cannot be trusted."""


def read_manifest(export_dir) -> dict:
    """Reads and checks `manifest.json` of an export directory."""
    path = os.path.join(os.fspath(export_dir), MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise ManifestError(
            f"{export_dir!s} is not an elsa_tf export: it has no {MANIFEST}."
        ) from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != "elsa_tf.export" or "levels" not in manifest:
        raise ManifestError(f"{path} is not an elsa_tf export manifest.")
    return manifest


def verify_export(export_dir, manifest: Mapping) -> None:
    """Checks that every file the manifest lists is there, with its SHA-256.

    Raises:
        ManifestError: naming the first file that is missing or whose hash
            differs from the manifest's.
    """
    entries = [row for row in manifest["levels"] if row.get("file")]
    if manifest.get("bundle"):
        entries.append(manifest["bundle"])
    for entry in entries:
        path = os.path.join(os.fspath(export_dir), entry["file"])
        try:
            digest = bundle_lib.sha256_file(path)
        except FileNotFoundError:
            raise ManifestError(
                f"{path} is missing: the manifest lists {entry['file']}."
            ) from None
        if digest != entry["sha256"]:
            raise ManifestError(
                f"SHA-256 of {path} is {digest}, but the manifest records "
                f"{entry['sha256']}: the file is not the one exported."
            )


def read_verified(path, sha256: str | None) -> bytes:
    """The bytes of a file, checked against the manifest's SHA-256."""
    with open(path, "rb") as f:
        data = f.read()
    bundle_lib.check_sha256(data, sha256, os.fspath(path), ManifestError)
    return data


def select_by_accuracy(manifest: Mapping, min_accuracy: float) -> int:
    """The sparsest level whose measured accuracy is at least `min_accuracy`.

    Raises:
        ValueError: if the manifest has no accuracies (export without
            evaluation data) or no level reaches the floor.
    """
    rows = manifest["levels"]
    if any(row.get("accuracy") is None for row in rows):
        raise ValueError(
            "The manifest records no accuracy per level: export with "
            "evaluation_data=(x, y) to select levels by accuracy."
        )
    good = [row for row in rows if row["accuracy"] >= min_accuracy]
    if not good:
        best = max(row["accuracy"] for row in rows)
        raise ValueError(
            f"No level reaches accuracy {min_accuracy}; the best is {best:.4f}. "
            f"Received: min_accuracy={min_accuracy}"
        )
    return max(good, key=lambda row: row["achieved_sparsity"])["level"]


def select_by_latency(
    latencies_ms: Mapping[int, float],
    budget_ms: float,
    accuracies: Mapping[int, float] | None = None,
) -> int:
    """The most accurate level whose latency is within `budget_ms`.

    Without accuracies, the densest level in budget (the highest index) is
    taken as the most accurate.

    Raises:
        ValueError: if no level meets the budget.
    """
    fits = [level for level, ms in latencies_ms.items() if ms <= budget_ms]
    if not fits:
        fastest = min(latencies_ms.values())
        raise ValueError(
            f"No level runs within {budget_ms} ms; the fastest takes "
            f"{fastest:.3f} ms. Received: budget_ms={budget_ms}"
        )
    if accuracies:
        return max(fits, key=lambda level: (accuracies[level], level))
    return max(fits)


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall-clock latency of one `invoke`, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = np.asarray(seconds) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p10_ms=float(np.percentile(ms, 10)),
            p90_ms=float(np.percentile(ms, 90)),
            runs=len(ms),
        )


class LevelRunner:
    """Loads and runs levels of an export directory or of a bundle file.

    Args:
        path: an export directory (with `manifest.json`), or a bundle
            `.tflite` file.
        num_threads: interpreter threads; None is the runtime's default.
        verify: check every file's SHA-256 against the manifest when the
            runner is created and again when a level is read, and each
            level made from the bundle against its digest.

    Raises:
        ManifestError: for an export directory without a valid manifest, or,
            with `verify`, a file that is missing or does not match it.

    Example (on the device, with only numpy and a TFLite runtime):

        runner = LevelRunner("export/")
        level = runner.select_by_accuracy(0.95)
        logits = runner.load(level).run(images)
    """

    def __init__(self, path, *, num_threads: int | None = None, verify: bool = True):
        self.path = os.fspath(path)
        self.num_threads = num_threads
        self.verify = verify
        if os.path.isdir(self.path):
            self.manifest = read_manifest(self.path)
            if verify:
                verify_export(self.path, self.manifest)
        else:
            self.manifest = None
        self._bundle = None
        self.level = None
        self.interpreter = None

    @property
    def runtime(self) -> str:
        """Which TFLite runtime runs the levels."""
        return runtime.name()

    @property
    def levels(self) -> list[int]:
        if self.manifest is not None:
            return [row["level"] for row in self.manifest["levels"]]
        return self.bundle().levels

    def _row(self, level: int) -> Mapping:
        for row in self.manifest["levels"]:
            if row["level"] == level:
                return row
        raise ValueError(
            f"The export holds levels {self.levels}. Received: level={level}"
        )

    def bundle(self) -> bundle_lib.Bundle | channel_bundle.ChannelBundle:
        """The bundle (read once, hash-checked against the manifest): a
        weight bundle, or a channel bundle for channel levels."""
        if self._bundle is None:
            # channel_bundle.read_bundle reads either kind.
            if self.manifest is None:
                self._bundle = channel_bundle.read_bundle(self.path)
            else:
                entry = self.manifest.get("bundle")
                if not entry:
                    raise ManifestError(f"The export at {self.path} has no bundle.")
                self._bundle = channel_bundle.read_bundle(
                    os.path.join(self.path, entry["file"]),
                    expected_sha256=entry["sha256"] if self.verify else None,
                )
        return self._bundle

    def model_bytes(self, level: int, *, source: str = "auto") -> bytes:
        """The flatbuffer of `level`, from its own file or from the bundle."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}. Received: {source!r}")
        if self.manifest is not None and source in ("auto", "file"):
            row = self._row(level)
            if row.get("file"):
                return read_verified(
                    os.path.join(self.path, row["file"]),
                    row["sha256"] if self.verify else None,
                )
            if source == "file":
                raise ManifestError(f"Level {level} has no per-level file.")
        if source == "file":
            raise ValueError(
                "A bundle path has no per-level files: use source='bundle'."
            )
        return self.bundle().materialize(level, verify=self.verify)

    def load(self, level: int, *, source: str = "auto") -> LevelRunner:
        """Switches to `level`; returns the runner, so calls chain."""
        content = self.model_bytes(level, source=source)
        self.interpreter = runtime.interpreter(content, num_threads=self.num_threads)
        self.level = level
        return self

    def _interpreter(self):
        if self.interpreter is None:
            raise ValueError("Load a level first: runner.load(level).")
        return self.interpreter

    def run(self, inputs):
        """Runs one batch; returns the output array.

        Args:
            inputs: an array for a single-input model; for several inputs, a
                dict keyed by the input names the manifest's `"inputs"` lists
                (a list is taken in the interpreter's input order).

        Returns:
            The output array; for several outputs, a dict keyed by the
            manifest's output names.

        Raises:
            ValueError: for missing or extra inputs, or an input whose shape
                differs from the model's (the batch dimension may vary).
        """
        return runtime.predict(self._interpreter(), inputs)

    def latency(self, inputs, *, warmup: int = 3, repeats: int = 20) -> Latency:
        """Measures `invoke` on `inputs` after `warmup` untimed runs."""
        runtime.feed(self._interpreter(), inputs)
        for _ in range(warmup):
            self.interpreter.invoke()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.interpreter.invoke()
            seconds.append(time.perf_counter() - start)
        return Latency.of(seconds)

    def select_by_accuracy(self, min_accuracy: float) -> int:
        """The sparsest level of the manifest at or above `min_accuracy`."""
        if self.manifest is None:
            raise ValueError("Selecting by accuracy needs an export's manifest.")
        return select_by_accuracy(self.manifest, min_accuracy)

    def select_by_latency(self, budget_ms: float, inputs, **timing) -> int:
        """The most accurate level that runs `inputs` within `budget_ms` here.

        Every level is loaded and timed on this device (`latency`).
        """
        latencies = {
            level: self.load(level).latency(inputs, **timing).median_ms
            for level in self.levels
        }
        accuracies = None
        if self.manifest is not None and all(
            row.get("accuracy") is not None for row in self.manifest["levels"]
        ):
            accuracies = {r["level"]: r["accuracy"] for r in self.manifest["levels"]}
        return select_by_latency(latencies, budget_ms, accuracies)
