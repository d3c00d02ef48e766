"""Frames between edgenas processes: a JSON header and an optional binary payload (an ONNX graph, a checkpoint).

    frame = u32 header length | u32 payload length | header (JSON object) | payload

Every reader bounds both lengths before it allocates, and a frame that is not a JSON object is an error, never
a crash: the peer may be a jailed job writing whatever it likes into its pipe.
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

PREFIX = struct.Struct(">II")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30


class WireError(RuntimeError):
    """The peer sent something that is not a frame."""


@dataclass(frozen=True)
class Frame:
    header: dict
    payload: bytes = b""

    @property
    def kind(self):
        return self.header.get("kind")


def encode(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header, default=str).encode()
    return PREFIX.pack(len(text), len(payload)) + text + payload


def write(fd: int, header: dict, payload: bytes = b"") -> None:
    view = memoryview(encode(header, payload))
    while view:
        view = view[os.write(fd, view):]


class Reader:
    """Turns a byte stream into frames, however it is chunked."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload, self.buffer = max_payload, bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= PREFIX.size:
            head, body = PREFIX.unpack_from(self.buffer)
            if head > MAX_HEADER or body > self.max_payload:
                raise WireError(f"a frame of {head} + {body} bytes is over the limit")
            end = PREFIX.size + head + body
            if len(self.buffer) < end:
                break
            try:
                header = json.loads(bytes(self.buffer[PREFIX.size : PREFIX.size + head]))
            except (ValueError, RecursionError) as e:  # RecursionError: '[' nested a hundred thousand deep
                raise WireError(f"a frame header is not JSON ({type(e).__name__})") from None
            if not isinstance(header, dict):
                raise WireError("a frame header is not a JSON object")
            frames.append(Frame(header, bytes(self.buffer[PREFIX.size + head : end])))
            del self.buffer[:end]
        return frames


class Channel:
    """Frames over a pair of file descriptors; `pending` holds frames read but not yet taken."""

    def __init__(self, read_fd: int, write_fd: int | None, max_payload: int = MAX_PAYLOAD):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.reader, self.pending = Reader(max_payload), []
        self.closed = False

    def fileno(self) -> int:
        return self.read_fd

    def send(self, header: dict, payload: bytes = b"") -> None:
        try:
            write(self.write_fd, header, payload)
        except (BrokenPipeError, OSError):
            pass  # the peer died; its next receive says so

    def pump(self) -> None:
        """One read (call when readable): new frames go to `pending`; EOF sets `closed`; garbage raises WireError."""
        chunk = os.read(self.read_fd, 1 << 20)
        if not chunk:
            self.closed = True
        self.pending += self.reader.feed(chunk)

    def receive(self, timeout: float | None) -> Frame | None:
        """The next frame, or None when the peer closed, went silent past `timeout` (None: wait for ever) or
        broke the protocol."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.read_fd, selectors.EVENT_READ)
            while not self.pending and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if (remaining is not None and remaining <= 0) or not sel.select(remaining):
                    return None
                try:
                    self.pump()
                except WireError:
                    return None
        return self.pending.pop(0) if self.pending else None


class Peer(Channel):
    """A child Python process of ours (`python -m MODULE`) that speaks frames on its stdin and stdout.

    Its stderr goes to a private temporary file; the last line explains a death at start.
    """

    def __init__(self, module: str, env: dict[str, str], cwd: str | None = None):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=cwd or tempfile.gettempdir(), start_new_session=True)
        super().__init__(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def handshake(self, init: dict, timeout: float) -> dict:
        """Send `init`, wait for {"kind": "ready", "info": ...}: the info, or WireError with the one-line reason (the
        peer's own error message, else the last line it wrote to stderr)."""
        self.send(init)
        return self.ready(timeout)

    def ready(self, timeout: float) -> dict:
        """The second half of `handshake`, for a peer whose init was sent already."""
        reply = self.receive(timeout)
        if reply is not None and reply.kind == "ready":
            return reply.header["info"]
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        raise WireError((reply.header.get("message") if reply else None) or (lines[-1] if lines else "it died at start"))

    def close(self, grace_s: float = 5.0) -> None:
        """End of input first, so it can tidy up (the worker closes its jail); then the whole group is killed."""
        import signal

        try:
            self.proc.stdin.close()
            self.proc.wait(grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()
        self.log.close()


def serve(handle) -> None:
    """The child side of a Peer: `handle(frame, channel)` for each frame that arrives on stdin.

    stdout is kept for frames only; anything a library prints goes to stderr instead.
    """
    channel = Channel(0, os.dup(1))
    os.dup2(2, 1)
    while True:
        frame = channel.receive(timeout=None)
        if frame is None:
            return
        handle(frame, channel)
