"""report.md / report.json / report.png: contents, formatting, atomic writes."""

import copy
import json
import os
import struct

import matplotlib
import numpy as np
import pytest

from elsa_tf.experiments import report as report_lib


def _level(k, sparsity, accuracy, baseline_accuracy=None, **overrides):
    level = {
        "level": k,
        "target_sparsity": sparsity,
        "achieved_sparsity": sparsity,
        "accuracy": accuracy,
        "tflite_accuracy": accuracy,
        "tflite_bytes": 10 * 1024,
        "latency_ms": 0.25,
        "baselines": {}
        if baseline_accuracy is None
        else {
            "independent": {
                "achieved_sparsity": sparsity,
                "accuracy": baseline_accuracy,
                "tflite_bytes": 12 * 1024,
                "train_seconds": 30.0,
            }
        },
    }
    level.update(overrides)
    return level


ELSA = "ELSA (gradual magnitude, global ranking), one model for all levels"
TFMOT = "tfmot prune_low_magnitude (per-layer ranking), one model per level"


def _report(baseline=True):
    b = (lambda a: a) if baseline else (lambda a: None)
    return {
        "config": {"epochs": 2, "sparsities": [0.9, 0.5, 0.0], "seed": 0},
        "dataset": "digits",
        "model": "cnn",
        "runtime": "ai_edge_litert",
        "methods": {"elsa": ELSA, **({"independent": TFMOT} if baseline else {})},
        "levels": [
            _level(
                0,
                0.9,
                0.964,
                b(0.95),
                achieved_sparsity=0.8996,
                tflite_accuracy=0.9636,
                tflite_bytes=3 * 1024 + 512,
            ),
            _level(1, 0.5, 0.987, b(0.99), tflite_accuracy=None, latency_ms=None),
            _level(2, 0.0, 0.989, b(0.989), tflite_bytes=None),
        ],
        "training_seconds": {
            "elsa": 342.5,
            "baselines": {"independent": 685.0} if baseline else {},
        },
        "storage_bytes": {
            "elsa_bundle": 20 * 1024,
            "elsa_levels": 30 * 1024,
            "baselines": {"independent": 40 * 1024} if baseline else {},
        },
    }


def _rows(md):
    return [line for line in md.splitlines() if line.startswith("| ")]


def test_markdown_has_a_formatted_row_per_level():
    md = report_lib.render_markdown(_report())
    rows = _rows(md)
    assert rows[1:4] == [
        "| 0 | 90.00% | 89.96% | 96.40% | 96.36% | 3.5 KiB | 0.250 "
        "| 95.00% | +1.40 | 12.0 KiB |",
        "| 1 | 50.00% | 50.00% | 98.70% | — | 10.0 KiB | — "
        "| 99.00% | -0.30 | 12.0 KiB |",
        "| 2 | 0.00% | 0.00% | 98.90% | 98.90% | — | 0.250 "
        "| 98.90% | +0.00 | 12.0 KiB |",
    ]
    assert md.startswith("# ELSA report: digits / cnn\n")
    assert "`epochs=2 sparsities=0.9,0.5,0.0 seed=0`" in md
    assert "**Runtime:** ai_edge_litert" in md
    assert "![accuracy](report.png)" in md
    # Level 0's TFLite accuracy differs: the md says the plot shows Keras's.
    assert "differs from it by up to 0.04 points" in md


def test_markdown_totals_compare_elsa_with_the_baseline():
    md = report_lib.render_markdown(_report())
    rows = _rows(md)
    assert "| Training time | 5 min 42 s | 11 min 25 s | 0.50× |" in rows
    assert "| Storage: bundle (all levels) | 20.0 KiB | 40.0 KiB | 0.50× |" in rows
    assert "| Storage: per-level files (sum) | 30.0 KiB | 40.0 KiB | 0.75× |" in rows


def test_totals_give_sieved_examples_and_the_flops_freezing_saved():
    report = _report()
    report["num_train"] = 100
    report["examples_per_epoch"] = [80, 80, 40]
    report["flops_saved_per_epoch"] = [0.0, 0.1, 0.4]
    md = report_lib.render_markdown(report)
    assert "| Examples trained on (data sieving) | 200 (67% of 3 full epochs) |" in md
    # Weighted by each epoch's examples: (0 * 80 + 0.1 * 80 + 0.4 * 40) / 200.
    assert "| Training FLOPs saved (layer freezing) | 12.0% |" in md


def test_markdown_names_the_method_of_each_side():
    md = report_lib.render_markdown(_report())
    assert f"- ELSA: {ELSA}\n- independent: {TFMOT}\n" in md
    header = _rows(md)[0]
    assert "| independent accuracy | ELSA − independent (points) |" in header


def test_every_baseline_gets_its_columns_and_totals():
    report = _report()
    report["methods"]["independent_elsa"] = "elsa_tf, one single-level model"
    for level in report["levels"]:
        level["baselines"]["independent_elsa"] = {
            **level["baselines"]["independent"],
            "accuracy": 0.9,
        }
    report["training_seconds"]["baselines"]["independent_elsa"] = 171.25
    report["storage_bytes"]["baselines"]["independent_elsa"] = 80 * 1024
    rows = _rows(report_lib.render_markdown(report))
    assert rows[1].endswith("| 95.00% | +1.40 | 12.0 KiB | 90.00% | +6.40 | 12.0 KiB |")
    assert (
        "| Training time | 5 min 42 s | 11 min 25 s | 0.50× | 2 min 51 s | 2.00× |"
        in (rows)
    )
    legend = report_lib._figure(report).legends[0].get_texts()
    assert [t.get_text() for t in legend] == [
        ELSA,
        f"independent: {TFMOT}",
        "independent_elsa: elsa_tf, one single-level model",
    ]


def test_missing_values_render_as_dashes():
    report = _report()
    report["levels"][1]["baselines"] = {}
    report["training_seconds"]["baselines"] = {}
    report["storage_bytes"] = {"elsa_bundle": None, "elsa_levels": None}
    rows = _rows(report_lib.render_markdown(report))
    assert rows[2] == "| 1 | 50.00% | 50.00% | 98.70% | — | 10.0 KiB | — | — | — | — |"
    assert "| Training time | 5 min 42 s | — | — |" in rows
    assert "| Storage: bundle (all levels) | — | — | — |" in rows


def test_without_baseline_there_are_no_baseline_columns():
    md = report_lib.render_markdown(_report(baseline=False))
    assert "aseline" not in md
    rows = _rows(md)
    assert rows[0].count("|") == 8  # seven columns
    assert rows[1] == "| 0 | 90.00% | 89.96% | 96.40% | 96.36% | 3.5 KiB | 0.250 |"
    assert "| Training time | 5 min 42 s |" in rows
    assert "| Storage: bundle (all levels) | 20.0 KiB |" in rows
    assert "| Storage: per-level files (sum) | 30.0 KiB |" in rows


def test_equal_tflite_accuracy_needs_no_note():
    report = _report()
    for level in report["levels"]:
        level["tflite_accuracy"] = level["accuracy"]
    md = report_lib.render_markdown(report)
    assert "The plot shows the Keras accuracy.\n" in md
    assert "differs" not in md


@pytest.mark.parametrize(
    "num_bytes, text",
    [(0, "0 B"), (1023, "1023 B"), (2048, "2.0 KiB"), (3 * 1024**2, "3.0 MiB")],
)
def test_sizes_in_human_units(num_bytes, text):
    assert report_lib._size(num_bytes) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(42.0, "42.0 s"), (61, "1 min 01 s"), (3720, "1 h 02 min")],
)
def test_durations(seconds, text):
    assert report_lib._duration(seconds) == text


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_write_creates_the_three_files(tmp_path):
    report = _report()
    given = copy.deepcopy(report)
    paths = report_lib.write(str(tmp_path / "run"), report)
    assert report == given  # not mutated
    assert paths == {
        "json": str(tmp_path / "run" / "report.json"),
        "md": str(tmp_path / "run" / "report.md"),
        "png": str(tmp_path / "run" / "report.png"),
    }
    with open(paths["json"]) as f:
        assert json.load(f) == report
    with open(paths["md"]) as f:
        assert f.read() == report_lib.render_markdown(report)
    assert os.path.getsize(paths["png"]) > 1000
    assert _png_size(paths["png"]) == (900, 600)  # 6 x 4 in at 150 dpi
    # Atomic writes leave nothing else behind.
    assert sorted(os.listdir(tmp_path / "run")) == [
        "report.json",
        "report.md",
        "report.png",
    ]


def test_write_replaces_a_previous_report(tmp_path):
    report_lib.write(str(tmp_path), _report())
    report = _report(baseline=False)
    paths = report_lib.write(str(tmp_path), report)
    with open(paths["json"]) as f:
        assert json.load(f) == report
    with open(paths["md"]) as f:
        assert "aseline" not in f.read()
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md", "report.png"]


def test_unserializable_report_writes_nothing(tmp_path):
    report = _report()
    report["config"]["callback"] = object()
    with pytest.raises(TypeError):
        report_lib.write(str(tmp_path), report)
    assert os.listdir(tmp_path) == []


def test_failed_plot_leaves_no_temporary_file(tmp_path, monkeypatch):
    def failing_plot(report, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(report_lib, "plot", failing_plot)
    with pytest.raises(RuntimeError, match="boom"):
        report_lib.write(str(tmp_path), _report())
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]


@pytest.mark.parametrize(
    "report",
    [
        _report(baseline=False),
        {"dataset": "d", "model": "m", "levels": [_level(0, 0.9, 0.5)]},
        {"dataset": "d", "model": "m", "levels": [_level(0, 0.9, 0.5, 0.6)]},
        {"dataset": "d", "model": "m", "levels": [_level(0, 0.9, None)]},
    ],
    ids=["no_baseline", "single_level", "single_level_baseline", "no_accuracy"],
)
def test_plot_writes_a_png(tmp_path, report):
    path = str(tmp_path / "plot.png")
    report_lib.plot(report, path)
    assert _png_size(path) == (900, 600)


def test_plot_leaves_matplotlib_state_alone(tmp_path):
    backend = matplotlib.get_backend()
    params = dict(matplotlib.rcParams)
    report_lib.plot(_report(), str(tmp_path / "plot.png"))
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == params


def _label_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ax = fig.axes[0]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().startswith("L")]
    return ax, [t.get_window_extent(renderer) for t in labels]


def test_plot_zooms_to_the_data_and_orders_sparsity_left_to_right():
    fig = report_lib._figure(_report())
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 85 < low < 95 and 99 < high < 102  # not 0-100
    left, right = ax.get_xlim()
    assert left < 0 < 90 < right
    assert ax.get_title() == "digits / cnn"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        ELSA,
        f"independent: {TFMOT}",
    ]


def test_a_spread_of_one_point_is_not_drawn_as_a_cliff():
    report = _report()
    for level, accuracy in zip(report["levels"], [0.975, 0.98, 0.985]):
        level["accuracy"] = accuracy
        level["baselines"]["independent"]["accuracy"] = accuracy - 0.002
    low, high = report_lib._figure(report).axes[0].get_ylim()
    assert high - low >= 10  # 1 point is at most a tenth of the axis


def test_level_labels_stay_inside_and_apart():
    # Many levels crowded at high sparsity, the baseline crossing ELSA's line.
    sparsities = [0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.5, 0.0]
    accuracies = [0.42, 0.61, 0.70, 0.74, 0.78, 0.81, 0.84, 0.86, 0.87, 0.89, 0.9]
    baseline = [0.35, 0.63, 0.69, 0.76, 0.77, 0.82, 0.845, 0.855, 0.875, 0.9, 0.9]
    report = {
        "dataset": "cifar10",
        "model": "resnet20",
        "levels": [
            _level(k, s, a, b)
            for k, (s, a, b) in enumerate(zip(sparsities, accuracies, baseline))
        ],
    }
    ax, boxes = _label_boxes(report_lib._figure(report))
    assert len(boxes) == len(sparsities)
    frame = ax.get_window_extent()
    # Points along both lines, in pixels.
    line_points = []
    for line in ax.lines:
        corners = ax.transData.transform(line.get_xydata())
        for a, b in zip(corners[:-1], corners[1:]):
            line_points += [a + t * (b - a) for t in np.linspace(0, 1, 200)]
    line_points = np.array(line_points)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1
        for other in boxes[i + 1 :]:
            assert not box.overlaps(other)
        inner = box.shrunk(0.9, 0.9)  # text boxes have a little padding
        x, y = line_points.T
        inside = (inner.x0 < x) & (x < inner.x1) & (inner.y0 < y) & (y < inner.y1)
        assert not inside.any(), f"label {i} sits on a line"


@pytest.mark.parametrize(
    "report, match",
    [
        ({"dataset": "d", "model": "m"}, "missing 'levels'"),
        ({"levels": [], "model": "m"}, "missing 'dataset'"),
        ({"dataset": "d", "model": "m", "levels": []}, "non-empty list"),
        (
            {"dataset": "d", "model": "m", "levels": [{"level": 0}]},
            r"report\['levels'\]\[0\] is missing 'target_sparsity'",
        ),
    ],
)
def test_bad_report_is_refused(tmp_path, report, match):
    with pytest.raises(ValueError, match=match):
        report_lib.write(str(tmp_path), report)
    assert os.listdir(tmp_path) == []


def test_report_must_be_a_dict():
    with pytest.raises(TypeError, match="Received: report of type list"):
        report_lib.render_markdown([])
