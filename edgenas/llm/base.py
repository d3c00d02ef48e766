"""One small protocol for every backend: messages in, a reply with its token counts and time out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class Reply:
    text: str
    tokens_in: int
    tokens_out: int
    seconds: float
    cached: bool = False
    truncated: bool = False  # stopped by the token limit


class LLMError(RuntimeError):
    """A call failed for good (after retries). The loop records it as an outcome and goes on."""


class LLMSetupError(RuntimeError):
    """The model cannot answer at all (endpoint, model name, key, weights): the run stops with this one line.

    Not an LLMError: retrying it every iteration would only fill the archive with identical failures."""


class ChatModel(Protocol):
    """A chat model. `identity` names it for the reply cache (backend, model and anything that changes replies)."""

    identity: str

    def check(self) -> None:
        """Raise LLMSetupError (one line) unless the model can answer; called before the first request."""

    def chat(self, messages: list[Message], sampling: Sampling) -> Reply: ...
