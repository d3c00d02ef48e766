"""Proposers: where the next program comes from. The paper's two LLM roles, or the mutate baseline."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field

from edgenas import redact
from edgenas.extract import extract_code, extract_json
from edgenas.llm.base import ChatModel, LLMError, Reply, Sampling
from edgenas.prompts import Task, generator_messages, improver_messages
from edgenas.records import Candidate, Triple

RETRY_JSON = 'Reply with only the JSON object: {"problem": "...", "modification": "..."}'
FALLBACK_MODIFICATION = "Make one well-motivated change to the best model that should raise validation accuracy within the budgets."
NO_IMPROVER = ("(improver disabled: generator alone)", "Improve the model's validation accuracy within the budgets.")
FIRST = ("no valid model yet", "write a first model for the task")
CUT_OFF = ("your reply was cut off at the token limit ({limit} new tokens) before the module ended, so it was not "
           "evaluated; write a shorter module: fewer comments, no explanation, repeated blocks built in a loop")


@dataclass(frozen=True)
class Context:
    best: Candidate | None  # the parent: what the change is applied to
    last: Candidate | None
    history: list[Triple]  # the memory window, already cut to K
    front: bool = False  # the parent was drawn from the accuracy-size front rather than being the best
    adopted: bool = False  # the parent is another chain's best, taken over because this chain stagnated


@dataclass
class Proposal:
    problem: str
    modification: str
    code: str | None = None
    prompts: list = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    llm_seconds: float = 0.0
    calls: list[dict] = field(default_factory=list)  # per LLM call: role, tokens, seconds, cache hit
    error: str | None = None  # the LLM failed for good; recorded as an outcome, the loop goes on
    cut_off: str | None = None  # the generator's reply stopped at the token limit: the diagnostic for the LLM


class LLMProposer:
    """Prompt Improver (diagnose, propose one change) then Code Generator (apply it to the best model)."""

    def __init__(self, generator: ChatModel, improver: ChatModel, generator_sampling: Sampling,
                 improver_sampling: Sampling, task: Task, use_improver: bool = True, use_reference: bool = True,
                 seed: int = 0):
        self.generator, self.improver = generator, improver
        self.generator_sampling, self.improver_sampling = generator_sampling, improver_sampling
        self.task, self.use_improver, self.use_reference, self.seed = task, use_improver, use_reference, seed

    def check(self) -> None:
        """Raise LLMSetupError unless both roles can answer (see ChatModel.check)."""
        self.generator.check()
        if self.improver is not self.generator:
            self.improver.check()

    def _call(self, role: str, messages: list[dict], seed: int, proposal: Proposal) -> Reply:
        """One LLM call. Secrets are scrubbed from the prompt, and from the reply before anything reads it, so
        a key the endpoint echoes (it sees the Authorization header) reaches neither the code nor the next prompt."""
        model, sampling = (self.improver, self.improver_sampling) if role == "improver" else (self.generator, self.generator_sampling)
        messages = redact.scrub_data(messages)
        reply = model.chat(messages, Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
        reply = dataclasses.replace(reply, text=redact.scrub(reply.text))
        proposal.calls.append({"role": role, "tokens_in": reply.tokens_in, "tokens_out": reply.tokens_out,
                               "seconds": round(reply.seconds, 3), "cached": reply.cached, "truncated": reply.truncated})
        proposal.prompts.append(messages)
        proposal.replies.append(reply.text)
        proposal.tokens_in += reply.tokens_in
        proposal.tokens_out += reply.tokens_out
        proposal.llm_seconds += reply.seconds
        return reply

    def _improve(self, ctx: Context, seed: int, proposal: Proposal) -> None:
        messages = improver_messages(self.task, ctx.best, ctx.last, ctx.history, ctx.front)
        reply = self._call("improver", messages, seed, proposal)
        parsed = extract_json(reply.text)
        if parsed is None:  # ask once more, then fall back to a recorded generic change
            retry = [*messages, {"role": "assistant", "content": reply.text}, {"role": "user", "content": RETRY_JSON}]
            parsed = extract_json(self._call("improver", retry, seed + 1, proposal).text)
        if parsed is None:
            parsed = {"problem": "(fallback: the improver's reply could not be parsed)", "modification": FALLBACK_MODIFICATION}
        proposal.problem, proposal.modification = parsed["problem"], parsed["modification"]

    def propose(self, ctx: Context, iteration: int) -> Proposal:
        seed = self.seed * 1_000_003 + iteration * 4  # a seed per call: a run reproduces call for call
        proposal = Proposal(*(FIRST if ctx.best is None else NO_IMPROVER))
        try:
            if ctx.best is not None and self.use_improver:
                self._improve(ctx, seed, proposal)
            messages = generator_messages(self.task, ctx.best, proposal.modification, ctx.history, self.use_reference,
                                          ctx.front)
            reply = self._call("generator", messages, seed + 2, proposal)
            extracted = extract_code(reply.text, cut_off=reply.truncated)
            proposal.code = extracted.code
            if extracted.truncated:
                proposal.cut_off = CUT_OFF.format(limit=self.generator_sampling.max_tokens)
        except LLMError as e:
            proposal.error = redact.scrub(str(e))
        return proposal


class MutationProposer:
    """The no-LLM baseline: one random structural edit of the best program per iteration."""

    def __init__(self, seed: int = 0):
        from edgenas.llm.mutate import MutateProposer

        self.mutator, self.seed = MutateProposer(), seed

    def check(self) -> None:
        """Nothing to reach: the mutator runs in this process."""

    def propose(self, ctx: Context, iteration: int) -> Proposal:
        start = time.perf_counter()
        rng = random.Random(self.seed * 1_000_003 + iteration)
        problem, modification, code = self.mutator.propose(ctx.best.code if ctx.best else None, rng)
        return Proposal(problem, modification, code, llm_seconds=time.perf_counter() - start)
