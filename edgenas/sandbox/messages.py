"""What a jailed job may say, as strict schemas: a message that does not fit is a failure, never a host traceback.

None of these carry a number the search ranks by; those are measured on the trusted side. Training losses and
times are the job's own account, kept for people, never used to rank or to check a budget.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgenas.records import FailureKind

Text = Annotated[str, Field(max_length=4000)]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Stage(Message):
    kind: Literal["stage"]
    stage: Literal["build", "forward", "profile", "train", "export"]


class Graph(Message):
    """An ONNX graph in the frame's payload: the untrained one (for the budgets) or the trained one (to score)."""

    kind: Literal["graph"]
    trained: bool


class Progress(Message):
    kind: Literal["progress"]
    epoch: int = Field(ge=0)
    epochs: int = Field(ge=0)
    loss: float | None = None


class Checkpoint(Message):
    """Training state after `epoch` (finalize), in the payload; handed back when an interrupted run resumes."""

    kind: Literal["checkpoint"]
    epoch: int = Field(ge=1)


class Weights(Message):
    """The trained state dict (finalize), in the payload: for people who want PyTorch weights."""

    kind: Literal["weights"]


class FailureInfo(Message):
    kind: FailureKind
    message: Text


class Result(Message):
    kind: Literal["result"]
    status: Literal["ok", "failed"]
    stage: str = Field(max_length=40)
    failure: FailureInfo | None = None
    constructor: Text | None = None
    channels_last: bool | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    train_seconds: float | None = Field(None, ge=0)
    train_images: int | None = Field(None, ge=0)
    parity: dict[str, float] | None = None  # finalize: the job's own torch-vs-onnxruntime check of its export
    torch_latency_ms: dict[str, float] | None = None  # finalize: eager latency as the job measured it


class Error(Message):
    """The job's last words when something escaped every stage (a traceback tail)."""

    kind: Literal["error"]
    message: Text


JobMessage = Annotated[Stage | Graph | Progress | Checkpoint | Weights | Result | Error, Field(discriminator="kind")]
_adapter = TypeAdapter(JobMessage)


def parse(header: dict) -> Message:
    """Raises ValueError with one line when the header is not one of the messages above."""
    try:
        return _adapter.validate_python(header)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"the job sent an invalid message ({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
