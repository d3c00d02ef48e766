"""A latency agent for the target device: it measures ONNX models sent to it, with only onnxruntime and numpy
installed (no torch), like exporters.bench.

    python -m exporters.agent --port 8765 --token-file token.txt [--host 0.0.0.0] [--max-mb 64]

    GET  /health                                   {"status": "ok"}
    POST /measure?threads=1&batch=1&runs=100&warmup=10
         Authorization: Bearer <the token>, body: the .onnx file
         -> {"p50_ms": ..., "p90_ms": ..., "mean_ms": ..., "min_ms": ..., "throughput_per_s": ..., "device": {...}}

It binds to 127.0.0.1 unless told otherwise, needs the shared token for /measure, and measures one model at a time
(concurrent runs would measure each other; the other requests wait). Whatever it is sent is checked (size, a model
onnxruntime loads with a float input, settings in range) and refused with a JSON error while the agent stays up.
The sender holds the token and is trusted not to send a model built to attack onnxruntime's parser.
"""

from __future__ import annotations

import argparse
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from exporters.bench import bench, device

LIMITS = {"threads": (1, 256), "batch": (1, 4096), "runs": (1, 100_000), "warmup": (0, 10_000)}
DEFAULTS = {"threads": 1, "batch": 1, "runs": 100, "warmup": 10}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def settings(query: str) -> dict:
    """threads, batch, runs, warmup from the query string, each an integer within LIMITS."""
    given = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise Refused(400, f"unknown setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    out = {}
    for name, default in DEFAULTS.items():
        try:
            value = int(given.get(name, default))
        except ValueError:
            raise Refused(400, f"{name} must be an integer, got {given[name]!r}") from None
        low, high = LIMITS[name]
        if not low <= value <= high:
            raise Refused(400, f"{name} must be between {low} and {high}, got {value}")
        out[name] = value
    return out


class Agent(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str, max_bytes: int):
        super().__init__(address, Handler)
        self.token, self.max_bytes = token, max_bytes
        self.one_at_a_time = threading.Lock()
        self.device = device()


class Handler(BaseHTTPRequestHandler):
    server: Agent

    def log_message(self, format, *args):  # noqa: A002 - one line per request on stderr, as the base class, shorter
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if urlsplit(self.path).path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "no such path; GET /health or POST /measure"})

    def do_POST(self):  # noqa: N802
        try:
            self._send(200, self._measure())
        except Refused as e:
            self.close_connection = True  # an unread body must not be taken for the next request
            self._send(e.status, {"error": str(e)})

    def _measure(self) -> dict:
        url = urlsplit(self.path)
        if url.path != "/measure":
            raise Refused(404, "no such path; GET /health or POST /measure")
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
            raise Refused(401, "missing or wrong token (Authorization: Bearer <token>)")
        wanted = settings(url.query)
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise Refused(411, "send the model with a Content-Length") from None
        if length > self.server.max_bytes:
            raise Refused(413, f"the model is {length:,} bytes; this agent takes at most {self.server.max_bytes:,}")
        model = self.rfile.read(length)
        if len(model) != length:
            raise Refused(400, "the body ended before Content-Length bytes")
        with self.server.one_at_a_time:
            started = time.time()
            try:
                result = bench(model, **wanted)
            except Exception as e:  # noqa: BLE001 - not ONNX, an unsupported input, a model that fails to run
                raise Refused(422, f"cannot measure this model: {' '.join(str(e).split())[:300]}") from None
            window = [started, time.time()]  # when it had the device to itself
        return {**result, "window": window, "device": self.server.device}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exporters.agent", description=__doc__.strip().splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", required=True, help="a file holding the shared token (one line)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--max-mb", type=float, default=64.0, help="the largest model accepted, in MB")
    args = p.parse_args(argv)
    try:
        token = open(args.token_file).read().strip()
    except OSError as e:
        p.error(f"cannot read --token-file: {e.strerror}")
    if len(token) < 16:
        p.error("the token must be at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_hex())')")
    agent = Agent((args.host, args.port), token, int(args.max_mb * 1e6))
    print(json.dumps({"listening": f"http://{args.host}:{agent.server_port}", **agent.device}), flush=True)
    agent.serve_forever()


if __name__ == "__main__":
    main()
