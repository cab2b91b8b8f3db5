"""The seeded mini-batch plan of online iNMF (rliger/libplanc scheme).

Per dataset the mini-batch size is ``b_i = round(batch_size * n_i / sum(n))``. Cells are cut
into contiguous chunks of ``chunk_size``; the chunk order is shuffled at the start and at every
epoch boundary; a mini-batch is the next ``b_i`` positions of the permuted order, so the batch
that crosses a boundary is the tail of the old order plus the head of a fresh permutation.
Every iteration takes one slice from every dataset.

Epochs follow libplanc's ``next()``: iteration ``t`` (1-based) runs while ``t * b_1 < max_epochs
* n_1`` (counted on the first dataset, one fewer than legacy R's ``<=``), so no short final batch
is ever used; the epoch-boundary flag is raised when the first dataset's epoch
``floor(t * b_1 / n_1)`` changes. Each dataset reshuffles when its own epoch changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ._errors import InputError


@dataclass(frozen=True)
class Step:
    """One iteration of the plan.

    Attributes
    ----------
    t : int
        1-based iteration number.
    new_epoch : bool
        The first dataset crossed an epoch boundary in this iteration (rliger's signal to drop
        statistics older than two epochs).
    epoch : int
        Epochs completed on the first dataset after this iteration.
    ranges : tuple of tuple of (start, stop)
        Per dataset, the contiguous row ranges making up its mini-batch, in plan order.
    """

    t: int
    new_epoch: bool
    epoch: int
    ranges: tuple[tuple[tuple[int, int], ...], ...]


def _round_half_up(x: float) -> int:
    # C++ round(): halves go away from zero (Python's round() would go to even).
    return int(math.floor(x + 0.5))


def minibatch_sizes(n_cells: Sequence[int], batch_size: int) -> list[int]:
    """Per-dataset mini-batch sizes ``round(batch_size * n_i / sum n)``, each within ``[1, n_i]``.

    A ``batch_size`` larger than the total number of cells is capped to it.
    """
    n_cells = [int(n) for n in n_cells]
    if not n_cells or min(n_cells) < 1:
        msg = f"n_cells: expected at least one dataset with >= 1 cell each, found {n_cells}"
        raise InputError(msg)
    total = sum(n_cells)
    batch_size = min(int(batch_size), total)
    return [min(n, max(1, _round_half_up(batch_size * n / total))) for n in n_cells]


def n_plan_steps(n_first: int, b_first: int, max_epochs: int) -> int:
    """Number of iterations: the t >= 1 with ``t * b_1 < max_epochs * n_1``.

    When the mini-batch is the whole first dataset each iteration is one epoch and the plan runs
    ``max_epochs`` iterations: libplanc's strict ``<`` would run one fewer, and none at all for a
    single epoch, which leaves a small data set with an untrained model.
    """
    if b_first >= n_first:
        return max(0, int(max_epochs))
    return max(0, -(-max_epochs * n_first // b_first) - 1)


def chunk_order(n: int, chunk_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of the ``ceil(n / chunk_size)`` chunk indices."""
    return rng.permutation(-(-n // chunk_size))


def _slice_ranges(order: np.ndarray, n: int, chunk_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Row ranges of positions ``lo:hi`` of the chunk-permuted order (adjacent ranges merged)."""
    lengths = np.minimum(chunk_size, n - order * chunk_size)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out: list[tuple[int, int]] = []
    first = int(np.searchsorted(ends, lo, side="right"))
    for c in range(first, len(order)):
        if starts[c] >= hi:
            break
        a = int(order[c]) * chunk_size + max(0, lo - int(starts[c]))
        b = int(order[c]) * chunk_size + min(int(lengths[c]), hi - int(starts[c]))
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class MinibatchPlan:
    """Deterministic mini-batch plan drawn from a Generator, iterated as :class:`Step` objects.

    Parameters
    ----------
    n_cells : sequence of int
        Cells per dataset (the first one counts epochs).
    batch_size, max_epochs, chunk_size : int
    rng : numpy.random.Generator
        Consumed while iterating: one chunk permutation per dataset at the start, and one each
        time a dataset's epoch changes (before the plan stops).
    """

    def __init__(self, n_cells: Sequence[int], batch_size: int, max_epochs: int, chunk_size: int,
                 rng: np.random.Generator):
        self.n_cells = [int(n) for n in n_cells]
        self.sizes = minibatch_sizes(self.n_cells, batch_size)
        self.max_epochs = int(max_epochs)
        self.chunk_size = int(chunk_size)
        self.rng = rng
        self.n_steps = n_plan_steps(self.n_cells[0], self.sizes[0], self.max_epochs)

    def __len__(self) -> int:
        return self.n_steps

    def __iter__(self) -> Iterator[Step]:
        cs = self.chunk_size
        orders = [chunk_order(n, cs, self.rng) for n in self.n_cells]
        epochs = [0] * len(self.n_cells)
        for t in range(1, self.n_steps + 1):
            ranges = []
            new_epoch = False
            for i, (n, b) in enumerate(zip(self.n_cells, self.sizes, strict=True)):
                start = ((t - 1) * b) % n
                epoch = t * b // n
                if epoch == epochs[i]:
                    rr = _slice_ranges(orders[i], n, cs, start, start + b)
                else:
                    epochs[i] = epoch
                    new_epoch = new_epoch or i == 0
                    rr = _slice_ranges(orders[i], n, cs, start, n)
                    orders[i] = chunk_order(n, cs, self.rng)
                    head = b - (n - start)
                    if head > 0:
                        rr += _slice_ranges(orders[i], n, cs, 0, head)
                ranges.append(tuple(rr))
            yield Step(t=t, new_epoch=new_epoch, epoch=epochs[0], ranges=tuple(ranges))
