"""SpFDE's circular data sieving, as pure NumPy functions.

SpFDE (Yuan et al., NeurIPS 2022) trains on a partial training set. At the
start a share `p` of the examples is removed at random into a queue. Every
`interval` epochs, the easiest share `p` of the partial set moves to the
queue's tail and as many examples come back from its head, so the queue
always holds `round(p * N)` examples. "Easiest" means the fewest forgetting
events (a correct prediction followed by a wrong one) in the interval just
ended; an example not learned in that interval counts as hardest. Once every
initially removed example has come back once, the queue is shuffled after
each swap, so that every example keeps being used.

This module holds the rule and nothing else: no Keras, no TensorFlow. The
state is two small frozen dataclasses, and every function returns a new one.
`elsa_tf.sieving_data` records the correctness of each example during
`model.fit` and calls these functions.

Example:

```python
queue = initial_queue(num_examples=10, share=0.2, seed=0)
tracker = new_tracker(10)
tracker = record(tracker, ids=np.arange(10), correct=np.ones(10, bool))
queue = sieve_step(queue, difficulty(tracker))
```
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from elsa_tf import _checks

# SpFDE's "20% + 20%" result removes 20% of the data.
DEFAULT_SHARE = 0.2
# SpFDE leaves the interval open; 5 epochs is what the authors' MEST code uses.
DEFAULT_INTERVAL = 5


def check_share(share) -> float:
    """`share` as a float; ValueError naming it unless it lies in [0, 1).

    Raises:
        ValueError: for a share outside [0, 1), or one that is not a number.
    """
    return _checks.check_share(share, "sieving")


def check_interval(interval) -> int:
    """`interval` as an int; ValueError naming it unless it is an int >= 1.

    Raises:
        ValueError: for an interval below 1, or one that is not an int.
    """
    return _checks.check_interval(interval, "sieving")


def check_seed(seed) -> int:
    """`seed` as an int; ValueError naming it unless it is an int >= 0.

    Raises:
        ValueError: for a negative seed, or one that is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(
            f"The sieving seed must be a non-negative int. Received: seed={seed!r}"
        )
    return int(seed)


def queue_size(num_examples: int, share: float) -> int:
    """How many examples the queue holds: `round(share * num_examples)`.

    Python's `round`: halves go to the even neighbour.
    """
    return int(round(share * num_examples))


def swap_size(num_examples: int, share: float) -> int:
    """How many examples each swap exchanges: the share of the partial set.

    At least 1 when the queue is not empty, so that it always turns.
    """
    queued = queue_size(num_examples, share)
    if queued == 0:
        return 0
    partial = num_examples - queued
    return int(min(queued, partial, max(1, round(share * partial))))


# ----------------------------------------------------------------------------
# Forgetting events.


@dataclasses.dataclass(frozen=True)
class ForgettingTracker:
    """What the sieve knows about each example's learning, one entry per id.

    Attributes:
        last_correct: whether the example's latest prediction was correct
            (False before its first one).
        forgetting: forgetting events (correct, then wrong) in this interval.
        learned: whether the example was predicted correctly at least once in
            this interval.
    """

    last_correct: np.ndarray
    forgetting: np.ndarray
    learned: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.last_correct.shape[0])


def new_tracker(num_examples: int) -> ForgettingTracker:
    """A tracker for `num_examples` examples that have seen no prediction."""
    return ForgettingTracker(
        last_correct=np.zeros(num_examples, bool),
        forgetting=np.zeros(num_examples, np.int64),
        learned=np.zeros(num_examples, bool),
    )


def record(tracker: ForgettingTracker, ids, correct) -> ForgettingTracker:
    """The tracker after predictions for `ids`, correct where `correct` is.

    Args:
        tracker: the state so far.
        ids: example ids, each at most once.
        correct: one bool per id: whether its prediction was right.

    Returns:
        A new tracker; a forgetting event is counted for every id that was
        correct last time and is wrong now.

    Raises:
        ValueError: if `ids` and `correct` differ in length, or an id is out
            of range or repeated.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    correct = np.asarray(correct, bool).reshape(-1)
    if ids.shape != correct.shape:
        raise ValueError(
            f"Expected one correctness per id. Received: {ids.size} ids and "
            f"{correct.size} correctness values"
        )
    n = tracker.num_examples
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(
            f"Example ids must lie in [0, {n}). Received: ids with min "
            f"{ids.min()} and max {ids.max()}"
        )
    if np.unique(ids).size != ids.size:
        raise ValueError(f"Each id may be recorded once per call. Received: {ids}")
    last_correct = tracker.last_correct.copy()
    forgetting = tracker.forgetting.copy()
    learned = tracker.learned.copy()
    forgetting[ids] += last_correct[ids] & ~correct
    last_correct[ids] = correct
    learned[ids] |= correct
    return ForgettingTracker(last_correct, forgetting, learned)


def start_interval(tracker: ForgettingTracker, returning=()) -> ForgettingTracker:
    """The tracker for a new interval: counts and `learned` restart.

    Args:
        tracker: the state at the end of the interval.
        returning: ids coming back from the queue. Their last prediction is
            intervals old, so it is forgotten: their first prediction back
            cannot count as a forgetting event.

    Returns:
        A new tracker.
    """
    last_correct = tracker.last_correct.copy()
    last_correct[np.asarray(returning, np.int64)] = False
    n = tracker.num_examples
    return ForgettingTracker(last_correct, np.zeros(n, np.int64), np.zeros(n, bool))


def difficulty(tracker: ForgettingTracker) -> np.ndarray:
    """Each example's difficulty: its forgetting events in the interval.

    An example not learned in the interval (never predicted correctly in it)
    is the hardest: `inf`. Without this, an example wrong all along would
    have no forgetting event and pass for one of the easiest.
    """
    return np.where(tracker.learned, tracker.forgetting.astype(float), np.inf)


# ----------------------------------------------------------------------------
# The circular queue.


@dataclasses.dataclass(frozen=True)
class SieveQueue:
    """The examples held out of training, and how they circulate.

    Attributes:
        num_examples: the size of the full training set.
        queue: held-out ids, head first.
        pending: initially removed ids that have not come back yet.
        swap_size: examples exchanged at each swap.
        seed: the seed every random choice derives from.
        swaps: swaps made so far (each swap's randomness derives from it).
    """

    num_examples: int
    queue: np.ndarray
    pending: np.ndarray
    swap_size: int
    seed: int
    swaps: int = 0

    @property
    def shuffling(self) -> bool:
        """Whether every initially removed example has come back once."""
        return self.pending.size == 0

    def members(self) -> np.ndarray:
        """A bool per example: True for those in the partial training set."""
        keep = np.ones(self.num_examples, bool)
        keep[self.queue] = False
        return keep

    def to_dict(self) -> dict:
        """The state as JSON-ready Python values."""
        return {
            "num_examples": self.num_examples,
            "queue": self.queue.tolist(),
            "pending": self.pending.tolist(),
            "swap_size": self.swap_size,
            "seed": self.seed,
            "swaps": self.swaps,
        }

    @classmethod
    def from_dict(cls, state: dict) -> SieveQueue:
        """The inverse of `to_dict`."""
        return cls(
            num_examples=int(state["num_examples"]),
            queue=np.asarray(state["queue"], np.int64),
            pending=np.asarray(state["pending"], np.int64),
            swap_size=int(state["swap_size"]),
            seed=int(state["seed"]),
            swaps=int(state["swaps"]),
        )


def _rng(seed: int, swaps: int) -> np.random.Generator:
    # One generator per swap, from (seed, swap number; 0 is the initial
    # removal): the same seed gives the same run, and a restored queue
    # continues it with no generator state to save.
    return np.random.default_rng([seed, swaps])


def initial_queue(num_examples: int, share: float, seed: int = 0) -> SieveQueue:
    """The queue at the start: a random share of the examples, removed.

    Args:
        num_examples: the size of the training set (ids `0..num_examples-1`).
        share: the share held out, in [0, 1).
        seed: seeds the random removal and every later tie-break and shuffle.

    Returns:
        A `SieveQueue` holding `round(share * num_examples)` ids.

    Raises:
        ValueError: for a share outside [0, 1), a negative seed, fewer than
            one example, or a share that would hold out every example.
    """
    share = check_share(share)
    seed = check_seed(seed)
    if not _checks.is_int_at_least(num_examples, 1):
        raise ValueError(
            "Sieving needs at least one example. Received: "
            f"num_examples={num_examples!r}"
        )
    num_examples = int(num_examples)
    queued = queue_size(num_examples, share)
    if queued == num_examples:
        raise ValueError(
            f"Holding out share={share} of {num_examples} examples leaves none "
            f"to train on. Received: share={share!r}, num_examples={num_examples}"
        )
    removed = _rng(seed, 0).permutation(num_examples)[:queued]
    return SieveQueue(
        num_examples=num_examples,
        queue=removed.astype(np.int64),
        pending=np.sort(removed).astype(np.int64),
        swap_size=swap_size(num_examples, share),
        seed=seed,
    )


def easiest(candidates: np.ndarray, scores: np.ndarray, count: int, rng) -> np.ndarray:
    """The `count` candidates with the lowest scores, ties broken at random.

    Args:
        candidates: example ids.
        scores: a difficulty per example of the whole set, indexed by id.
        count: how many to pick.
        rng: a NumPy generator for the tie-break.

    Returns:
        The chosen ids, easiest first.
    """
    order = rng.permutation(candidates.size)
    shuffled = candidates[order]
    ranked = shuffled[np.argsort(scores[shuffled], kind="stable")]
    return ranked[:count]


def sieve_step(state: SieveQueue, scores) -> SieveQueue:
    """One swap: the easiest of the partial set out, the queue's head in.

    The `swap_size` examples of the partial set with the lowest `scores`
    (ties broken at random) go to the queue's tail, and as many come back
    from its head. If every initially removed example has now come back once,
    the queue is shuffled.

    Args:
        state: the queue before the swap.
        scores: a difficulty per example (as `difficulty` returns), indexed by
            id; entries of queued examples are ignored.

    Returns:
        The queue after the swap.

    Raises:
        ValueError: if `scores` does not hold one value per example.
    """
    scores = np.asarray(scores, float)
    if scores.shape != (state.num_examples,):
        raise ValueError(
            f"Expected one score per example ({state.num_examples}). Received: "
            f"scores of shape {scores.shape}"
        )
    if state.swap_size == 0:
        return dataclasses.replace(state, swaps=state.swaps + 1)
    rng = _rng(state.seed, state.swaps + 1)
    partial = np.flatnonzero(state.members())
    leaving = easiest(partial, scores, state.swap_size, rng)
    returning = state.queue[: state.swap_size]
    queue = np.concatenate([state.queue[state.swap_size :], leaving])
    pending = np.setdiff1d(state.pending, returning)
    if pending.size == 0:
        queue = rng.permutation(queue)
    return dataclasses.replace(
        state, queue=queue.astype(np.int64), pending=pending, swaps=state.swaps + 1
    )


def returned(before: SieveQueue, after: SieveQueue) -> np.ndarray:
    """The ids that a swap brought back into the partial set."""
    return np.setdiff1d(before.queue, after.queue)
