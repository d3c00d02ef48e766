"""The sandbox: a warm worker process that forks one limited child per candidate.

    host (CLI / search loop, no torch) --JSON lines--> zygote (torch imported, data loaded, 1 thread)
                                                          └─ fork per job ─> child: own session, no network,
                                                             rlimits, empty env, temp cwd, audit guard

The zygote pays torch's import and the data load once; a fork costs milliseconds. The zygote never
runs multi-threaded or CUDA work itself, since neither survives a fork. A child that hangs is killed
with its whole process group at the deadline; whatever a child does, the zygote answers with a dict.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER, PR_SET_PDEATHSIG = 0x00020000, 0x40000000, 0x10000000, 1
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "EDGENAS_CACHE", "PYTHONPATH")
MAX_REPLY_BYTES = 8 << 20


class SandboxError(RuntimeError):
    """The worker could not start (bad data or config); the message is one line."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 900.0
    memory_limit_mb: int = 8192
    output_limit_bytes: int = 1 << 20
    network_isolation: bool = True
    cap_address_space: bool = True  # off on CUDA, which reserves huge address ranges
    writable_dir: str | None = None  # a directory the job may write besides its temp dir (finalize's artifacts)


def clean_env() -> dict[str, str]:
    """An allow-listed environment: API keys and tokens never reach generated code."""
    env = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               PYTORCH_NVML_BASED_CUDA_CHECK="1")  # asking for a GPU must not initialise CUDA before fork
    return env


# ---------------------------------------------------------------- host side


class Sandbox:
    """Host handle of one zygote. `run` never raises for anything a candidate does."""

    def __init__(self, worker: str, init: dict, startup_timeout_s: float = 600.0):
        self.worker, self.init, self.startup_timeout_s = worker, init, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> dict:
        self.close()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgenas.sandbox", self.worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, env=clean_env(), start_new_session=True, cwd=tempfile.gettempdir(),
        )
        self._send(self.init)
        reply = self._receive(self.startup_timeout_s)
        if reply is None or "error" in reply:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace").strip().splitlines()
            message = (reply or {}).get("error") or (tail[-1] if tail else "the worker process died at start")
            self.close()
            raise SandboxError(message)
        self.info = reply["ready"]
        return self.info

    def run(self, job: dict, limits: Limits, on_progress=None) -> dict:
        """Run one job in a fresh child; `on_progress` gets whatever the job reports as {"progress": ...}."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self._send({"job": job, "limits": asdict(limits)})
        deadline = time.monotonic() + limits.timeout_s + 60
        reply = self._receive(limits.timeout_s + 60)
        while reply is not None and "progress" in reply:
            if on_progress is not None:
                on_progress(reply["progress"])
            reply = self._receive(max(1.0, deadline - time.monotonic()))
        if reply is None:  # the zygote itself died or wedged: replace it, report the candidate as crashed
            self.start()
            return {"result": None, "signal": None, "exit_code": None, "timed_out": False, "stage": None,
                    "output_tail": "", "zygote_lost": True}
        return reply

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def _receive(self, timeout: float) -> dict | None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None


# ---------------------------------------------------------------- zygote side


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _readonly_filesystem(libc, writable: list[str]) -> bool:
    """In the child's own mount namespace, every mount becomes read-only except the writable directories.

    This catches writes the audit hook cannot see (C++ file writers such as torch.save's).
    """
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    for path in writable:
        if libc.mount(path.encode(), path.encode(), None, MS_BIND, None) != 0:
            return False
    with open("/proc/self/mounts") as f:
        points = {line.split()[1].replace("\\040", " ") for line in f}
    ok = True
    for point in points - set(writable):
        ok &= libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) == 0
    return ok


def _writable(tmp: str, limits: Limits) -> list[str]:
    return [tmp] + ([os.path.realpath(limits.writable_dir)] if limits.writable_dir else [])


def _isolate(tmp: str, limits: Limits) -> list[str]:
    """OS-level limits for the forked child; returns what took effect."""
    done = []
    os.setsid()  # own process group: the deadline kill reaches everything the child started
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc = _libc()
    flags = CLONE_NEWNS | (CLONE_NEWNET if limits.network_isolation else 0)
    if libc.unshare(flags) == 0 or libc.unshare(CLONE_NEWUSER | flags) == 0:  # root, or unprivileged userns
        done += ["netns"] if limits.network_isolation else []
        if _readonly_filesystem(libc, _writable(tmp, limits)):
            done.append("fs_readonly")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the output cap: a write error, not a silent death
    file_cap = limits.output_limit_bytes if limits.writable_dir is None else max(limits.output_limit_bytes, 1 << 33)
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_cap, file_cap))
    done.append("fsize")
    if limits.cap_address_space:
        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        cap = vm_kb * 1024 + limits.memory_limit_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        done.append("rlimit_as")
    os.chdir(tmp)
    os.environ.clear()
    os.environ.update(HOME=tmp, TMPDIR=tmp, PATH="/usr/bin:/bin")
    return done


def _child(worker, job: dict, limits: Limits, tmp: str, write_fd: int) -> None:
    def report(message: dict) -> None:
        os.write(write_fd, (json.dumps(message, default=str) + "\n").encode())

    try:
        out = os.open(os.path.join(tmp, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, 4096)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        worker.prepare(job)  # device init, pre-opened handles: before the door closes
        isolation = _isolate(tmp, limits)
        from edgenas import guard

        guard.install(_writable(tmp, limits))
        report({"result": worker.run(job, report, isolation + ["audit"])})
    except BaseException:  # noqa: BLE001 - anything at all becomes a message, never a hang
        try:
            report({"error": traceback.format_exc(limit=-3)[-2000:]})
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(0)


def _progress_lines(buffer: bytes, seen: int, on_progress) -> int:
    """Forward each newly completed `{"progress": ...}` line; returns how far the buffer was scanned."""
    end = buffer.rfind(b"\n") + 1
    for line in buffer[seen:end].splitlines():
        if line.startswith(b'{"progress"'):
            try:
                on_progress(json.loads(line)["progress"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return max(seen, end)


def run_job(worker, job: dict, limits: Limits, on_progress=None) -> dict:
    """Fork, limit, run, collect: the zygote's one service. Every exit path yields a dict."""
    tmp = tempfile.mkdtemp(prefix="edgenas-candidate-")
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(worker, job, limits, tmp, write_fd)
    os.close(write_fd)
    deadline = start + limits.timeout_s
    buffer, timed_out, status, scanned = b"", False, None, 0
    with selectors.DefaultSelector() as sel:
        sel.register(read_fd, selectors.EVENT_READ)
        while len(buffer) < MAX_REPLY_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if sel.select(min(remaining, 1.0)):
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                if on_progress is not None:
                    scanned = _progress_lines(buffer, scanned, on_progress)
    while status is None:  # the pipe closed; the child should exit now, but hold it to the deadline too
        done, status_word = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_word
        elif timed_out or time.monotonic() > deadline:
            timed_out = True
            _kill_group(pid)
            status = os.waitpid(pid, 0)[1]
        else:
            time.sleep(0.005)
    _kill_group(pid)  # strays that escaped nothing still die with the group
    os.close(read_fd)
    messages = []
    for line in buffer.decode(errors="replace").splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    with open(os.path.join(tmp, "output.txt"), "rb") as f:
        f.seek(max(0, os.path.getsize(f.name) - 2000))
        output_tail = f.read().decode(errors="replace")
    shutil.rmtree(tmp, ignore_errors=True)
    stages = [m["stage"] for m in messages if isinstance(m, dict) and "stage" in m]
    final = next((m for m in reversed(messages) if isinstance(m, dict) and ("result" in m or "error" in m)), {})
    return {
        "result": final.get("result"), "error": final.get("error"), "stage": stages[-1] if stages else None,
        "timed_out": timed_out, "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "output_tail": output_tail,
        "elapsed_s": time.monotonic() - start,
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def zygote(target: str) -> None:
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the host died: so do we
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream

    def send(message: dict) -> None:
        protocol.write(json.dumps(message, default=str).encode() + b"\n")
        protocol.flush()

    module, _, name = target.partition(":")
    init = json.loads(sys.stdin.readline())
    try:
        worker = getattr(importlib.import_module(module), name)(init)
    except Exception as e:  # noqa: BLE001 - reported to the host as one line
        send({"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        return
    send({"ready": worker.info()})
    for line in sys.stdin:
        request = json.loads(line)
        send(run_job(worker, request["job"], Limits(**request["limits"]), lambda p: send({"progress": p})))


if __name__ == "__main__":
    zygote(sys.argv[1])
