"""The search loop: improver -> generator -> evaluator -> memory -> best, until a stop condition.

It talks only to narrow interfaces (proposer, evaluator, archive) and holds no state of its own:
the archive is the truth, so a killed run resumes where its last completed iteration left it.
"""

from __future__ import annotations

import time

from edgenas import memory
from edgenas.candidate import code_hash
from edgenas.config import SearchConfig
from edgenas.propose import Context, Proposal
from edgenas.records import Candidate, EvalResult, Outcome, mean_accuracy


class LLMUnavailable(RuntimeError):
    """search.max_llm_errors iterations in a row ended in an LLM error: the endpoint is down or refusing, not flaky."""


def stop_reason(archive, cfg: SearchConfig, elapsed_s: float) -> str | None:
    best = archive.best()
    if archive.next_iteration() >= cfg.iterations:
        return f"reached {cfg.iterations} iterations"
    if cfg.max_wall_s is not None and elapsed_s >= cfg.max_wall_s:
        return f"reached the wall-time limit of {cfg.max_wall_s:g} s"
    if cfg.target_accuracy is not None and best is not None and best.val_accuracy >= cfg.target_accuracy:
        return f"reached the target accuracy {cfg.target_accuracy:.2%}"
    if cfg.patience is not None and archive.since_best() >= cfg.patience:
        return f"no improvement in {cfg.patience} iterations"
    return None


def confirm(code: str, result: EvalResult, best: Candidate | None, evaluator, cfg: SearchConfig) -> list[EvalResult]:
    """Re-runs with other seeds of a candidate that beats the best by less than search.confirm_margin: a lucky seed
    would otherwise become the parent of every later candidate."""
    if not (cfg.confirm_margin and best is not None and result.ok
            and 0 < result.val_accuracy - best.val_accuracy < cfg.confirm_margin):
        return []
    return [evaluator.evaluate(code, run=k) for k in range(1, cfg.confirm_runs + 1)]


def assess(iteration: int, proposal: Proposal, best: Candidate | None, archive, evaluator, cfg: SearchConfig) -> Candidate:
    """Turn a proposal into an archived candidate: LLM failure, no code, duplicate, or an evaluation."""
    common = dict(iteration=iteration, problem=proposal.problem, modification=proposal.modification,
                  code=proposal.code, parent=best.iteration if best else None, prompts=proposal.prompts,
                  replies=proposal.replies, tokens_in=proposal.tokens_in, tokens_out=proposal.tokens_out,
                  llm_seconds=proposal.llm_seconds, llm_calls=proposal.calls, created=time.time())
    if proposal.error is not None:
        return Candidate(status="llm_error", outcome=Outcome(status="llm_error", kind="llm_error", diagnostic=proposal.error), **common)
    if proposal.cut_off is not None:
        return Candidate(status="truncated", outcome=Outcome(status="truncated", kind="truncated",
                                                             diagnostic=proposal.cut_off), **common)
    if proposal.code is None:
        return Candidate(status="no_code", outcome=Outcome(status="no_code", kind="no_code",
                         diagnostic="the reply contained no Python code; reply with the complete module in a ```python block"), **common)
    digest = code_hash(proposal.code)
    earlier = archive.find_hash(digest)
    if earlier is not None:
        return Candidate(status="duplicate", code_hash=digest, duplicate_of=earlier, outcome=Outcome(
            status="duplicate", kind="duplicate", diagnostic=f"identical to iteration {earlier}; make a different change"), **common)
    start = time.perf_counter()
    result = evaluator.evaluate(proposal.code)
    reruns = confirm(proposal.code, result, best, evaluator, cfg)
    best_accuracy = best.val_accuracy if best else None
    accuracy = mean_accuracy(result, reruns)
    is_best = (result.ok and all(r.ok for r in reruns)
               and (best_accuracy is None or accuracy > best_accuracy))
    return Candidate(status=result.status.value, code_hash=digest, result=result, reruns=reruns, is_best=is_best,
                     outcome=memory.outcome_of(result, best_accuracy, reruns), eval_seconds=time.perf_counter() - start,
                     **common)


def run(archive, proposer, evaluator, cfg: SearchConfig, seed_program: str | None = None, on_iteration=None) -> str:
    """Iterate until a stop condition; returns the reason. Safe to call again on the same archive.
    Raises LLMUnavailable after search.max_llm_errors LLM errors in a row."""
    started = time.monotonic()
    errors = 0  # in this session only: a resumed run gives a repaired endpoint a fresh chance
    while (reason := stop_reason(archive, cfg, time.monotonic() - started)) is None:
        iteration = archive.next_iteration()
        best = archive.best()
        recent = archive.recent(max(1, cfg.history_size))
        context = Context(best, recent[-1] if recent else None, memory.window([c.triple for c in recent], cfg.history_size))
        if iteration == 0 and seed_program is not None:
            proposal = Proposal("seed program", "evaluate the program given with --seed-program", seed_program)
        else:
            proposal = proposer.propose(context, iteration)
        candidate = assess(iteration, proposal, best, archive, evaluator, cfg)
        archive.add(candidate)
        if on_iteration is not None:
            on_iteration(candidate, archive)
        errors = errors + 1 if candidate.status == "llm_error" else 0
        if cfg.max_llm_errors is not None and errors >= cfg.max_llm_errors:
            reason = f"stopped after {errors} LLM errors in a row; the last: {candidate.outcome.diagnostic}"
            archive.event("stop", reason=reason)
            raise LLMUnavailable(reason)
    archive.event("stop", reason=reason)
    return reason
