"""What every benchmark's main does with its results besides printing them."""

import json
import os

import numpy as np


def write_json(path, results) -> None:
    """Writes `results` to `path` as indented JSON, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def mean_std(values) -> dict:
    """The mean and standard deviation of `values` (over seeds, say)."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std())}
