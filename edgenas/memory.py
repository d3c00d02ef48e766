"""The historical feedback memory: a sliding window of the K most recent diagnostic triples.

Failures are kept as first-class entries: an out-of-memory or shape error teaches the next attempt as
much as a success does. The window is derived from the archive, so a resumed run sees the same memory.
"""

from __future__ import annotations

from edgenas.records import EvalResult, Outcome, Triple, mean_accuracy

DIAGNOSTIC_CHARS = 600


def window(triples: list[Triple], k: int) -> list[Triple]:
    """Exactly the last k triples (none when k is 0)."""
    return list(triples[-k:]) if k > 0 else []


def outcome_of(result: EvalResult, best_accuracy: float | None, reruns: list[EvalResult] = ()) -> Outcome:
    if result.ok:
        accuracy = mean_accuracy(result, list(reruns))
        delta = None if best_accuracy is None else accuracy - best_accuracy
        failed = next((r for r in reruns if not r.ok), None)
        runs = [r.val_accuracy for r in (result, *reruns) if r.ok]
        note = None if failed is None else (f"not promoted: the re-run with seed {failed.seed} failed "
                                            f"({failed.failure.kind.value}: {failed.failure.message[:200]})")
        return Outcome(status="ok", val_accuracy=accuracy, delta=delta, params=result.params, macs=result.macs,
                       peak_memory_bytes=result.peak_memory_bytes, diagnostic=note,
                       target=result.target.render() if result.target else None,
                       runs=runs if len(runs) > 1 else [])
    return Outcome(status="failed", kind=result.failure.kind.value, diagnostic=result.failure.message[:DIAGNOSTIC_CHARS],
                   params=result.params, macs=result.macs, peak_memory_bytes=result.peak_memory_bytes)


def render(triples: list[Triple]) -> str:
    if not triples:
        return "(no attempts yet)"
    return "\n".join(
        f"- iteration {t.iteration}: problem: {t.problem} -> modification: {t.modification} -> outcome: {t.outcome.render()}"
        for t in triples
    )
