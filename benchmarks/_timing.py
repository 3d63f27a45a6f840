"""Interleaved latency of TFLite interpreters, shared by the benchmarks."""

import time

import numpy as np


def interleaved_invoke_ms(interpreters: dict, *, budget_s: float, rounds: int) -> dict:
    """Median, 10th and 90th percentile invoke times (ms) of ready interpreters
    (inputs set), timed in `rounds` interleaved rounds of about `budget_s`
    seconds in all: each round runs every interpreter in turn, starting one
    further along the list each time, so that all see the same machine state.
    """
    for interpreter in interpreters.values():  # XNNPACK packs weights on first run
        for _ in range(3):
            interpreter.invoke()
    one_each = 0.0
    for interpreter in interpreters.values():
        start = time.perf_counter()
        for _ in range(3):
            interpreter.invoke()
        one_each += (time.perf_counter() - start) / 3
    repeats = int(np.clip(budget_s / (rounds * max(one_each, 1e-6)), 3, 5000))
    keys = list(interpreters)
    seconds = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            invoke, spent = interpreters[key].invoke, seconds[key]
            for _ in range(repeats):
                start = time.perf_counter()
                invoke()
                spent.append(time.perf_counter() - start)
    out = {}
    for key, values in seconds.items():
        ms = np.asarray(values) * 1e3
        out[key] = {
            "median_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
            "runs": len(ms),
        }
    return out
