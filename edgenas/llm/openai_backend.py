"""Any OpenAI-compatible chat endpoint (vLLM, Ollama, llama.cpp, hosted APIs) through the `openai` client.

Retries are done here rather than by the client so that untidy bodies (not JSON, no choices) are retried too and
every failure ends as one LLMError line the loop can record.
"""

from __future__ import annotations

import json
import os
import time

import openai

from ..config import LLMConfig
from .base import LLMError, LLMSetupError, Message, Reply, Sampling


class _Retry(Exception):
    """A failure worth another try: connection, timeout, 429, 5xx, or a body we cannot read."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _estimate_tokens(text: str) -> int:
    """About four characters a token: used only when the server sends no usage."""
    return len(text) // 4


class OpenAIChat:
    """Chat over HTTP. `backoff_s` is the first wait between tries; it doubles each time."""

    def __init__(self, cfg: LLMConfig, backoff_s: float = 1.0):
        if not cfg.model:
            raise LLMSetupError("llm.model: the openai backend needs the served model name")
        if cfg.api_key_env is None:
            key = "EMPTY"  # local servers ignore the key, but the client insists on one
        else:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise LLMSetupError(f"environment variable {cfg.api_key_env} (named by llm.api_key_env) is not set")
        self.cfg = cfg
        self.backoff_s = backoff_s
        self.identity = f"openai:{cfg.model}"
        self._where = f"{cfg.model} at {cfg.base_url or 'the default OpenAI endpoint'}"
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self._url = str(self._client.base_url).rstrip("/")

    def check(self) -> None:
        """GET /models proves the URL, the key and the model name in one request; a server without that route
        gets a one-token completion instead. Overload (429, 5xx) passes: the loop's retries deal with it."""
        try:
            served = [m.id for m in self._client.models.list()]
        except openai.APIConnectionError as e:
            raise LLMSetupError(self._unreachable(e)) from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise LLMSetupError(self._rejected(e.status_code)) from None
            self._probe()
            return
        if self.cfg.model not in served:
            offered = ", ".join(served[:20]) + (f" and {len(served) - 20} more" if len(served) > 20 else "")
            raise LLMSetupError(
                f"model {self.cfg.model!r} is not served at {self._url}; it serves: {offered or 'nothing'}")

    def _probe(self) -> None:
        try:
            self._client.chat.completions.create(model=self.cfg.model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=1)
        except openai.APIConnectionError as e:
            raise LLMSetupError(self._unreachable(e)) from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise LLMSetupError(self._rejected(e.status_code)) from None
            if e.status_code == 429 or e.status_code >= 500:
                return
            detail = e.body.get("message") if isinstance(e.body, dict) else e.body
            what = f"model {self.cfg.model!r} not found" if e.status_code == 404 else f"model {self.cfg.model!r}"
            raise LLMSetupError(f"{what} at {self._url}: HTTP {e.status_code}: {_one_line(detail or '')}") from None

    def _unreachable(self, e: openai.APIConnectionError) -> str:
        if isinstance(e, openai.APITimeoutError):
            return f"the LLM endpoint {self._url} gave no reply within {self.cfg.timeout_s:g} s"
        return f"cannot reach the LLM endpoint {self._url} ({_one_line(e.__cause__ or e)})"

    def _rejected(self, status: int) -> str:
        if self.cfg.api_key_env:
            return f"the key in ${self.cfg.api_key_env} was rejected by {self._url} (HTTP {status})"
        return f"{self._url} wants a key (HTTP {status}): name the variable that holds it with llm.api_key_env"

    def chat(self, messages: list[Message], sampling: Sampling) -> Reply:
        start = time.perf_counter()
        tries = self.cfg.retries + 1
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                text, finish, usage = self._request(messages, sampling)
            except _Retry as e:
                why = str(e)
                continue
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            return Reply(
                text=text,
                tokens_in=prompt if isinstance(prompt, int) else _estimate_tokens("".join(m["content"] for m in messages)),
                tokens_out=completion if isinstance(completion, int) else _estimate_tokens(text),
                seconds=time.perf_counter() - start,
                truncated=finish == "length",
            )
        raise LLMError(f"{self._where}: gave up after {tries} tries: {why}")

    def _request(self, messages: list[Message], sampling: Sampling) -> tuple[str, str | None, dict]:
        """One HTTP call -> (text, finish_reason, usage). Raises _Retry or, for failures that will not pass, LLMError."""
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.cfg.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, seed=sampling.seed)
        except openai.APITimeoutError:
            raise _Retry(f"no reply within {self.cfg.timeout_s:g} s") from None
        except openai.APIConnectionError as e:
            raise _Retry(f"cannot connect ({_one_line(e)})") from None
        except openai.APIStatusError as e:
            detail = e.body.get("message") if isinstance(e.body, dict) else e.body
            message = f"HTTP {e.status_code}" + (f": {_one_line(detail)}" if detail else "")
            if e.status_code == 429 or e.status_code >= 500:
                raise _Retry(message) from None
            raise LLMError(f"{self._where}: {message}") from None
        try:
            body = json.loads(raw.text)
        except ValueError:
            raise _Retry(f"reply body is not JSON ({_one_line(raw.text, 60)!r})") from None
        choices = body.get("choices") if isinstance(body, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise _Retry("reply has no choices")
        message = choices[0].get("message")
        text = message.get("content") if isinstance(message, dict) else None
        usage = body.get("usage")
        return text if isinstance(text, str) else "", choices[0].get("finish_reason"), usage if isinstance(usage, dict) else {}
