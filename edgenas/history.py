"""What a run's archive says over time: progress, valid rate, failures, the lineage of the best, and what it cost.

Plain functions over the archive's candidates (finished ones; pending ones are still in flight), so the HTML
report, tests and notebooks read the same numbers.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

import numpy as np

from edgenas.records import Candidate


def finished(candidates: list[Candidate]) -> list[Candidate]:
    return sorted((c for c in candidates if c.status != "pending"), key=lambda c: c.iteration)


def progress(candidates: list[Candidate]) -> list[dict]:
    """Per finished iteration: its accuracy (valid ones) and the best promoted so far, of the run and of its chain."""
    rows, best, chain_best = [], None, {}
    start = min((c.created for c in candidates), default=0.0)
    for c in finished(candidates):
        if c.is_best:
            best = c.val_accuracy if best is None else max(best, c.val_accuracy)
            chain_best[c.chain] = c.val_accuracy
        rows.append({"iteration": c.iteration, "chain": c.chain, "minutes": (c.created - start) / 60,
                     "val_accuracy": c.val_accuracy, "best": best, "chain_best": chain_best.get(c.chain),
                     "is_best": c.is_best, "status": c.status})
    return rows


def valid_rate(candidates: list[Candidate], window: int = 20) -> list[dict]:
    """The share of valid candidates among the last `window` iterations, at every iteration."""
    done, rows = finished(candidates), []
    for i, c in enumerate(done):
        recent = done[max(0, i + 1 - window):i + 1]
        rows.append({"iteration": c.iteration, "valid_rate": sum(r.status == "ok" for r in recent) / len(recent)})
    return rows


def failure_kind(c: Candidate) -> str | None:
    return None if c.status == "ok" else (c.outcome.kind or c.status)


def failures_over_time(candidates: list[Candidate], bins: int = 20) -> dict:
    """Counts of each failure kind in `bins` equal spans of iterations: {"edges": [...], "counts": {kind: [...]}}."""
    done = finished(candidates)
    if not done:
        return {"edges": [], "counts": {}}
    last = done[-1].iteration + 1
    width = max(1, -(-last // bins))
    edges = list(range(0, last, width))
    counts: dict[str, list[int]] = {}
    for c in done:
        kind = failure_kind(c)
        if kind:
            counts.setdefault(kind, [0] * len(edges))[c.iteration // width] += 1
    return {"edges": edges, "counts": dict(sorted(counts.items(), key=lambda kv: -sum(kv[1])))}


def _shape(text: str) -> str:
    """A diagnostic with its numbers and quoted names blanked, so repeats of one problem count together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text.splitlines()[0] if text else "")
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def top_diagnostics(candidates: list[Candidate], n: int = 10) -> list[dict]:
    """The most frequent failure diagnostics (numbers and names blanked), with their kind and count."""
    counted = Counter((failure_kind(c), _shape(c.outcome.diagnostic or "")) for c in finished(candidates) if failure_kind(c))
    return [{"kind": kind, "diagnostic": text, "count": count} for (kind, text), count in counted.most_common(n)]


def lineage(candidates: list[Candidate]) -> list[dict]:
    """The chain of programs from the first to the run's best, each step with its problem, modification, accuracy
    change against its parent and the code diff."""
    by_iteration = {c.iteration: c for c in candidates}
    promoted = [c for c in candidates if c.is_best]
    if not promoted:
        return []
    steps, node = [], max(promoted, key=lambda c: (c.val_accuracy, -c.iteration))
    while node is not None:
        steps.append(node)
        node = by_iteration.get(node.parent) if node.parent is not None else None
    steps.reverse()
    out = []
    for parent, c in zip([None, *steps[:-1]], steps, strict=True):
        diff = "" if parent is None else "".join(difflib.unified_diff(
            (parent.code or "").splitlines(keepends=True), (c.code or "").splitlines(keepends=True),
            f"iteration {parent.iteration}", f"iteration {c.iteration}"))
        delta = None if parent is None or parent.val_accuracy is None else c.val_accuracy - parent.val_accuracy
        out.append({"iteration": c.iteration, "chain": c.chain, "problem": c.problem, "modification": c.modification,
                    "val_accuracy": c.val_accuracy, "delta": delta, "params": c.result.params if c.result else None,
                    "diff": diff})
    return out


def cost(candidates: list[Candidate]) -> dict:
    """LLM calls, tokens and seconds, and evaluator seconds: in total, per iteration and per improvement."""
    done = finished(candidates)
    total = {"iterations": len(done), "improvements": sum(c.is_best for c in done),
             "llm_calls": sum(len(c.llm_calls) for c in done), "tokens_in": sum(c.tokens_in for c in done),
             "tokens_out": sum(c.tokens_out for c in done), "llm_seconds": sum(c.llm_seconds for c in done),
             "eval_seconds": sum(c.eval_seconds for c in done)}
    per = {f"{k}_per_iteration": v / total["iterations"] if total["iterations"] else None
           for k, v in total.items() if k not in ("iterations", "improvements")}
    per_improvement = {f"{k}_per_improvement": v / total["improvements"] if total["improvements"] else None
                       for k, v in total.items() if k in ("llm_calls", "tokens_in", "tokens_out", "llm_seconds", "eval_seconds")}
    return {**total, **per, **per_improvement}


def ranks(values) -> np.ndarray:
    """Ranks with ties averaged, as Spearman's coefficient needs."""
    values = np.asarray(values, float)
    order = values.argsort(kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def spearman(x, y) -> float | None:
    """Spearman's rank correlation; None for fewer than 3 pairs or a constant side (no ranking to agree with)."""
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 3 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


PROXIES = {"macs": "MACs", "params": "parameters", "latency_ms": "this machine's latency (onnxruntime, batch 1)"}


def proxy_agreement(candidates: list[Candidate]) -> list[dict]:
    """How well each cost measured without the device ranks candidates as the target latency does (Spearman over
    the candidates measured on the target, over-budget ones included): what to trust when no device is attached."""
    measured = [c for c in candidates if c.result and c.result.target and c.result.target.status == "measured"]
    rows = []
    for name, label in PROXIES.items():
        pairs = [(getattr(c.result, name), c.result.target.p50_ms) for c in measured
                 if getattr(c.result, name) is not None]
        rho = spearman(*zip(*pairs, strict=True)) if pairs else None
        rows.append({"proxy": name, "label": label, "n": len(pairs), "spearman": rho})
    return rows
