"""LLM backends behind one ChatModel protocol. Backends import lazily: transformers alone takes seconds to import."""

from __future__ import annotations

from pathlib import Path

from ..config import LLMConfig
from .base import ChatModel, LLMError, LLMSetupError, Message, Reply, Sampling

__all__ = ["ChatModel", "LLMError", "LLMSetupError", "Message", "Reply", "Sampling", "make_chat_model"]


def make_chat_model(cfg: LLMConfig, cache_path: str | Path | None = None) -> ChatModel:
    """The backend `cfg` names, behind the reply cache when `cache_path` is given."""
    if cfg.backend == "transformers":
        from .transformers_backend import TransformersChat

        model: ChatModel = TransformersChat(cfg)
    elif cfg.backend == "openai":
        from .openai_backend import OpenAIChat

        model = OpenAIChat(cfg)
    else:
        raise ValueError(f"llm backend {cfg.backend!r} is not a chat model (the search loop runs it itself)")
    if cache_path is not None:
        from .cache import CachedChat

        model = CachedChat(model, cache_path)
    return model
