"""The search loop: improver -> generator -> evaluator -> memory -> best, until a stop condition.

search.chains independent lineages (each with its own best, memory window and LLM context) run side by side over
search.workers evaluation slots: one chain's proposal is written while another's candidate trains. One chain and
one worker is the paper's serial loop. The loop holds no state of its own: the archive is the truth (a proposal is
in it before it is measured), so a killed run resumes where it stood without asking the LLM again.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

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


def best_of(archive, chain: int) -> Candidate | None:
    """A chain's best, the bar its candidates are promoted over: the run's best until it has one of its own."""
    return archive.best(chain) or archive.best()


def context(archive, chain: int, cfg: SearchConfig, choose_parent=None, draw: int = 0) -> Context:
    """What a chain's next proposal builds on: its best, the run's best when the chain stalled (search.adopt_after)
    or, with `choose_parent(archive, draw)` (search.parent front), a program of the accuracy-size front; its last
    attempt and its memory window."""
    k = cfg.history_size
    recent = archive.recent(max(1, k), chain)
    best, run_best = best_of(archive, chain), archive.best()
    adopted = bool(cfg.adopt_after and best and run_best.val_accuracy > best.val_accuracy
                   and archive.stalled(chain) >= cfg.adopt_after)
    best = run_best if adopted else best
    parent = (choose_parent(archive, draw) if choose_parent and best else None) or best
    # a chain's first attempt follows the program it starts from: that is its latest attempt until it has its own
    return Context(parent, recent[-1] if recent else best, memory.window([c.triple for c in recent], k),
                   front=parent is not best, adopted=adopted)


def triage(iteration: int, chain: int, proposal: Proposal, ctx: Context, archive) -> Candidate:
    """A proposal as the archive first holds it: final when the LLM failed, sent no code, was cut off or repeated an
    earlier program (in flight ones included); otherwise pending, to be measured."""
    common = dict(iteration=iteration, chain=chain, problem=proposal.problem, modification=proposal.modification,
                  code=proposal.code, parent=ctx.best.iteration if ctx.best else None, adopted=ctx.adopted,
                  prompts=proposal.prompts,
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
    return Candidate(status="pending", code_hash=digest, outcome=Outcome(status="pending"), **common)


def confirm(code: str, result: EvalResult, best: Candidate | None, evaluator, cfg: SearchConfig) -> list[EvalResult]:
    """Re-runs with other seeds of a candidate that beats the best by less than search.confirm_margin: a lucky seed
    would otherwise become the parent of every later candidate."""
    if not (cfg.confirm_margin and best is not None and result.ok
            and 0 < result.val_accuracy - best.val_accuracy < cfg.confirm_margin):
        return []
    return [evaluator.evaluate(code, run=k) for k in range(1, cfg.confirm_runs + 1)]


def measure(pending: Candidate, best: Candidate | None, evaluator, cfg: SearchConfig, targets=None) -> Candidate:
    """A pending candidate's measured record; `best` is its chain's best, the bar for promotion. With `targets`
    (edgenas/target.py) its graph is kept for the device agent."""
    start = time.perf_counter()
    result = evaluator.evaluate(pending.code)
    graph = evaluator.last_graph
    reruns = confirm(pending.code, result, best, evaluator, cfg)
    best_accuracy = best.val_accuracy if best else None
    is_best = result.ok and all(r.ok for r in reruns) and (best_accuracy is None or mean_accuracy(result, reruns) > best_accuracy)
    measured = pending.model_copy(update=dict(
        status=result.status.value, result=result, reruns=reruns, is_best=is_best, eval_seconds=time.perf_counter() - start,
        outcome=memory.outcome_of(result, best_accuracy, reruns)))
    return targets.prepare(measured, graph) if targets else measured


def run(archive, proposer, evaluators, cfg: SearchConfig, seed_program: str | None = None, on_iteration=None,
        choose_parent=None, targets=None) -> str:
    """Iterate until a stop condition, then let what is in flight finish; returns the reason. Safe to call again on
    the same archive. Raises LLMUnavailable after search.max_llm_errors LLM errors in a row. `targets` measures the
    valid candidates' target latency on device agents in the background."""
    started, errors, reason, llm_down = time.monotonic(), 0, None, False  # errors: this session's only
    free, stopping = queue.SimpleQueue(), threading.Event()  # evaluation slots: each measurement holds one
    for evaluator in evaluators:
        free.put(evaluator)

    def measure_on_a_free_slot(pending: Candidate, best: Candidate | None) -> Candidate | None:
        evaluator = free.get()
        try:
            return None if stopping.is_set() else measure(pending, best, evaluator, cfg, targets)
        finally:
            free.put(evaluator)

    def propose(ctx: Context, draw: int) -> tuple[Proposal, Context]:
        if draw < 0:
            return Proposal("seed program", "evaluate the program given with --seed-program", seed_program), ctx
        return proposer.propose(ctx, draw), ctx

    draws = {chain: archive.proposals(chain) for chain in range(cfg.chains)}  # seeds the LLM calls: reproducible
    seeding = seed_program is not None and archive.next_iteration() == 0  # the seed program is iteration 0
    tasks: dict = {}  # future -> (chain, kind): a chain has one thing in flight, its proposal or its measurement
    pool = ThreadPoolExecutor(max_workers=cfg.chains + len(archive.pending()))
    try:
        for pending in archive.pending():  # a killed run's proposals: measured now, never asked of the LLM again
            tasks[pool.submit(measure_on_a_free_slot, pending, best_of(archive, pending.chain))] = (pending.chain, "measure")
        while True:
            reason = reason or stop_reason(archive, cfg, time.monotonic() - started)
            # until a first candidate is measured, the other chains wait: they start from the run's best, not from
            # scratch, where they would write the same first program again and again
            for chain in range(cfg.chains if archive.recent(1) else 1):
                busy = {c for c, _ in tasks.values()}
                proposing = sum(kind == "propose" for _, kind in tasks.values())
                if reason or chain in busy or archive.next_iteration() + proposing >= cfg.iterations:
                    continue
                draw = -1 if seeding and chain == 0 else draws[chain] * cfg.chains + chain
                ctx = context(archive, chain, cfg, choose_parent, draw)
                tasks[pool.submit(propose, ctx, draw)] = (chain, "propose")
                draws[chain] += 1
                seeding = False
            if not tasks:
                break
            for future in wait(tasks, return_when=FIRST_COMPLETED).done:
                chain, kind = tasks.pop(future)
                if kind == "propose":
                    proposal, ctx = future.result()
                    candidate = triage(archive.next_iteration(), chain, proposal, ctx, archive)
                    archive.add(candidate)
                    if candidate.status == "pending":
                        tasks[pool.submit(measure_on_a_free_slot, candidate, best_of(archive, chain))] = (chain, "measure")
                        continue
                else:
                    candidate = future.result()
                    archive.add(candidate)
                    if targets:
                        targets.submit(candidate)
                if on_iteration is not None:
                    on_iteration(candidate, archive)
                errors = errors + 1 if candidate.status == "llm_error" else 0
                if cfg.max_llm_errors is not None and errors >= cfg.max_llm_errors and not llm_down:
                    reason, llm_down = f"stopped after {errors} LLM errors in a row; the last: {candidate.outcome.diagnostic}", True
    except BaseException:  # Ctrl-C or a crash: leave at once; what was in flight stays pending for the resume
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    archive.event("stop", reason=reason)
    if llm_down:
        raise LLMUnavailable(reason)
    return reason
