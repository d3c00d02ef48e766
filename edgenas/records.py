"""The typed records every stage shares.

The sandboxed worker sends plain dicts; the host turns them into these frozen records, so a
malformed or hostile reply is rejected at the border instead of travelling through the loop.
"""

from __future__ import annotations

from enum import Enum

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


class EvalResult(Record):
    """Everything the evaluator measured about one candidate."""

    status: Status
    failure: Failure | None = None
    stage: str | None = None  # the stage that failed, or the last one reached
    params: int | None = None
    macs: int | None = None
    macs_unsupported_ops: dict[str, int] = {}
    macs_flop_counter: int | None = None  # cross-check: torch.utils.flop_counter FLOPs / 2
    weight_bytes: int | None = None
    peak_memory_bytes: int | None = None
    val_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    val_loss: float | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    train_seconds: float | None = None
    train_images: int | None = None
    latency_ms: float | None = None
    device: str = "cpu"
    dataset: str = ""
    constructor: str | None = None  # which Net(...) form the evaluator used
    isolation: list[str] = []
    stage_seconds: dict[str, float] = {}
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.ok


def failed(kind: FailureKind, message: str, **fields) -> EvalResult:
    """A failure record; the message is clipped so a flood of text cannot bloat a prompt."""
    return EvalResult(status=Status.failed, failure=Failure(kind=kind, message=message[:4000]), **fields)
