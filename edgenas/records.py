"""The typed records every stage shares.

The sandboxed worker sends plain dicts; the host turns them into these frozen records, so a
malformed or hostile reply is rejected at the border instead of travelling through the loop.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Status(str, Enum):
    ok = "ok"
    failed = "failed"


class FailureKind(str, Enum):
    """Why a candidate failed, cheapest stage first. The list is fixed: prompts and analyses key on it."""

    syntax = "syntax"
    contract = "contract"
    forbidden = "forbidden"
    build = "build"
    export = "export"  # the model does not export to ONNX, or its graph is refused (control flow, custom ops)
    forward = "forward"
    shape = "shape"
    budget = "budget"
    oom = "oom"
    timeout = "timeout"
    nan = "nan"
    runtime = "runtime"
    crashed = "crashed"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Failure(Record):
    kind: FailureKind
    message: str = Field(max_length=4000)


class TargetLatency(Record):
    """Latency where the model will run (the `target` config section): onnxruntime on a device agent, or on this
    machine. A measurement that could not be made yet is kept as `waiting`, with why, and made later."""

    status: Literal["measured", "waiting", "failed"]  # failed: the target refused the model; it is not asked again
    p50_ms: float | None = None
    p90_ms: float | None = None
    precision: Literal["fp32", "int8"] = "fp32"
    threads: int = 1
    batch: int = 1
    agent: str = "local"  # the agent's URL, or local (onnxruntime in the trusted worker)
    device: str = ""  # what measured it: CPU, cores, onnxruntime version
    reason: str | None = None  # why it is not measured (yet)
    attempts: int = 0

    def render(self) -> str | None:
        """For prompts and the terminal: the p50 with the settings that give it meaning (None while waiting)."""
        if self.status == "measured":
            return f"{self.p50_ms:.2f} ms on the target ({self.precision}, batch {self.batch}, {self.threads} thread(s))"
        return f"not measurable on the target ({self.reason})" if self.status == "failed" else None


class EvalResult(Record):
    """Everything the evaluator measured about one candidate.

    params, MACs, memory, accuracy, loss and latency come from the trusted side (the candidate's exported graph,
    measured on validation images the candidate never had); the train_* fields are the jailed job's own account.
    """

    status: Status
    failure: Failure | None = None
    stage: str | None = None  # the stage that failed, or the last one reached
    params: int | None = None  # weights of the exported graph (BatchNorm folded into its convolution)
    macs: int | None = None  # per image, counted on the graph
    macs_uncounted_ops: dict[str, int] = {}  # graph ops with compute the count leaves out
    weight_bytes: int | None = None
    peak_memory_bytes: int | None = None  # one training step, estimated from the graph: weights x3 + activations
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    val_loss: float | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    train_seconds: float | None = None
    train_images: int | None = None
    seed: int | None = None  # the training seed (initialisation and batch order)
    latency_ms: float | None = None  # onnxruntime, batch 1, eval.latency_threads threads, median
    target: TargetLatency | None = None  # with a `target` section: latency on the deployment target
    artifact_sha256: str | None = None  # the trained graph that was measured
    device: str = "cpu"
    dataset: str = ""
    constructor: str | None = None  # which Net(...) form the evaluator used
    isolation: list[str] = []  # the jail's layers, as the zygote read them from /proc before the job ran
    memory_cap_bytes: int | None = None  # the job's address-space cap (None: none, e.g. on CUDA)
    memory_cap_source: str | None = None  # "eval.memory_limit_mb", or "inherited limit" when a ulimit -v was lower
    stage_seconds: dict[str, float] = {}
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.ok


def failed(kind: FailureKind, message: str, **fields) -> EvalResult:
    """A failure record; the message is clipped so a flood of text cannot bloat a prompt."""
    return EvalResult(status=Status.failed, failure=Failure(kind=kind, message=message[:4000]), **fields)


def mean_accuracy(result: EvalResult, reruns: list[EvalResult]) -> float | None:
    """A valid candidate's accuracy: the mean over its runs that finished, when it was re-run with other seeds."""
    if not result.ok:
        return None
    runs = [r.val_accuracy for r in (result, *reruns) if r.ok]
    return sum(runs) / len(runs)


class Outcome(Record):
    """What an attempt led to, as the feedback memory shows it to the LLM."""

    status: str  # ok | failed | duplicate | no_code | truncated | llm_error
    val_accuracy: float | None = None  # the mean over `runs` when the candidate was re-run
    runs: list[float] = []  # each seed's accuracy, when a close win was re-run (search.confirm_margin)
    delta: float | None = None  # accuracy change against the best at the time (fraction)
    params: int | None = None
    macs: int | None = None
    peak_memory_bytes: int | None = None
    target: str | None = None  # the target latency, rendered (TargetLatency.render), once measured
    kind: str | None = None  # failure kind (FailureKind values, or the search-level statuses)
    diagnostic: str | None = None

    def render(self) -> str:
        if self.status == "ok":
            delta = "" if self.delta is None else f" ({self.delta * 100:+.2f} points vs the best)"
            seeds = f" (mean of {len(self.runs)} seeds: {', '.join(f'{a:.2%}' for a in self.runs)})" if self.runs else ""
            size = ", ".join(part for part in (
                f"{self.params:,} params" if self.params is not None else "",
                f"{self.macs / 1e6:.1f}M MACs" if self.macs is not None else "",
                f"{self.peak_memory_bytes / 2**20:.0f} MiB train-step memory" if self.peak_memory_bytes else "",
                self.target or "",
            ) if part)
            note = f"; {self.diagnostic}" if self.diagnostic else ""
            return f"valid: validation accuracy {self.val_accuracy:.2%}{seeds}{delta}; {size}{note}"
        return f"FAILED ({self.kind}): {self.diagnostic}"


class Triple(Record):
    """One entry of the feedback memory: (problem identified, modification suggested, outcome)."""

    iteration: int
    problem: str
    modification: str
    outcome: Outcome


class Candidate(Record):
    """One iteration of a search, as the archive stores it."""

    iteration: int
    status: str  # ok | failed | duplicate | no_code | truncated | llm_error, or pending (proposed, not measured yet)
    chain: int = 0  # the lineage it belongs to (search.chains)
    code: str | None = None
    code_hash: str | None = None
    parent: int | None = None  # the iteration its code was derived from (its chain's best when it was proposed)
    adopted: bool = False  # its chain had stagnated and took over its parent, another chain's best (search.adopt_after)
    duplicate_of: int | None = None
    problem: str = ""
    modification: str = ""
    outcome: Outcome
    result: EvalResult | None = None
    reruns: list[EvalResult] = []  # the same code trained with other seeds: a close win is confirmed before promotion
    prompts: list = []  # the message lists sent, per LLM call
    replies: list[str] = []
    tokens_in: int = 0
    tokens_out: int = 0
    llm_seconds: float = 0.0
    llm_calls: list[dict] = []  # per call: role, tokens in/out, seconds, cache hit, truncated
    eval_seconds: float = 0.0
    is_best: bool = False  # promoted to best (the parent of what follows) when it was evaluated
    created: float = 0.0

    @property
    def triple(self) -> Triple:
        return Triple(iteration=self.iteration, problem=self.problem, modification=self.modification, outcome=self.outcome)

    @property
    def val_accuracy(self) -> float | None:
        return mean_accuracy(self.result, self.reruns) if self.result else None
