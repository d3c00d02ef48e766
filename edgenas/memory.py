"""The historical feedback memory: a sliding window of the K most recent diagnostic triples.

Failures are kept as first-class entries: an out-of-memory or shape error teaches the next attempt as
much as a success does. The window is derived from the archive, so a resumed run sees the same memory.
"""

from __future__ import annotations

from edgenas.records import EvalResult, Outcome, Triple

DIAGNOSTIC_CHARS = 600


def window(triples: list[Triple], k: int) -> list[Triple]:
    """Exactly the last k triples (none when k is 0)."""
    return list(triples[-k:]) if k > 0 else []


def outcome_of(result: EvalResult, best_accuracy: float | None) -> Outcome:
    if result.ok:
        delta = None if best_accuracy is None else result.val_accuracy - best_accuracy
        return Outcome(status="ok", val_accuracy=result.val_accuracy, delta=delta, params=result.params,
                       macs=result.macs, peak_memory_bytes=result.peak_memory_bytes)
    return Outcome(status="failed", kind=result.failure.kind.value, diagnostic=result.failure.message[:DIAGNOSTIC_CHARS],
                   params=result.params, macs=result.macs, peak_memory_bytes=result.peak_memory_bytes)


def render(triples: list[Triple]) -> str:
    if not triples:
        return "(no attempts yet)"
    return "\n".join(
        f"- iteration {t.iteration}: problem: {t.problem} -> modification: {t.modification} -> outcome: {t.outcome.render()}"
        for t in triples
    )
