"""A local OpenAI-compatible chat server for tests: scripted replies, failures and delays, and a record of requests.

    with FakeOpenAI() as fake:                  # or the `fake_openai` fixture
        fake.script([error(500), reply("x = 1", usage=(30, 4))])
        cfg = LLMConfig(backend="openai", model="fake-model", base_url=fake.url)
        ...
        fake.requests[-1].body["seed"]          # what the client sent

Each POST to /v1/chat/completions takes the next scripted Response; once the script is used up the `responder`
callable answers (by default a good reply "ok"). GET /v1/models lists `model`. With `api_key` set, any request
without that bearer key gets a 401.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Response:
    """What the server sends: a dict body goes out as JSON, a str body as is; `delay` is waited first."""

    status: int = 200
    body: dict | str = field(default_factory=dict)
    delay: float = 0.0
    content_type: str = "application/json"


@dataclass
class Request:
    """One request received: `body` is the parsed JSON (None if it was not JSON); header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict | None

    @property
    def messages(self) -> list[dict]:
        return (self.body or {}).get("messages", [])


def reply(text: str = "ok", *, finish_reason: str = "stop", usage: tuple[int, int] | None = (12, 7),
          model: str = "fake-model") -> Response:
    """A well-formed chat completion; `usage` is (prompt_tokens, completion_tokens), None leaves it out."""
    body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return Response(body=body)


def untidy(text: str | None = "ok") -> Response:
    """A reply as sloppy servers send it: no id, no usage, no finish_reason, unknown fields; text may be None."""
    return Response(body={"choices": [{"message": {"content": text, "reasoning_content": None}, "logprobs": None}],
                          "system_fingerprint": None, "x_extra": {"a": 1}})


def error(status: int, message: str = "scripted failure") -> Response:
    return Response(status=status, body={"error": {"message": message, "type": "fake_error", "code": status}})


def garbage(text: str = "<html>upstream hiccup</html>", content_type: str = "application/json") -> Response:
    """A 200 whose body is not JSON, labelled as JSON by default (the nastiest case)."""
    return Response(body=text, content_type=content_type)


def no_choices() -> Response:
    return Response(body={"id": "chatcmpl-fake", "object": "chat.completion", "choices": []})


def delayed(seconds: float, response: Response | None = None) -> Response:
    """`response` (a good reply by default) after `seconds`: longer than the client's timeout makes it time out."""
    response = response or reply()
    return Response(response.status, response.body, seconds, response.content_type)


class FakeOpenAI:
    """The server, on 127.0.0.1 at a free port, in a thread. `start()` returns self; `stop()` ends waits at once."""

    def __init__(self, responder: Callable[[Request], Response] | None = None, model: str = "fake-model",
                 api_key: str | None = None):
        self.responder = responder or (lambda request: reply(model=model))
        self.model = model
        self.api_key = api_key
        self.requests: list[Request] = []
        self._queue: collections.deque[Response] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base URL for the client, ending in /v1."""
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, responses: Iterable[Response]) -> FakeOpenAI:
        """Queue responses for the next POSTs, in order."""
        with self._lock:
            self._queue.extend(responses)
        return self

    def start(self) -> FakeOpenAI:
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
            scripted = self._queue.popleft() if self._queue else None
        return scripted or self.responder(request)


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _rejected(self) -> bool:
            if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                self._send(error(401, "Incorrect API key provided"))
                return True
            return False

        def do_GET(self):
            if self._rejected():
                return
            if self.path.rstrip("/").endswith("/models"):
                self._send(Response(body={"object": "list", "data": [{"id": fake.model, "object": "model"}]}))
            else:
                self._send(error(404, f"no route {self.path}"))

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self._rejected():
                return
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(error(404, f"no route {self.path}"))
                return
            response = fake._answer(request)
            if response.delay and fake._stopping.wait(response.delay):
                return  # stopping: drop the reply
            self._send(response)

        def _send(self, response: Response) -> None:
            data = (json.dumps(response.body) if isinstance(response.body, dict) else response.body).encode()
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timed out) first

        def log_message(self, *args):
            pass  # keep test output clean

    return Handler


@pytest.fixture
def fake_openai():
    """A started FakeOpenAI, stopped after the test."""
    with FakeOpenAI() as server:
        yield server
