import json
from itertools import pairwise

import numpy as np
import pytest

from edgenas.config import BudgetConfig
from edgenas.pareto import choose, crowding_distance, front_of, non_dominated_sort, plot, select, to_rows, violation
from edgenas.records import Candidate, EvalResult, FailureKind, Outcome, Status, failed


def as_lists(fronts):
    return [sorted(front.tolist()) for front in fronts]


def dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


def test_simple_fronts():
    points = np.array([[1, 5], [2, 3], [4, 1], [3, 4], [5, 5], [4, 2]])
    assert as_lists(non_dominated_sort(points)) == [[0, 1, 2], [3, 5], [4]]


def test_identical_points_share_a_front():
    points = np.array([[1, 2], [1, 2], [2, 1], [3, 3], [3, 3]])
    assert as_lists(non_dominated_sort(points)) == [[0, 1, 2], [3, 4]]


def test_empty_input():
    empty = np.empty((0, 2))
    assert non_dominated_sort(empty) == []
    assert non_dominated_sort([]) == []
    assert crowding_distance(empty).shape == (0,)
    assert select(empty, 3).shape == (0,)
    assert select(empty, 3, violation=np.empty(0)).shape == (0,)
    assert violation(empty, [1.0, None]).shape == (0,)


def test_one_point():
    point = np.array([[0.3, 7.0]])
    assert as_lists(non_dominated_sort(point)) == [[0]]
    assert crowding_distance(point).tolist() == [np.inf]
    assert select(point, 1).tolist() == [0]
    assert select(point, 5, violation=np.array([2.0])).tolist() == [0]


def test_nan_objectives_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        non_dominated_sort(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        non_dominated_sort(np.array([1.0, 2.0]))


def test_crowding_distance_values():
    line = np.array([[0, 10], [1, 9], [2, 8], [5, 5], [10, 0]])
    assert crowding_distance(line) == pytest.approx([np.inf, 0.4, 0.8, 1.6, np.inf])
    # an objective on which every point is equal adds nothing, not even boundaries
    assert crowding_distance(np.array([[1, 1], [1, 2], [1, 3]])) == pytest.approx([np.inf, 1.0, np.inf])
    assert crowding_distance(np.array([[1, 1], [1, 1], [1, 1]])).tolist() == [0, 0, 0]


def test_crowding_prefers_extremes():
    line = np.array([[2, 8], [0, 10], [1, 9], [5, 5], [10, 0]])
    assert select(line, 3).tolist() == [1, 4, 3]


def test_select_goes_by_front_first():
    points = np.array([[1, 5], [2, 3], [4, 1], [3, 4], [5, 5], [4, 2]])
    chosen = select(points, 4).tolist()
    assert sorted(chosen[:3]) == [0, 1, 2]
    assert chosen[3] in (3, 5)


def test_select_more_than_available_returns_all():
    points = np.array([[1, 5], [2, 3], [4, 1], [3, 4]])
    assert sorted(select(points, 10).tolist()) == [0, 1, 2, 3]
    assert sorted(select(points, 10, violation=np.array([0, 1, 0, 2])).tolist()) == [0, 1, 2, 3]
    assert select(points, 0).tolist() == []


def test_infeasible_point_that_dominates_everything_comes_last():
    points = np.array([[0, 0], [1, 3], [2, 2], [3, 1]])
    over = np.array([0.5, 0, 0, 0])
    assert 0 not in select(points, 3, violation=over).tolist()
    assert select(points, 4, violation=over).tolist()[-1] == 0


def test_infeasible_fill_the_rest_by_how_far_they_miss():
    points = np.array([[0, 0], [1, 3], [2, 2], [3, 1], [4, 4]])
    over = np.array([0.9, 0, 0.2, 0, 0.1])
    assert select(points, 4, violation=over).tolist() == [1, 3, 4, 2]


def test_none_feasible_ranks_by_violation_then_front():
    points = np.array([[2, 2], [1, 1], [0, 5], [5, 0]])
    over = np.array([0.1, 0.1, 0.05, 0.3])
    # 1 and 0 miss by as much, but 1 dominates 0
    assert select(points, 4, violation=over).tolist() == [2, 1, 0, 3]


def test_select_is_deterministic_on_ties():
    points = np.array([[1, 1], [1, 1], [1, 1]])
    assert select(points, 3).tolist() == [0, 1, 2]
    assert select(points, 3, violation=np.array([0.5, 0.5, 0.5])).tolist() == [0, 1, 2]


def test_violation_is_relative_excess():
    values = np.array([[100, 5, 10], [150, 20, 30], [np.nan, 1, 10], [50, 2, 25]])
    assert violation(values, [100, None, 20]).tolist() == [0.0, 1.0, np.inf, 0.25]
    assert violation(values, [None, None, None]).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        violation(values, [100, None])
    with pytest.raises(ValueError):
        violation(values, [0, None, None])


def test_fronts_property_on_random_points():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m = rng.integers(0, 40), rng.integers(1, 5)
        points = rng.integers(0, 5, size=(n, m)).astype(float)  # a small range, so ties are common
        fronts = non_dominated_sort(points)
        joined = np.concatenate(fronts) if fronts else np.empty(0, dtype=int)
        assert sorted(joined.tolist()) == list(range(n))
        assert all(len(front) for front in fronts)
        for i in fronts[0] if fronts else []:
            assert not any(dominates(points[j], points[i]) for j in range(n))
        for better, worse in pairwise(fronts):
            for i in worse:
                assert any(dominates(points[j], points[i]) for j in better)
        for front in fronts:
            for i in front:
                assert not any(dominates(points[j], points[i]) for j in front)
        over = np.where(rng.random(n) < 0.3, rng.random(n), 0.0)
        chosen = select(points, n, violation=over).tolist()
        assert sorted(chosen) == list(range(n))
        feasible = [i for i in chosen if over[i] == 0]
        assert chosen[:len(feasible)] == feasible


def candidate(iteration, accuracy, params, macs, memory_mb, latency=1.0):
    result = EvalResult(status=Status.ok, val_accuracy=accuracy, params=params, macs=macs,
                        peak_memory_bytes=None if memory_mb is None else int(memory_mb * 2**20), latency_ms=latency)
    return Candidate(iteration=iteration, status="ok", outcome=Outcome(status="ok", val_accuracy=accuracy), result=result)


@pytest.fixture
def archive():
    return [
        candidate(1, 0.90, 1_000_000, 100_000_000, 50, 5.0),
        candidate(2, 0.80, 100_000, 10_000_000, 20, 1.0),
        candidate(3, 0.70, 200_000, 20_000_000, 30, 2.0),  # dominated by 2
        candidate(4, 0.95, 5_000_000, 50_000_000, 40, 3.0),  # the best, but 2.5x the parameter budget
        Candidate(iteration=5, status="failed", outcome=Outcome(status="failed", kind="oom"),
                  result=failed(FailureKind.oom, "out of memory", params=10)),
        candidate(6, 0.85, 300_000, 30_000_000, 120, 1.5),  # over the memory budget
    ]


BUDGET = BudgetConfig(max_params=2_000_000, max_memory_mb=100)


def test_front_of(archive):
    points = front_of(archive, BUDGET)
    assert [p.iteration for p in points] == [1, 2, 3, 4, 6]
    by_iteration = {p.iteration: p for p in points}
    assert [by_iteration[i].front for i in (1, 2, 3)] == [0, 0, 1]
    assert all(by_iteration[i].feasible for i in (1, 2, 3))
    assert not by_iteration[4].feasible and by_iteration[4].violation == pytest.approx(1.5)
    assert not by_iteration[6].feasible and by_iteration[6].violation == pytest.approx(0.2)
    assert front_of([], BUDGET) == []


def test_front_of_without_budget_puts_the_most_accurate_on_front_0(archive):
    points = front_of(archive, BudgetConfig())
    assert all(p.feasible and p.violation == 0 for p in points)
    assert {p.iteration for p in points if p.front == 0} == {1, 2, 4, 6}


def test_a_cost_one_candidate_lacks_is_left_out_for_all():
    twins = [candidate(1, 0.8, 1000, 10_000, 10, latency=None), candidate(2, 0.8, 1000, 10_000, 10, latency=0.5)]
    assert [p.front for p in front_of(twins, BudgetConfig())] == [0, 0]


def test_unmeasured_memory_under_a_memory_budget_is_infeasible():
    points = front_of([candidate(1, 0.8, 1000, 10_000, None)], BudgetConfig(max_memory_mb=10))
    assert not points[0].feasible and points[0].violation == np.inf
    assert front_of([candidate(1, 0.8, 1000, 10_000, None)], BudgetConfig())[0].feasible


def test_choose(archive):
    assert [p.iteration for p in choose(archive, BUDGET, 3)] == [1, 2, 3]
    assert [p.iteration for p in choose(archive, BUDGET, 5)] == [1, 2, 3, 6, 4]
    assert [p.iteration for p in choose(archive, BUDGET, 50)] == [1, 2, 3, 6, 4]
    assert choose([], BUDGET, 3) == []


def test_to_rows_is_strict_json(archive):
    rows = to_rows(front_of(archive, BUDGET))
    text = json.dumps(rows, allow_nan=False)
    first = json.loads(text)[0]
    assert first["iteration"] == 1 and first["crowding"] is None and first["feasible"] is True
    assert set(first) == {"iteration", "val_accuracy", "params", "macs", "peak_memory_bytes", "latency_ms", "target_latency_ms",
                          "violation", "front", "crowding", "feasible"}


def test_plot_writes_a_png(archive, tmp_path):
    path = plot(front_of(archive, BUDGET), tmp_path / "report" / "pareto.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert plot([], tmp_path / "empty.png").read_bytes().startswith(b"\x89PNG")
