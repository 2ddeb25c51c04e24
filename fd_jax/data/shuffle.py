"""Deterministic epoch shuffling that a checkpoint can resume exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(num_items) that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


class ShuffledIterator(Generic[T], Iterator[T]):
    """Endless iteration over `items`, reshuffled every epoch from (seed, epoch).

    The state is (epoch, position), so `load_state_dict(state_dict())` on a fresh iterator over the same
    items continues with exactly the item that would have come next.
    """

    def __init__(self, items: Sequence[T], *, seed: int = 0):
        if len(items) == 0:
            raise ValueError("ShuffledIterator needs at least one item")
        self._items = items
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._order = epoch_permutation(len(items), seed, 0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __next__(self) -> T:
        if self._position == len(self._items):
            self._epoch += 1
            self._position = 0
            self._order = epoch_permutation(len(self._items), self._seed, self._epoch)
        item = self._items[int(self._order[self._position])]
        self._position += 1
        return item

    def take(self, n: int) -> list[T]:
        """The next n items (crossing epoch boundaries when needed)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_items": len(self._items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`. Raises ValueError if the items or the seed differ from the saved ones."""
        if state["num_items"] != len(self._items) or state["seed"] != self._seed:
            raise ValueError(
                f"cannot resume: saved iterator had num_items={state['num_items']} seed={state['seed']}, "
                f"this one has num_items={len(self._items)} seed={self._seed}"
            )
        if not 0 <= state["position"] <= len(self._items):
            raise ValueError(f"cannot resume: position {state['position']} outside [0, {len(self._items)}]")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._order = epoch_permutation(len(self._items), self._seed, self._epoch)
