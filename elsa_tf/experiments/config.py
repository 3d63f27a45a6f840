"""`Config`: every setting of a training run, checked, and saved with the run.

One check per setting, shared by the command line (absl validators call them,
so a bad flag stops at start-up naming the flag and the value) and by code
that builds a `Config` directly (benchmarks, tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

from elsa_tf import budgets, layer_freezing, levels, sieving, sparsifiers
from elsa_tf import selection as selection_lib
from elsa_tf.elsa_model import default_shared
from elsa_tf.experiments import datasets, optimizers, zoo

SPARSIFIERS = ("gradual_magnitude", "dpf", "polarized_gates")
SCHEDULES = ("polynomial_decay", "constant")
SELECTIONS = ("lamp", "global", "per_layer")
# The library's own vocabulary: "weight" (the default) or "channel".
GRANULARITIES = selection_lib.GRANULARITIES
# Sparsifiers that choose whole channels only, and the selections they take
# (elsa_tf.PolarizedGates: its gates share one scale, so no "lamp").
CHANNEL_ONLY = {"polarized_gates": ("per_layer", "global")}
SHARED_MODES = ("freeze", "per_level_statistics", "per_level")
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")
# --baseline: models trained separately, one per level, to compare ELSA with;
# "none" (or nothing) trains none.
NO_BASELINE = "none"
BASELINES = ("independent", "independent_elsa")
_SPARSIFIER_NAMES = {
    "gradual_magnitude": "gradual magnitude",
    "dpf": "dynamic pruning with feedback",
    "polarized_gates": "polarized channel gates",
}
_SELECTION_NAMES = {
    "global": "global ranking",
    "per_layer": "per-layer ranking",
    "lamp": "global ranking of layer-adaptive (LAMP) scores",
}
DISTRIBUTIONS = ("none", "mirrored")
AUTO = "auto"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {list(allowed)}. Received: {name}={value!r}"
        )


def check_sparsities(sparsities) -> tuple[float, ...]:
    """Strictly decreasing numbers in [0, 1): level 0 is the sparsest.

    Accepts strings too (a list flag's values, or "0.9,0.5,0.0").
    """
    if isinstance(sparsities, str):
        sparsities = sparsities.split(",")
    try:
        values = [float(s) for s in sparsities]
    except (TypeError, ValueError):
        raise ValueError(
            f"sparsities must be numbers. Received: sparsities={sparsities!r}"
        ) from None
    try:
        return levels.validate_sparsities(values)
    except TypeError as e:
        raise ValueError(str(e)) from None


def check_baselines(baselines) -> tuple[str, ...]:
    """Names from `BASELINES`, without repeats; "none" or nothing for none.

    Accepts a comma-separated string too (a list flag's value).
    """
    if isinstance(baselines, str):
        baselines = baselines.split(",")
    try:
        names = [str(b).strip() for b in baselines]
    except TypeError:
        raise ValueError(
            f"baseline must be names in {list(BASELINES)} or {NO_BASELINE!r}. "
            f"Received: baseline={baselines!r}"
        ) from None
    names = [n for n in names if n and n != NO_BASELINE]
    for name in names:
        _check_choice("baseline", name, (NO_BASELINE, *BASELINES))
    if len(set(names)) != len(names):
        raise ValueError(
            f"baseline names each baseline once. Received: baseline={names!r}"
        )
    return tuple(names)


def method(name: str, config: Config) -> str:
    """How `"elsa"` or a baseline of `BASELINES` prunes, as the report names it.

    The two sides of a comparison may differ in more than nesting: tfmot
    ranks weights within each layer only, ELSA globally by default.
    """
    sparsifier = _SPARSIFIER_NAMES.get(config.sparsifier, config.sparsifier)
    selection = _SELECTION_NAMES.get(config.selection, config.selection)
    if config.granularity == "channel":
        selection = f"{selection}, whole channels"
    if name == "elsa":
        return f"ELSA ({sparsifier}, {selection}), one model for all levels"
    if name == "independent":
        return "tfmot prune_low_magnitude (per-layer ranking), one model per level"
    _check_choice("baseline", name, BASELINES)
    return f"elsa_tf ({sparsifier}, {selection}), one single-level model per level"


def required_modules(config: Config) -> dict[str, str]:
    """Optional modules (setup.py's "examples" extra) the run imports, and why.

    TensorBoard logs and the report's plot are always written; the runtime
    that times the TFLite files falls back to TensorFlow's, which is installed.
    """
    modules = {"tensorboard": "TensorBoard logs", "matplotlib": "report.png"}
    if config.dataset == "digits":
        modules["sklearn"] = "the digits dataset"
    elif config.dataset == "mnist1d":
        modules["mnist1d"] = "the mnist1d dataset"
    elif config.dataset in datasets.TFDS_NAMES:
        modules["tensorflow_datasets"] = f"the {config.dataset} dataset"
    return modules


def default_selection(sparsifier: str) -> str:
    """The selection a sparsifier gets when none is given: LAMP, the
    library's default, or the first a channel-only sparsifier takes
    (`"per_layer"` for polarized gates, which LAMP does not apply to)."""
    return CHANNEL_ONLY.get(sparsifier, (sparsifiers.DEFAULT_SELECTION,))[0]


def check_sparsifier_options(sparsifier: str, selection, granularity: str):
    """Raises ValueError for a sparsifier that cannot take the selection or
    granularity, naming the setting to change. A `selection` of None is the
    sparsifier's default (`default_selection`)."""
    if selection is None:
        selection = default_selection(sparsifier) if sparsifier in SPARSIFIERS else None
    _check_choice("sparsifier", sparsifier, SPARSIFIERS)
    _check_choice("selection", selection, SELECTIONS)
    _check_choice("granularity", granularity, GRANULARITIES)
    selections = CHANNEL_ONLY.get(sparsifier)
    if selections is None:
        return
    if granularity != "channel":
        raise ValueError(
            f"sparsifier {sparsifier!r} chooses whole channels: it needs "
            f"granularity='channel'. Received: granularity={granularity!r}"
        )
    if selection not in selections:
        raise ValueError(
            f"sparsifier {sparsifier!r} takes selection in {list(selections)}. "
            f"Received: selection={selection!r}"
        )


def check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")
    return value


def check_epochs_flag(values) -> int | tuple[int, ...]:
    """`--epochs_per_level`'s strings as one int, or a tuple, one per level.

    Raises:
        ValueError: for an entry that is not a positive int, naming the flag.
    """
    if isinstance(values, str):
        values = values.split(",")
    elif not isinstance(values, (list, tuple)):
        values = [values]  # one number, as code setting the flag may pass it
    try:
        parsed = [int(str(v).strip()) for v in values]
    except ValueError:
        parsed = None
    if not parsed or min(parsed) < 1:
        raise ValueError(
            "--epochs_per_level must be one positive int, or one per level "
            f"separated by commas. Received: {','.join(map(str, values))!r}"
        )
    return parsed[0] if len(parsed) == 1 else tuple(parsed)


def check_epochs_fit_levels(epochs_flag, sparsities_flag) -> None:
    """`--epochs_per_level` as a list has one entry per level of
    `--sparsities` (each flag's own validator checks its values)."""
    try:
        budget = check_epochs_flag(epochs_flag)
        num_levels = len(check_sparsities([float(s) for s in sparsities_flag]))
    except ValueError:
        return
    if isinstance(budget, tuple) and len(budget) != num_levels:
        raise ValueError(
            f"--epochs_per_level has {len(budget)} entries for {num_levels} "
            "levels (--sparsities); give one number, or one per level. "
            f"Received: --epochs_per_level={','.join(map(str, budget))}"
        )


def check_float(name: str, value, *, low: float, low_open: bool, high=None) -> float:
    """A finite float in (low, high] or [low, high]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        bracket = "(" if low_open else "["
        upper = "inf)" if high is None else f"{high}]"
        raise ValueError(
            f"{name} must be a number in {bracket}{low}, {upper}. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_dataset(dataset) -> str:
    """A name from `datasets.DATASETS`, or an existing `.npz` file."""
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a name or a path. Received: {dataset!r}")
    if dataset.endswith(".npz"):
        if not os.path.isfile(dataset):
            raise ValueError(f"No such .npz file. Received: dataset={dataset!r}")
        return dataset
    _check_choice("dataset", dataset, datasets.DATASETS)
    return dataset


def check_model(model) -> str:
    _check_choice("model", model, (AUTO, *zoo.MODELS))
    return model


def resolve_model(model: str, dataset: str) -> str:
    return datasets.default_model(dataset) if model == AUTO else model


def check_model_fits_dataset(model: str, dataset: str) -> None:
    """Raises ValueError when `model` cannot take `dataset`'s inputs."""
    name = resolve_model(model, dataset)
    shape = datasets.input_shape(dataset)
    try:
        zoo.check_compatible(name, shape)
    except ValueError as e:
        raise ValueError(f"Dataset {dataset!r} does not fit: {e}") from None


def check_optimizer(name: str, learning_rate: float, weight_decay: float) -> None:
    """Raises ValueError for settings the optimizer does not take."""
    optimizers.factory(name, learning_rate, weight_decay)


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of one training run (the flags of `elsa-train`).

    Every field is checked on construction. `model="auto"` picks the zoo model
    made for the dataset (`resolved()` fills it in).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = AUTO
    # A width multiplier for the zoo model: benchmarks shrink a model until
    # sparsity costs accuracy.
    width: float = 1.0
    sparsities: tuple[float, ...] = (0.95, 0.9, 0.75, 0.5, 0.0)
    # 15 epochs per level: the digits CNN's sparsest level needs them for its
    # BatchNormalization statistics to settle (8 epochs: 81% at 95% sparsity).
    # Or one entry per level, sparsest first (elsa_tf.budgets).
    epochs_per_level: int | tuple[int, ...] = 15
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    sparsifier: str = "gradual_magnitude"
    schedule: str = "polynomial_decay"
    # None: the library's default (elsa_tf.sparsifiers.DEFAULT_SELECTION,
    # LAMP), or the first selection a channel-only sparsifier takes
    # (`default_selection`).
    selection: str | None = None
    # The library's default: single weights.
    granularity: str = "weight"
    # None: the library's default for the granularity ("freeze" for single
    # weights, "per_level_statistics" for channels; elsa_model.default_shared).
    shared: str | None = None
    # Re-estimate BatchNormalization statistics at the end of every level
    # (and of every baseline model): short levels otherwise freeze lagging
    # ones (digits CNN, 95%: 85.5% without, 98.0% with).
    recalibrate_bn: bool = True
    augment: bool = True
    # SpFDE's circular data sieving (elsa_tf.DataSieve): the share of the
    # training set held out of each epoch (0: off) and the epochs between
    # swaps.
    sieving_share: float = 0.0
    sieving_interval: int = sieving.DEFAULT_INTERVAL
    # SpFDE's progressive layer freezing (elsa_tf.LayerFreezing): the share
    # of each level's training FLOPs to save (0: off), and the epochs between
    # freezing one more front block.
    freeze_share: float = 0.0
    freeze_interval: int = 1
    export_tflite: bool = True
    quantization: str = "float32"
    # Names from BASELINES (a comma-separated string is accepted); none by
    # default, since each baseline trains as long as ELSA does.
    baseline: tuple[str, ...] = ()
    distribution: str = "none"
    seed: int = 0

    def __post_init__(self):
        check_dataset(self.dataset)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"data_dir must be a path. Received: {self.data_dir!r}")
        check_model(self.model)
        check_float("width", self.width, low=0.0, low_open=True)
        object.__setattr__(self, "sparsities", check_sparsities(self.sparsities))
        budget = budgets.check_epochs_per_level(
            self.epochs_per_level, len(self.sparsities)
        )
        object.__setattr__(
            self,
            "epochs_per_level",
            budget if isinstance(budget, int) else tuple(budget),
        )
        check_positive_int("batch_size", self.batch_size)
        sieving.check_share(self.sieving_share)
        layer_freezing.check_share(self.freeze_share)
        layer_freezing.check_interval(self.freeze_interval)
        sieving.check_interval(self.sieving_interval)
        if self.sieving_share and self.augment and self.dataset in datasets.AUGMENTED:
            raise ValueError(
                "Data sieving numbers examples before a per-example map, and "
                f"{self.dataset}'s augmentation runs on batches: pass "
                "augment=False with sieving. Received: "
                f"sieving_share={self.sieving_share}, augment=True"
            )
        _check_choice("optimizer", self.optimizer, optimizers.OPTIMIZERS)
        check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0, low_open=False)
        check_optimizer(self.optimizer, self.learning_rate, self.weight_decay)
        if self.selection is None:
            _check_choice("sparsifier", self.sparsifier, SPARSIFIERS)
            object.__setattr__(self, "selection", default_selection(self.sparsifier))
        check_sparsifier_options(self.sparsifier, self.selection, self.granularity)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.shared is None:
            object.__setattr__(self, "shared", default_shared(self.granularity))
        _check_choice("shared", self.shared, SHARED_MODES)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        object.__setattr__(self, "baseline", check_baselines(self.baseline))
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0. Received: seed={self.seed!r}")
        check_model_fits_dataset(self.model, self.dataset)

    def resolved(self) -> Config:
        """This config with `model="auto"` replaced by the dataset's model."""
        return dataclasses.replace(self, model=resolve_model(self.model, self.dataset))

    def level_epochs(self) -> list[int]:
        """The epochs of every level, sparsest first."""
        return budgets.level_epochs(self.epochs_per_level, len(self.sparsities))

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        config["sparsities"] = list(self.sparsities)
        if not isinstance(self.epochs_per_level, int):
            config["epochs_per_level"] = list(self.epochs_per_level)
        config["baseline"] = list(self.baseline)
        return config

    @classmethod
    def from_dict(cls, config: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}. Received: {config!r}")
        return cls(**config)

    def save(self, path) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> Config:
        with open(path) as f:
            return cls.from_dict(json.load(f))
