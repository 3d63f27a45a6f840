"""Model-level level bookkeeping: find the owner, prune a level, move levels.

These functions act eagerly on an embedded model between training steps; the
math itself lives in `elsa_tf.levels`.
"""

from __future__ import annotations

import keras
import numpy as np

from elsa_tf import (
    channel_levels,
    compiled_functions,
    elsa_model,
    levels,
    schedules,
    sparsifiers,
)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """`value` as an int; ValueError naming `name` unless it is an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")
    return int(value)


def check_int_below(name: str, value, bound_name: str, bound: int) -> int:
    """`value` as an int; ValueError naming `name` unless 0 <= value < bound."""
    if not _is_int(value) or not 0 <= value < bound:
        raise ValueError(
            f"{name} must be an int in [0, {bound_name}={bound}). "
            f"Received: {name}={value!r}"
        )
    return int(value)


def owner(model):
    """The `ElsaModel` that holds an embedded model's levels.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if `model` is not embedded.
    """
    if isinstance(model, elsa_model.ElsaModel):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: model={model!r}")
    raise ValueError(
        f"Model {model.name!r} is not embedded: it holds no elsa_tf level "
        "maps. Call `elsa_tf.embed(model, sparsities=...)` first."
    )


def sparsities(model) -> tuple[float, ...]:
    """The level sparsities of an embedded model."""
    return owner(model).sparsities


def current_level(model) -> int:
    """The level being trained; equals the number of finished levels."""
    return owner(model).current_level


def check_level(model, level, name: str = "level") -> int:
    """Validates a level index against the model's levels and returns it."""
    num = len(sparsities(model))
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < num:
        raise ValueError(
            f"{name} must be an int in [0, {num - 1}] for a model with {num} "
            f"levels. Received: {name}={level!r}"
        )
    return level


def set_view_level(model, level: int) -> None:
    """Makes the embedded model compute with the weights of `level`."""
    check_level(model, level)
    owner(model).set_view_level(level)


def set_raw_training(model, enabled: bool) -> None:
    """Lets training steps run on the raw weights, with no mask.

    Only valid while a `FreezingOptimizer` keeps every weight the current
    level does not use at zero; `LevelScheduler` turns it on for its run.
    Takes effect when the train step is next traced.
    """
    o = owner(model)
    o.train_raw = bool(enabled)
    compiled_functions.refresh(o)


def prune_to(model, sparsity, step=None) -> None:
    """Updates the current level's masks to `sparsity`, with its sparsifier.

    The model's `Sparsifier` chooses the kept set of every weight among the
    free ones (frozen weights always count as kept); its answer is checked
    (`sparsifiers.check_kept`), not trusted. Free weights it does not keep
    are pruned: set to zero, unless the sparsifier has feedback
    (`DynamicPruningWithFeedback`), whose pruned weights keep training and
    may come back at a later update (counted in `reactivations`).

    A gated sparsifier (`PolarizedGates`) lets its gates choose while the
    level trains: a mask update inside the level only sets the gates' target
    (`gate_keep`), and the one at the level's end hardens them (the level
    keeps the channels with the largest gates; see `_harden_gates`).

    Args:
        model: an embedded model.
        sparsity: the sparsity to reach over the prunable weights.
        step: the step in the level (passed to the sparsifier), or None at
            the level's end.
    """
    o = owner(model)
    k = o.current_level
    if k >= o.num_levels:
        raise ValueError("Every level is finished; there is nothing left to prune.")
    sparsifier = o.sparsifier
    values = [keras.ops.convert_to_numpy(v.value) for v in o.prunable_weights]
    if sparsifier.gated and step is not None:
        o.gate_keep.assign(sparsifier.keep_shares(o.channel_codes(), k, sparsity))
        o.gate_order.assign(sparsifier.channel_order(values, o.channel_layout))
        return
    maps = [m.numpy() for m in o.level_maps]
    if o.channel_layout is not None:
        kept = _kept_channel_elements(o, values, maps, k, sparsity, step)
    else:
        kept = sparsifiers.check_kept(
            sparsifier.select(values, maps, k, sparsity, step),
            maps,
            k,
            sparsity,
            sparsifier,
        )
    reactivated = 0
    for weight, map_variable, value, level_map, keep in zip(
        o.prunable_weights, o.level_maps, values, maps, kept
    ):
        new_map = levels.set_kept(level_map, keep, k)
        if np.array_equal(new_map, level_map):
            continue  # early in a ramp most updates keep everything
        reactivated += levels.reactivated_count(level_map, keep, k)
        map_variable.assign(new_map)
        if not sparsifier.feedback:
            drop = (level_map >= k) & ~keep
            if drop.any():
                value[drop] = 0
                weight.assign(value)
    if reactivated:
        counts = o.reactivations.numpy()
        counts[k] += reactivated
        o.reactivations.assign(counts)
    if sparsifier.gated:
        _harden_gates(o, maps, k)


def _harden_gates(o, maps_before, level: int) -> None:
    """Sets the gates to the level just pruned at its end: 1 for the channels
    it keeps, 0 for the free ones it drops, so that the training forward pass
    (BatchNormalization recalibration) computes the level's map.

    First records how many gates were still undecided, once per level: a
    second end-of-level update (`finish_level` after `LevelScheduler`'s) sees
    the gates already set.
    """
    counts = o.undecided_gates.numpy()
    if counts[level] < 0:
        codes = channel_levels.channel_codes(maps_before, o.channel_layout)
        counts[level] = o.sparsifier.undecided(
            o.gates.numpy(), codes, level, o.sparsities[level]
        )
        o.undecided_gates.assign(counts)
    codes = np.concatenate(o.channel_codes())
    gamma = o.gates.numpy()
    gamma[codes == level] = 1.0
    gamma[codes > level] = 0.0  # dropped (UNUSED)
    o.gates.assign(gamma)


def _open_gates(o) -> None:
    """A new level's gates: every one at its initial value, a target that
    keeps every channel until the level's first mask update, and the order
    of the channels it opens (fresh weights)."""
    values = [keras.ops.convert_to_numpy(v.value) for v in o.prunable_weights]
    o.gates.assign(np.full(o.gates.shape, o.sparsifier.initial_value, np.float32))
    o.gate_keep.assign(np.ones(o.gate_keep.shape, np.float32))
    o.gate_order.assign(o.sparsifier.channel_order(values, o.channel_layout))


def _kept_channel_elements(o, values, maps, level, sparsity, step):
    """The elementwise kept sets of a channel-granularity mask update.

    The sparsifier chooses channels (`Sparsifier.select_channels`); their new
    codes are written back onto every member element
    (`channel_levels.element_codes`), and the elements whose code is at most
    `level` are the kept ones.
    """
    layout, sparsifier = o.channel_layout, o.sparsifier
    codes = channel_levels.channel_codes(maps, layout)
    shapes = [m.shape for m in maps]
    for expanded, level_map, weight in zip(
        channel_levels.element_codes(codes, layout, shapes), maps, o.prunable_weights
    ):
        if not np.array_equal(expanded, level_map):
            raise ValueError(
                f"The level map of {weight.path!r} is not constant over the "
                "channels of its channel groups; it was not made at "
                "granularity='channel'."
            )
    candidates = sparsifier.channel_candidates(codes, level, step)
    options = {}
    if sparsifier.gated:
        offsets = np.cumsum([0] + [c.size for c in codes])
        gamma = o.gates.numpy()
        options["gates"] = [gamma[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    kept = channel_levels.check_kept(
        sparsifier.select_channels(
            values, codes, layout, level, sparsity, step, **options
        ),
        codes,
        candidates,
        level,
        sparsity,
        sparsifier.selection,
        type(sparsifier).__name__,
    )
    new_codes = [levels.set_kept(c, k, level) for c, k in zip(codes, kept)]
    return [m <= level for m in channel_levels.element_codes(new_codes, layout, shapes)]


def channel_keep(model, level: int) -> dict[int, np.ndarray]:
    """Group index -> boolean array of the channels `level` uses, for every
    unpinned channel group of a model embedded at channel granularity."""
    o = owner(model)
    check_level(o, level)
    codes = channel_levels.channel_codes(
        [m.numpy() for m in o.level_maps], o.channel_layout
    )
    return {g.group: c <= level for g, c in zip(o.channel_layout, codes)}


def finish_level(model) -> int:
    """Prunes the current level to its exact target, freezes it, opens the next.

    The next level's free weights start from what the sparsifier says
    (`Sparsifier.end_of_level_values`: zero by default), except the units
    the finished level left unused, which start from their layer's
    initializer (see `ElsaModel.finish_level`).

    A traced training step bakes in whether some level is finished: the
    train function traced for the new level state is put in place here
    (`reset_compiled_functions`); a custom training loop's step made with
    `elsa_tf.function` picks its own.

    Returns:
        The index of the level just finished.
    """
    o = owner(model)
    k = o.current_level
    prune_to(model, o.sparsities[k])
    o.finish_level()
    if o.sparsifier.gated:
        _open_gates(o)
    reset_compiled_functions(o)
    return k


def mask_update_steps(model, level: int, level_steps: int) -> dict[int, float]:
    """Step -> sparsity of every mask update in a level of `level_steps` steps.

    From the level's tfmot schedule (the model's `LevelSchedule`) and its
    sparsifier's `update_interval`.
    """
    o = owner(model)
    schedule = o.schedule.build(o.sparsities[level], level_steps)
    return schedules.update_steps(schedule, level_steps, o.sparsifier.update_interval)


def update_masks(model, step: int, level_steps: int) -> bool:
    """Updates the current level's masks if its schedule says so at `step`.

    For custom training loops: call it before every training step of a
    level, then `finish_level` after the level's last step. `LevelScheduler`
    does both inside `model.fit`.

    Args:
        model: an embedded model.
        step: the step in the current level, from 0.
        level_steps: the number of steps the level trains.

    Returns:
        Whether the masks were updated.
    """
    o = owner(model)
    k = o.current_level
    if k >= o.num_levels:
        raise ValueError("Every level is finished; there is nothing left to prune.")
    check_positive_int("level_steps", level_steps)
    check_int_below("step", step, "level_steps", level_steps)
    key = (k, int(level_steps))
    cache = getattr(o, "_update_steps_cache", None)
    if cache is None or cache[0] != key:
        cache = (key, mask_update_steps(o, k, int(level_steps)))
        object.__setattr__(o, "_update_steps_cache", cache)
    sparsity = cache[1].get(int(step))
    if sparsity is None:
        return False
    prune_to(o, sparsity, int(step))
    return True


def level_counts(model) -> list[dict]:
    """Per prunable weight: name, size, and kept and zero counts per level.

    `zeros[k]` counts the weights level k keeps whose value is exactly zero:
    capacity the level holds but does not use.
    """
    o = owner(model)
    rows = []
    for path, weight, level_map in zip(
        o.weight_owners, o.prunable_weights, o.level_maps
    ):
        codes = level_map.numpy()
        zero_codes = codes[keras.ops.convert_to_numpy(weight.value) == 0]
        rows.append(
            {
                "layer": path,
                "weight": weight.path,
                "size": int(codes.size),
                "kept": levels.level_counts(codes, o.num_levels).tolist(),
                "zeros": levels.level_counts(zero_codes, o.num_levels).tolist(),
            }
        )
    return rows


def reset_compiled_functions(model, in_fit: bool = False) -> bool:
    """Puts in place the train function traced for the model's level state.

    A traced step bakes in whether some level is finished (every level after
    the first shares one trace; see `elsa_tf.compiled_functions`).
    Inside `fit` a missing train function is made at once, since the running
    loop calls `model.train_function` directly.

    Returns:
        Whether the train function in place changed.
    """
    return compiled_functions.switch(owner(model), in_fit=in_fit)
