"""The run's report: report.json, report.md and report.png in the workdir.

`render_markdown` is pure formatting, `plot` is the matplotlib plumbing and
`write` puts both, with the JSON, in the work directory. The report dict has
this shape (report.json is exactly this dict):

    {"config": {...flags...}, "dataset": str, "model": str,
     "runtime": str | None,
     "methods": {"elsa": str, <baseline name>: str, ...},
     "levels": [{"level", "target_sparsity", "achieved_sparsity", "accuracy",
                 "tflite_accuracy", "tflite_bytes", "latency_ms",
                 "baselines": {<baseline name>: {"achieved_sparsity",
                     "accuracy", "tflite_bytes", "train_seconds"}}}],
     "training_seconds": {"elsa": float, "baselines": {<name>: float}},
     "examples_per_epoch": [int] | None,     # under data sieving
     "flops_saved_per_epoch": [float] | None,  # under layer freezing
     "storage_bytes": {"elsa_bundle": int | None, "elsa_levels": int | None,
                       "baselines": {<name>: int}}}

`methods` says how each side pruned (e.g. ELSA's global ranking against
tfmot's per-layer one); the report names them wherever they are compared.

Sparsities and accuracies are fractions in [0, 1]; any value but a level's
index, target sparsity, achieved sparsity and accuracy may be None (not
measured), and renders as "—".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

MISSING = "—"

_REQUIRED = ("dataset", "model", "levels")
_REQUIRED_PER_LEVEL = ("level", "target_sparsity", "achieved_sparsity", "accuracy")


def write(workdir: str, report: Mapping[str, Any]) -> dict[str, str]:
    """Writes report.json, report.md and report.png into `workdir`.

    Each file is written to a temporary file in `workdir` first and then
    renamed, so a reader (or a run killed halfway) never sees a partial file.

    Args:
        workdir: the run's work directory; created if missing.
        report: the report dict (see the module docstring).

    Returns:
        The paths written, keyed `"json"`, `"md"` and `"png"`.

    Raises:
        ValueError: if the report lacks a required key.
        TypeError: if the report is not JSON-serializable.

    Example:

        paths = write("/tmp/run", report)
        print(open(paths["md"]).read())
    """
    validate(report)
    # Render both texts before touching the disk: a report that cannot be
    # serialized writes nothing.
    text_json = json.dumps(report, indent=2) + "\n"
    text_md = render_markdown(report)
    os.makedirs(workdir, exist_ok=True)
    paths = {
        "json": os.path.join(workdir, "report.json"),
        "md": os.path.join(workdir, "report.md"),
        "png": os.path.join(workdir, "report.png"),
    }
    _atomic_write(paths["json"], lambda tmp: _write_text(tmp, text_json))
    _atomic_write(paths["md"], lambda tmp: _write_text(tmp, text_md))
    _atomic_write(paths["png"], lambda tmp: plot(report, tmp))
    return paths


def validate(report: Mapping[str, Any]) -> None:
    """Checks that `report` has the keys the report files need.

    Args:
        report: the report dict (see the module docstring).

    Raises:
        TypeError: if `report` or one of its levels is not a dict.
        ValueError: naming the first missing key, or if `levels` is empty.
    """
    if not isinstance(report, Mapping):
        raise TypeError(
            f"report must be a dict. Received: report of type {type(report).__name__}"
        )
    for key in _REQUIRED:
        if key not in report:
            raise ValueError(
                f"report is missing {key!r}. Received keys: {list(report)}"
            )
    levels = report["levels"]
    if not isinstance(levels, list | tuple) or not levels:
        raise ValueError(
            f"report['levels'] must be a non-empty list. Received: levels={levels!r}"
        )
    for i, level in enumerate(levels):
        if not isinstance(level, Mapping):
            raise TypeError(
                f"report['levels'][{i}] must be a dict. Received: {level!r}"
            )
        for key in _REQUIRED_PER_LEVEL:
            if key not in level:
                raise ValueError(
                    f"report['levels'][{i}] is missing {key!r}. "
                    f"Received keys: {list(level)}"
                )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: config, a table per level, then the totals.

    Args:
        report: the report dict (see the module docstring).

    Returns:
        The Markdown text, ending in a newline.

    Raises:
        ValueError: if the report lacks a required key.
    """
    validate(report)
    levels = report["levels"]
    names = _baseline_names(report)
    methods = report.get("methods") or {}
    lines = [f"# ELSA report: {report['dataset']} / {report['model']}", ""]
    config = report.get("config") or {}
    if config:
        items = " ".join(f"{k}={_config_value(v)}" for k, v in config.items())
        lines += [f"**Config:** `{items}`", ""]
    if report.get("runtime"):
        lines += [f"**Runtime:** {report['runtime']}", ""]
    if methods:
        lines += ["**Methods:**", ""]
        lines += [f"- {_side(name)}: {methods[name]}" for name in methods]
        lines.append("")

    lines += ["## Levels", ""]
    # At channel granularity a level's target is a share of channels: the
    # table gives the channels removed and, apart, the weights removed.
    channels = any(lv.get("achieved_channel_sparsity") is not None for lv in levels)
    header = [
        "Level",
        "Target sparsity (channels)" if channels else "Target sparsity",
        *(["Channels removed", "Weights removed"] if channels else []),
        *([] if channels else ["Achieved sparsity"]),
        "Accuracy (Keras)",
        "Accuracy (TFLite)",
        "TFLite size",
        "Latency (ms)",
    ]
    for name in names:
        header += [
            f"{name} accuracy",
            f"ELSA − {name} (points)",
            f"{name} TFLite size",
        ]
    rows = []
    for level in levels:
        row = [
            str(level["level"]),
            _percent(level["target_sparsity"]),
            *([_percent(level.get("achieved_channel_sparsity"))] if channels else []),
            _percent(level["achieved_sparsity"]),
            _percent(level["accuracy"]),
            _percent(level.get("tflite_accuracy")),
            _size(level.get("tflite_bytes")),
            _milliseconds(level.get("latency_ms")),
        ]
        for name in names:
            baseline = (level.get("baselines") or {}).get(name) or {}
            row += [
                _percent(baseline.get("accuracy")),
                _points(level["accuracy"], baseline.get("accuracy")),
                _size(baseline.get("tflite_bytes")),
            ]
        rows.append(row)
    lines += _table(header, rows, align=["right"] * len(header))
    lines.append("")
    if names:
        lines += [
            "ELSA − baseline: ELSA's accuracy minus the baseline's, in "
            "percentage points (positive: ELSA is better). A baseline trains "
            "one separate model per level; see the methods above for how each "
            "side ranks the weights it prunes.",
            "",
        ]

    lines += ["## Totals", ""]
    lines += _table(*_totals(report, names))
    lines.append("")

    lines += ["## Accuracy against sparsity", "", "![accuracy](report.png)", ""]
    gap = _tflite_gap(levels)
    note = "The plot shows the Keras accuracy"
    if gap:
        note += (
            f"; the TFLite accuracy differs from it by up to {gap * 100:.2f} points "
            "(see the table)"
        )
    lines += [note + ".", ""]
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
    """Plots test accuracy against achieved sparsity into a PNG file.

    The ELSA levels form one line, each point labelled with its level index;
    each baseline another, each named by its method. The y axis spans at
    least `_MIN_ACCURACY_SPAN` points, so that a spread of a point or two
    looks as small as it is. Only the Keras accuracy is plotted (the TFLite
    one is in the table).

    Args:
        report: the report dict (see the module docstring).
        path: the PNG file to write.

    Raises:
        ValueError: if the report lacks a required key.
    """
    _figure(report).savefig(path, format="png")


def _figure(report: Mapping[str, Any]):
    """The plot as a `matplotlib.figure.Figure` (see `plot`)."""
    validate(report)
    # A bare Figure renders with Agg and leaves pyplot (and the user's
    # backend) alone: no global state changes, no figure to close.
    from matplotlib.figure import Figure

    elsa = sorted(
        (100 * lv["achieved_sparsity"], 100 * lv["accuracy"], lv["level"])
        for lv in report["levels"]
        if lv["accuracy"] is not None and lv["achieved_sparsity"] is not None
    )
    methods = report.get("methods") or {}
    baselines = {
        name: sorted(
            (100 * b["achieved_sparsity"], 100 * b["accuracy"])
            for b in ((lv.get("baselines") or {}).get(name) for lv in report["levels"])
            if b
            and b.get("accuracy") is not None
            and b.get("achieved_sparsity") is not None
        )
        for name in _baseline_names(report)
    }
    baselines = {name: curve for name, curve in baselines.items() if curve}

    fig = Figure(figsize=(6, 4), dpi=150, layout="constrained")
    ax = fig.subplots()
    if elsa:
        xs, ys, _ = zip(*elsa)
        ax.plot(
            xs,
            ys,
            "o-",
            color="tab:blue",
            lw=2,
            ms=6,
            zorder=3,
            label=methods.get("elsa", "ELSA levels (one model)"),
        )
    styles = [("s--", "tab:orange"), ("^:", "tab:green"), ("D-.", "tab:red")]
    for i, (name, curve) in enumerate(baselines.items()):
        bx, by = zip(*curve)
        marker, color = styles[i % len(styles)]
        ax.plot(
            bx,
            by,
            marker,
            color=color,
            lw=1.5,
            ms=5,
            zorder=2,
            label=f"{name}: {methods.get(name, 'one model per level')}",
        )
    points = [p[:2] for p in elsa] + [p for c in baselines.values() for p in c]
    if points:
        # A y span of at least _MIN_ACCURACY_SPAN points: zooming closer
        # makes a 1-point spread look like a cliff. Room around the extreme
        # points for their labels.
        xs, ys = zip(*points)
        ax.set_xlim(*_limits(xs, min_span=10, pad=0.06))
        ax.set_ylim(*_limits(ys, min_span=_MIN_ACCURACY_SPAN, pad=0.15))
    ax.set_xlabel("Achieved sparsity (%)")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(f"{report['dataset']} / {report['model']}")
    ax.grid(True, alpha=0.3)
    curves = [c for c in (elsa, *baselines.values()) if c]
    if curves:
        # Below the axes: the method names are long, and inside the axes a
        # legend hides the lines it names. Placed before the labels, whose
        # sides are chosen on the final layout.
        fig.legend(loc="outside lower center", fontsize=7)
    for (x, y, level), (ha, va, dx, dy) in zip(elsa, _label_sides(ax, elsa, curves)):
        ax.annotate(
            _label(level),
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=_LABEL_FONTSIZE,
            color="tab:blue",
        )
    return fig


def _baseline_names(report: Mapping[str, Any]) -> list[str]:
    """The baselines in the report, in the order of `methods`, then of levels."""
    names = [n for n in report.get("methods") or {} if n != "elsa"]
    for level in report["levels"]:
        names += [n for n in level.get("baselines") or {} if n not in names]
    return [
        n
        for n in names
        if any((lv.get("baselines") or {}).get(n) for lv in report["levels"])
    ]


def _side(name: str) -> str:
    return "ELSA" if name == "elsa" else name


def _totals(report: Mapping[str, Any], names: list[str]):
    seconds = report.get("training_seconds") or {}
    storage = report.get("storage_bytes") or {}
    header = ["", "ELSA"]
    rows = [
        ["Training time", _duration(seconds.get("elsa"))],
        ["Storage: bundle (all levels)", _size(storage.get("elsa_bundle"))],
        ["Storage: per-level files (sum)", _size(storage.get("elsa_levels"))],
    ]
    examples = report.get("examples_per_epoch")
    num_train = report.get("num_train")
    if examples:
        share = (
            f" ({sum(examples) / (len(examples) * num_train):.0%} of "
            f"{len(examples)} full epochs)"
            if num_train
            else ""
        )
        rows.append(
            [
                "Examples trained on (data sieving)",
                f"{sum(examples):,}{share}",
            ]
        )
    saved = report.get("flops_saved_per_epoch")
    if saved:
        # Weighted by the examples of each epoch, where data sieving
        # counted them.
        weights = examples if examples and len(examples) == len(saved) else None
        weights = weights or [1] * len(saved)
        share = sum(s * w for s, w in zip(saved, weights)) / sum(weights)
        rows.append(["Training FLOPs saved (layer freezing)", f"{share:.1%}"])
    for name in names:
        header += [f"{name} (sum of models)", f"ELSA / {name}"]
        base_seconds = (seconds.get("baselines") or {}).get(name)
        base_bytes = (storage.get("baselines") or {}).get(name)
        rows[0] += [_duration(base_seconds), _ratio(seconds.get("elsa"), base_seconds)]
        rows[1] += [_size(base_bytes), _ratio(storage.get("elsa_bundle"), base_bytes)]
        rows[2] += [_size(base_bytes), _ratio(storage.get("elsa_levels"), base_bytes)]
        for row in rows[3:]:
            row += ["", ""]
    return header, rows, ["left"] + ["right"] * (len(header) - 1)


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    rule = {"left": ":---", "right": "---:"}
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(rule[a] for a in align) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _tflite_gap(levels) -> float:
    """Largest |TFLite - Keras| accuracy over the levels that have both."""
    gaps = [
        abs(lv["tflite_accuracy"] - lv["accuracy"])
        for lv in levels
        if lv.get("tflite_accuracy") is not None and lv["accuracy"] is not None
    ]
    # Below half a hundredth of a point the two would print the same.
    gap = max(gaps, default=0.0)
    return gap if gap >= 5e-5 else 0.0


# Where a level's label may go, in order of preference: (ha, va, dx, dy), the
# offset in points from the marker to the label's nearest edge.
_LABEL_SIDES = (
    ("center", "bottom", 0, 6),
    ("center", "top", 0, -6),
    ("left", "bottom", 4, 4),
    ("right", "bottom", -4, 4),
    ("left", "top", 4, -4),
    ("right", "top", -4, -4),
    ("left", "center", 6, 0),
    ("right", "center", -6, 0),
)
_LABEL_FONTSIZE = 8
# The plot's smallest y span, in accuracy points.
_MIN_ACCURACY_SPAN = 10
# A side this far (in points) from every line and label is good enough; among
# the sides that are not, the farthest wins.
_LABEL_CLEARANCE = 4


def _label(level) -> str:
    return f"L{level}"


def _label_sides(ax, elsa, curves) -> list[tuple[str, str, float, float]]:
    """Picks a side for each level's label that keeps it off the lines.

    Works in pixels after the layout is final: samples both polylines densely
    and, for each label, takes the first side (in `_LABEL_SIDES` order) whose
    box is at least `_LABEL_CLEARANCE` from every sample, from the labels
    already placed and inside the axes; failing that, the clearest side.
    """
    import numpy as np

    if not elsa:
        return []
    fig = ax.get_figure()
    fig.draw_without_rendering()  # runs the layout, so transData is final
    px = fig.dpi / 72  # pixels per point
    to_pixels = ax.transData.transform
    samples = []
    for curve in curves:
        corners = to_pixels(np.array([c[:2] for c in curve], dtype=float))
        t = np.linspace(0.0, 1.0, 50)[:, None]
        samples += [a + t * (b - a) for a, b in zip(corners[:-1], corners[1:])]
        samples.append(corners)
    samples = np.concatenate(samples)
    frame = ax.get_window_extent()
    placed = []  # boxes (x0, y0, x1, y1) of the labels so far
    sides = []
    for x, y, level in elsa:
        cx, cy = to_pixels((x, y))
        # A rough text box: 0.6 em per character, one em high.
        w = 0.6 * _LABEL_FONTSIZE * len(_label(level)) * px
        h = _LABEL_FONTSIZE * px
        best, best_score = None, -np.inf
        for side in _LABEL_SIDES:
            ha, va, dx, dy = side
            x0 = cx + dx * px - {"left": 0, "center": w / 2, "right": w}[ha]
            y0 = cy + dy * px - {"bottom": 0, "center": h / 2, "top": h}[va]
            box = (x0, y0, x0 + w, y0 + h)
            gaps = [_box_distance(box, samples)]
            gaps += [_boxes_distance(box, other) for other in placed]
            score = min(min(gaps), _LABEL_CLEARANCE * px)
            inside = (
                box[0] >= frame.x0
                and box[2] <= frame.x1
                and box[1] >= frame.y0
                and box[3] <= frame.y1
            )
            if not inside:
                score -= 1e6
            if score > best_score:
                best, best_score = (side, box), score
        sides.append(best[0])
        placed.append(best[1])
    return sides


def _boxes_distance(a, b) -> float:
    """Distance between two rectangles (x0, y0, x1, y1); 0 if they overlap."""
    dx = max(a[0] - b[2], b[0] - a[2], 0.0)
    dy = max(a[1] - b[3], b[1] - a[3], 0.0)
    return math.hypot(dx, dy)


def _box_distance(box, points) -> float:
    """Smallest distance from the rectangle `box` to any of `points`."""
    import numpy as np

    x0, y0, x1, y1 = box
    dx = np.maximum(np.maximum(x0 - points[:, 0], points[:, 0] - x1), 0)
    dy = np.maximum(np.maximum(y0 - points[:, 1], points[:, 1] - y1), 0)
    return float(np.min(np.hypot(dx, dy)))


def _limits(values, min_span: float, pad: float) -> tuple[float, float]:
    """Axis limits around `values` (percentages), padded by `pad` of the span.

    A span narrower than `min_span` is widened around the data, but not past
    0 or 100, which no sparsity or accuracy crosses.
    """
    low, high = min(values), max(values)
    span = max(high - low, min_span)
    middle = (low + high) / 2
    low = min(max(middle - span / 2, 0.0), 100.0 - span)
    low = min(low, min(values))  # data outside [0, 100] stays in view
    high = max(low + span, max(values))
    return low - pad * span, high + pad * span


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}%"


def _points(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return MISSING
    # `+ 0.0` turns a rounded -0.0 into 0.0, so a tie prints "+0.00".
    return f"{round(100 * (value - reference), 2) + 0.0:+.2f}"


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return MISSING
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024**2:
        return f"{num_bytes / 1024:.1f} KiB"
    return f"{num_bytes / 1024**2:.1f} MiB"


def _milliseconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return MISSING
    return f"{value / reference:.2f}×"


def _config_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_config_value(v) for v in value)
    return str(value)


def _write_text(path: str, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)


def _atomic_write(path: str, write_to: Callable[[str], None]) -> None:
    """Calls `write_to(tmp)` on a fresh temporary path, then renames it to `path`."""
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    # A fresh name rather than `tempfile.mkstemp`, whose 0600 mode the renamed
    # report would keep; the extension stays last for writers that infer the
    # format from it (matplotlib).
    tmp = os.path.join(directory, f".{stem}.{uuid.uuid4().hex}.tmp{ext}")
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
