"""The budget search every lossy stage uses: which units to decline so the error stays in budget.

A lossy stage offers units (layers it could quantize, convert or prune), a `build` function
that makes the candidate model with some units declined (kept as they were), and an `error`
function that measures a candidate (`onnxshrink.quant.sensitivity.ErrorReference.error`). The search
knows nothing of what a unit is: int8 uses it now, fp16 too, and int4 and pruning next.

1. Ranking (`rank`). Each unit applied alone (every other unit declined) is measured; units are
   sorted by that error, largest first (ties keep their order). One measurement per unit, each
   independent of the others: they fan out to worker processes (`--search-workers N`,
   `onnxshrink.quant.fanout`), the one step of the search that does; the steps below choose
   each measurement from the last.
2. Fewest declined (`decline_fewest`). With the ranked units, the least k such that declining
   the k most sensitive meets the budget, when declining none does not: galloping (k = 1, 2,
   4, ... until one meets it) then bisection between the last failing and the first passing
   k. k = N (every unit declined) is measured only if no smaller k passes. About 2 log2(N)
   measurements, fewer when few units must be declined. The search assumes error(k) falls as
   k grows; when it does not (measured errors are noisy), the k found still meets the budget
   (it was measured), it may just not be the least such k. Galloping favours small k: a
   plain bisection's first probe at N/2 may fail by chance and push k up.
3. Most granted (`grant_most`). Given items in order of preference (e.g. the declined units'
   weights, largest first, that could still be stored in int8), the longest prefix that can
   be granted while the budget holds: everything first (one measurement when it passes),
   then bisection (about log2(n) more).

4. Isolating (`isolate`). When many units are offered and the full candidate fails by far
   (one unit breaks the model: an fp16 constant that overflows, a tensor int8 cannot hold),
   measuring every unit alone costs N measurements. Group testing finds the culprits in
   about 2 k log2(N): the units are split in two halves (in their order, so neighbours stay
   together), each half is applied alone, and every half that fails on its own is split
   again, down to single units. A failing group whose halves both pass alone (the failure
   needs both) is returned whole. The caller declines what is returned and measures; when
   that does not meet the budget, it falls back to the full ranking (1, 2).

Every measurement is a `Step` (what was tried, its error), kept in order for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from onnxshrink.quant.fanout import measure_all

logger = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True)
class Step:
    """One measurement: `k` units declined (or items granted) and the error measured."""

    k: int
    error: float


@dataclass
class Search(Generic[M]):
    """A search's outcome: the k chosen, its built candidate and error (None when even
    declining every unit failed), and every step measured."""

    k: int
    built: M | None
    error: float
    steps: list[Step] = field(default_factory=list)


def rank(
    units: Sequence[str],
    alone: Callable[[str], float],
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> list[tuple[str, float]]:
    """(unit, its error applied alone), largest first, ties in the given order (docstring 1).

    `alone(unit)` builds and measures the candidate with only `unit` applied. With `workers`
    > 1 the units are measured in that many processes (`onnxshrink.quant.fanout`: forked
    workers inherit `alone`, spawned ones need it to pickle, or the units are measured here);
    the ranking is the same.
    """
    measured = list(zip(units, measure_all(alone, units, workers, progress), strict=True))
    order = sorted(range(len(measured)), key=lambda i: (-measured[i][1], i))
    return [measured[i] for i in order]


def decline_fewest(
    ranked: Sequence[str],
    build: Callable[[Sequence[str]], M],
    error: Callable[[M, int], float],
    max_error: float,
) -> Search[M]:
    """The least k such that declining `ranked[:k]` meets `max_error` (docstring 2).

    Declining none is taken to fail (the caller measured it). `error(model, k)` measures the
    candidate built with k units declined. When even k = N fails, `built` is None.
    """
    steps: list[Step] = []

    def measure(k: int) -> tuple[M, float]:
        built = build(ranked[:k])
        value = error(built, k)
        steps.append(Step(k, value))
        logger.info("%d unit(s) declined: error %.4g", k, value)
        return built, value

    lo, hi = 0, len(ranked)  # error(lo) > budget; error(hi) is measured when reached
    best: tuple[M, float] | None = None
    step = 1
    while step < hi:
        built, value = measure(step)
        if value <= max_error:
            hi, best = step, (built, value)
            break
        lo, step = step, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        built, value = measure(mid)
        if value <= max_error:
            hi, best = mid, (built, value)
        else:
            lo = mid
    if best is None:  # only k = N can meet it
        built, value = measure(len(ranked))
        if value > max_error:
            return Search(len(ranked), None, value, steps)
        best = (built, value)
    return Search(hi, best[0], best[1], steps)


def grant_most(
    items: Sequence[str],
    build: Callable[[Sequence[str]], M],
    error: Callable[[M, int], float],
    max_error: float,
) -> Search[M]:
    """The longest prefix `items[:j]` whose grant keeps `max_error` (docstring 3).

    Granting nothing is taken to pass (the caller's current candidate). `built` is the
    candidate of the chosen j, None when j = 0 (nothing granted, nothing built for it).
    """
    steps: list[Step] = []
    lo, hi = 0, len(items) + 1  # granting lo items passes, hi fails
    j = len(items)
    best: tuple[M, float] | None = None
    while hi - lo > 1:
        built = build(items[:j])
        value = error(built, j)
        steps.append(Step(j, value))
        if value <= max_error:
            lo, best = j, (built, value)
        else:
            hi = j
        j = (lo + hi) // 2
    if best is None:
        return Search(0, None, 0.0, steps)
    return Search(lo, best[0], best[1], steps)


def isolate(
    units: Sequence[str],
    fails_alone: Callable[[Sequence[str]], bool],
) -> list[str]:
    """The units that make a candidate fail, by group testing (docstring 4).

    `fails_alone(group)` builds the candidate with only `group` applied and says whether it
    misses the budget. The whole of `units` is taken to fail (the caller measured it).
    """
    found: list[str] = []

    def split(group: Sequence[str]) -> None:
        if len(group) == 1:
            found.extend(group)
            return
        half = len(group) // 2
        halves = [group[:half], group[half:]]
        failing = [h for h in halves if fails_alone(h)]
        if not failing:  # only the two together fail: keep the group whole
            found.extend(group)
            return
        for h in failing:
            split(h)

    split(list(units))
    return found
