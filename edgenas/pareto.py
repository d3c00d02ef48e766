"""Pareto selection of the candidates worth fully training and exporting to an edge device.

Two layers. The core works on plain arrays (every objective minimised, indices out) so it can be
tested by hand and reused for any metric; the archive layer turns Candidates and a BudgetConfig into
those arrays and back into Points for reports, plots and JSON.

Feasible points are always ranked before infeasible ones: a model over the edge budget is useless
however accurate it is, so it is only picked when there are not enough models that fit.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgenas.config import BudgetConfig
from edgenas.records import Candidate


def _matrix(objectives) -> np.ndarray:
    array = np.asarray(objectives, dtype=float)
    if array.size == 0 and array.ndim == 1:  # a bare [] is an empty set of points
        array = array.reshape(0, 0)
    if array.ndim != 2:
        raise ValueError(f"objectives must be a 2-D (points, objectives) array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError("objectives contain NaN, which no point can be compared against")
    return array


def non_dominated_sort(objectives: np.ndarray) -> list[np.ndarray]:
    """Split the rows of an (n, m) array, all minimised, into Pareto fronts, best front first.

    A point dominates another when it is no worse in every objective and better in one, so identical
    points never dominate each other and share a front. Quadratic in n, which suits an archive of a
    few thousand candidates.
    """
    objectives = _matrix(objectives)
    n = len(objectives)
    # dominates[i, j]: row i dominates row j
    dominates = np.empty((n, n), dtype=bool)
    for i, row in enumerate(objectives):
        dominates[i] = (row <= objectives).all(axis=1) & (row < objectives).any(axis=1)
    dominators = dominates.sum(axis=0)
    remaining = np.ones(n, dtype=bool)
    fronts = []
    while remaining.any():
        front = np.flatnonzero(remaining & (dominators == 0))
        fronts.append(front)
        remaining[front] = False
        dominators -= dominates[front].sum(axis=0)
    return fronts


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the points of one front; larger means a lonelier, more useful point.

    Each objective adds the normalised gap between a point's two neighbours; the extremes of each
    objective get infinity so the front's ends are always kept. An objective on which all points are
    equal says nothing about spread and is skipped. Objectives must be finite.
    """
    objectives = _matrix(objectives)
    n = len(objectives)
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for column in objectives.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        if span <= 0:
            continue
        distance[order[[0, -1]]] = np.inf
        distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def violation(values: np.ndarray, limits: Sequence[float | None]) -> np.ndarray:
    """Total relative excess over the limits, per row: sum of max(0, value / limit - 1).

    Relative, so that 10% over the parameter budget weighs as much as 10% over the MAC budget.
    A None limit is no constraint. A NaN value under a limit (not measured) counts as an infinite
    excess: a model that cannot be shown to fit the device is never taken for one that does.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(limits):
        raise ValueError(f"values of shape {values.shape} do not match {len(limits)} limits")
    total = np.zeros(len(values))
    for column, limit in zip(values.T, limits, strict=True):
        if limit is None:
            continue
        if not limit > 0:
            raise ValueError(f"limits must be positive, got {limit}")
        excess = np.maximum(0.0, column / limit - 1.0)
        total += np.where(np.isnan(column), np.inf, excess)
    return total


def _layout(objectives: np.ndarray, violations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feasibility, front and crowding per point; fronts are ranked within the feasible and the infeasible group apart."""
    feasible = violations <= 0
    front = np.zeros(len(objectives), dtype=int)
    crowding = np.zeros(len(objectives))
    for group in (np.flatnonzero(feasible), np.flatnonzero(~feasible)):
        for number, members in enumerate(non_dominated_sort(objectives[group])):
            rows = group[members]
            front[rows] = number
            crowding[rows] = crowding_distance(objectives[rows])
    return feasible, front, crowding


def _violations(n: int, violations) -> np.ndarray:
    if violations is None:
        return np.zeros(n)
    violations = np.asarray(violations, dtype=float)
    if violations.shape != (n,):
        raise ValueError(f"violation must have shape ({n},), got {violations.shape}")
    return violations


def select(objectives: np.ndarray, k: int, violation: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k points to keep, best first.

    Feasible points (violation 0) come first, by front, then by descending crowding distance so a
    short list still spans small to large models. If fewer than k fit, the rest are the infeasible
    points that miss by least (then by front among the infeasible). Remaining ties go to the lower index.
    """
    objectives = _matrix(objectives)
    n = len(objectives)
    violations = _violations(n, violation)
    feasible, front, crowding = _layout(objectives, violations)
    index = np.arange(n)
    order = np.lexsort((
        index,
        np.where(feasible, -crowding, front),
        np.where(feasible, front, violations),
        ~feasible,
    ))
    return order[:max(0, k)]


# --- the archive layer ---

_OBJECTIVES = ("params", "macs", "peak_memory_bytes", "latency_ms", "target_latency_ms")  # minimised, after -accuracy


def cost(candidate: Candidate, name: str) -> float | None:
    """One of _OBJECTIVES of a measured candidate (the target latency is its p50 once measured)."""
    if name == "target_latency_ms":
        target = candidate.result.target
        return target.p50_ms if target is not None and target.status == "measured" else None
    return getattr(candidate.result, name)


@dataclass(frozen=True)
class Point:
    """One valid candidate placed in the trade-off between accuracy and cost."""

    iteration: int
    val_accuracy: float
    params: int | None
    macs: int | None
    peak_memory_bytes: int | None
    latency_ms: float | None
    target_latency_ms: float | None  # p50 on the deployment target (the `target` section)
    violation: float  # total relative excess over the budget; 0 means it fits
    front: int  # Pareto front within its group (feasible or infeasible), 0 best
    crowding: float  # crowding distance within its front; inf at the front's ends
    feasible: bool


def _measure(candidates: Sequence[Candidate], budget: BudgetConfig) -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """The valid candidates, their objective matrix and their budget violations.

    A cost no valid candidate lacks becomes an objective; one missing anywhere (say latency that was
    not measured) is left out for all, so no candidate wins or loses by a measurement it never had.
    A missing value under a budget limit counts as over it (see violation()). A candidate that failed when re-run
    with another seed (search.confirm_margin) trains unreliably and is left out. In a run with a target, latency
    means the target's: only candidates measured there are placed (the others are waiting for an agent, or the
    target could not run them), and this machine's latency is no objective.
    """
    valid = [c for c in candidates if c.status == "ok" and c.val_accuracy is not None and all(r.ok for r in c.reruns)]
    targeted = any(c.result.target is not None for c in valid)
    if targeted:
        valid = [c for c in valid if cost(c, "target_latency_ms") is not None]
    columns = [[-c.val_accuracy for c in valid]]
    for name in _OBJECTIVES:
        column = [cost(c, name) for c in valid]
        if all(value is not None for value in column) and not (targeted and name == "latency_ms"):
            columns.append(column)
    objectives = np.array(columns, dtype=float).T.reshape(len(valid), len(columns))
    limited = ("params", "macs", "peak_memory_bytes", "target_latency_ms")
    values = np.array([[np.nan if v is None else v for v in (cost(c, name) for name in limited)] for c in valid],
                      dtype=float).reshape(len(valid), len(limited))
    memory = None if budget.max_memory_mb is None else budget.max_memory_mb * 2**20
    target = budget.max_target_latency_ms
    return valid, objectives, violation(values, (budget.max_params, budget.max_macs, memory, target))


def _points(valid: list[Candidate], objectives: np.ndarray, violations: np.ndarray) -> list[Point]:
    feasible, front, crowding = _layout(objectives, violations)
    return [Point(iteration=c.iteration, val_accuracy=c.val_accuracy, params=c.result.params, macs=c.result.macs,
                  peak_memory_bytes=c.result.peak_memory_bytes, latency_ms=c.result.latency_ms,
                  target_latency_ms=cost(c, "target_latency_ms"), violation=float(violations[i]), front=int(front[i]), crowding=float(crowding[i]),
                  feasible=bool(feasible[i]))
            for i, c in enumerate(valid)]


def front_of(candidates: Sequence[Candidate], budget: BudgetConfig) -> list[Point]:
    """Every valid candidate as a Point: feasible first, then by front, then most accurate first.

    Objectives are (-val_accuracy, params, macs, peak_memory_bytes, latency_ms or target_latency_ms), all minimised;
    failed candidates and those without an accuracy are ignored.
    """
    points = _points(*_measure(candidates, budget))
    return sorted(points, key=lambda p: (not p.feasible, p.front, -p.val_accuracy, p.iteration))


def parent_from_front(candidates: Sequence[Candidate], budget: BudgetConfig, draw: int) -> Candidate | None:
    """A parent for search.parent front: one of the feasible non-dominated candidates, drawn by the proposal's
    seed (so a re-run draws the same); None while no candidate fits the budgets."""
    points = [p for p in front_of(candidates, budget) if p.feasible and p.front == 0]
    if not points:
        return None
    chosen = random.Random(draw).choice(points).iteration
    return next(c for c in candidates if c.iteration == chosen)


def choose(candidates: Sequence[Candidate], budget: BudgetConfig, k: int) -> list[Point]:
    """The k candidates to fully train and export, best first (see select())."""
    valid, objectives, violations = _measure(candidates, budget)
    points = _points(valid, objectives, violations)
    return [points[i] for i in select(objectives, k, violations)]


def plot(points: Sequence[Point], path: str | Path) -> Path:
    """Write a PNG of validation accuracy against parameters, the first feasible front highlighted.

    Uses the Agg canvas directly rather than pyplot, so it neither needs a display nor changes the
    backend of a process that has one.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    path = Path(path)
    drawn = [p for p in points if p.params is not None and p.params > 0]  # a log axis has no place for the others
    front = sorted((p for p in drawn if p.feasible and p.front == 0), key=lambda p: p.params)
    infeasible = [p for p in drawn if not p.feasible]

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter([p.params for p in drawn], [p.val_accuracy for p in drawn], s=18, color="0.7", label="valid candidates")
    if infeasible:
        axes.scatter([p.params for p in infeasible], [p.val_accuracy for p in infeasible], s=30, marker="x",
                     color="tab:red", label="over the budget")
    if front:
        axes.plot([p.params for p in front], [p.val_accuracy for p in front], "o-", color="tab:blue", markersize=6,
                  label="first feasible front")
        for p in front:
            axes.annotate(str(p.iteration), (p.params, p.val_accuracy), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color="tab:blue")
    axes.set_xscale("log")
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_xlabel("parameters (log scale)")
    axes.set_ylabel("validation accuracy")
    axes.set_title(f"Accuracy vs size: {len(points)} valid candidates, {len(front)} on the first feasible front")
    axes.grid(True, which="both", alpha=0.3)
    if drawn:
        axes.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def to_rows(points: Sequence[Point]) -> list[dict]:
    """Points as plain dicts for strict JSON: an infinite crowding or violation becomes None."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return [{key: clean(value) for key, value in dataclasses.asdict(p).items()} for p in points]
