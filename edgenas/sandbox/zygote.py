"""The jail's zygote: torch imported and the training data loaded once, then one jailed job per request.

    trusted side --frames--> zygote (our code only; training data only)
                               └─ fork ─> leader (namespaces) ─ fork ─> job: jail.enter(), then candidate code

The zygote never holds validation or test data, so neither can reach a job. It relays the job's frames wrapped
as {"kind": "job", "message": ...} and adds its own, which a job cannot forge: the layers it verified from
/proc, and the job's exit (status, time-out, output tail). A fork costs milliseconds; torch's import, seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import selectors
import signal
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

from edgenas.sandbox import jail, wire

OUTPUT_TAIL_BYTES = 2000
FORWARDED_ENV = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "EDGENAS_CACHE", "PYTHONPATH")


class SandboxError(RuntimeError):
    """The jail could not start (bad data or config, or no isolation); the message is one line."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 900.0
    memory_limit_mb: int | None = 8192  # address-space cap above the zygote's; None on CUDA, which maps huge ranges
    output_limit_bytes: int = 1 << 20
    disk_limit_mb: int = 256  # the job's writable tmpfs
    max_files: int = 2048
    max_payload_bytes: int = 1 << 29  # one graph or checkpoint
    allow_unconfined: bool = False  # run even where the OS gives no namespaces (unsafe)


def clean_env() -> dict[str, str]:
    """An allow-listed environment for our own child processes: API keys and tokens never reach them."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               PYTORCH_NVML_BASED_CUDA_CHECK="1")  # asking for a GPU must not initialise CUDA before fork
    return env


# ---------------------------------------------------------------- the trusted side's handle


class JailClient:
    """Host handle of one zygote. `run` never raises for anything a job does."""

    def __init__(self, worker: str, init: dict, limits: Limits, startup_timeout_s: float = 600.0):
        self.worker, self.init, self.limits, self.startup_timeout_s = worker, init, limits, startup_timeout_s
        self.peer: wire.Peer | None = None
        self.info: dict = {}

    def start(self) -> dict:
        self.close()
        self.mount_point = tempfile.mkdtemp(prefix="edgenas-jail-")  # stays empty here; jobs mount over it privately
        self.peer = wire.Peer("edgenas.sandbox.zygote", clean_env())
        try:
            self.info = self.peer.handshake({"kind": "init", "worker": self.worker, "init": self.init,
                                             "limits": asdict(self.limits), "mount_point": self.mount_point},
                                            self.startup_timeout_s)
        except wire.WireError as e:
            self.close()
            raise SandboxError(str(e)) from None
        return self.info

    def run(self, job: dict, on_message, payload: bytes = b"") -> dict:
        """Run one job; `on_message(header, payload)` sees each frame the job sent and may return "cancel".

        Returns the zygote's exit report (the verified `isolation` layers among it: never from a job's frame); a
        zygote that died or wedged is replaced and reported as `zygote_lost`.
        """
        if self.peer is None or self.peer.proc.poll() is not None:
            self.start()
        self.peer.send({"kind": "run", "job": job}, payload)
        deadline = time.monotonic() + self.limits.timeout_s + 60
        while (frame := self.peer.receive(max(1.0, deadline - time.monotonic()))) is not None:
            if frame.kind == "exit":
                return frame.header
            if frame.kind == "job" and on_message(frame.header["message"], frame.payload) == "cancel":
                self.peer.send({"kind": "cancel"})
        self.start()
        return {"kind": "exit", "zygote_lost": True, "output_tail": ""}

    def close(self) -> None:
        if self.peer is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self.mount_point)  # first: whoever closes us may not wait for the zygote to exit
            self.peer.close()
            self.peer = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- zygote side


class Zygote:
    def __init__(self, worker, limits: Limits, mount_point: str):
        self.worker, self.limits, self.mount_point = worker, limits, mount_point

    def probe(self) -> list[str]:
        """Run an empty job through every layer; refuse to go on without isolation unless told to."""
        report = self.run({"probe": True}, b"", lambda *a: None)
        layers = report.get("isolation", [])
        missing = [layer for layer in jail.REQUIRED if layer not in layers]
        if (report.get("setup_error") or missing) and not self.limits.allow_unconfined:
            why = report.get("setup_error") or f"missing {', '.join(missing)}"
            raise SandboxError(f"this system cannot isolate candidate code ({why}); refusing to run generated code "
                               f"unconfined (pass --set eval.allow_unconfined=true to run it anyway, unsafe)")
        return layers

    def run(self, job: dict, payload: bytes, send, control: wire.Channel | None = None) -> dict:
        """Fork, jail, relay, collect: every exit path ends in one report. A "cancel" on `control` stops the job."""
        pipes = {name: os.pipe() for name in ("status", "frames", "output", "go")}
        start = time.monotonic()
        leader = os.fork()
        if leader == 0:
            self._lead(job, payload, pipes)
        for name, (r, w) in pipes.items():
            os.close(r if name == "go" else w)
        try:
            return self._watch(leader, pipes, start, send, control)
        finally:
            _kill_group(leader)
            os.waitpid(leader, 0)
            for name, (r, w) in pipes.items():
                os.close(w if name == "go" else r)

    # ------------------------------------------------------------ in the leader and the job

    def _lead(self, job, payload, pipes) -> None:
        status_w = pipes["status"][1]
        try:
            for name, (r, w) in pipes.items():
                os.close(w if name == "go" else r)
            setup_error = None
            try:
                jail.lead()
            except (jail.JailError, OSError) as e:
                setup_error = str(e)
                if not self.limits.allow_unconfined:
                    raise
            pid = os.fork()
            if pid == 0:
                os.close(status_w)
                self._job(job, payload, pipes, confined=setup_error is None)
            os.write(status_w, f"pid {pid}\n".encode())
            for name in ("frames", "output"):
                os.close(pipes[name][1])
            os.close(pipes["go"][0])
            status = os.waitpid(pid, 0)[1]
            os.write(status_w, f"status {status}\n".encode())
        except BaseException as e:  # noqa: BLE001 - reported, never raised past the fork
            os.write(status_w, f"error {str(e).splitlines()[0] if str(e) else type(e).__name__}\n".encode())
        finally:
            os._exit(0)

    def _job(self, job, payload, pipes, confined: bool) -> None:
        frames_w, output_w, go_r = pipes["frames"][1], pipes["output"][1], pipes["go"][0]

        def send(header: dict, blob: bytes = b"") -> None:
            wire.write(frames_w, header, blob)

        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(output_w, 1)
            os.dup2(output_w, 2)
            keep = sorted({frames_w, go_r})
            os.closerange(3, keep[0])
            os.closerange(keep[0] + 1, keep[1])
            os.closerange(keep[1] + 1, 1 << 16)
            memory = self.limits.memory_limit_mb and self.limits.memory_limit_mb << 20
            if confined:
                jail.enter(self.mount_point, self.limits.disk_limit_mb << 20, self.limits.max_files, memory,
                           gpu=getattr(self.worker, "device", "cpu") == "cuda")
            else:
                jail.restrict(memory)
            send({"kind": "ready"})
            if os.read(go_r, 1) != b"g":
                os._exit(3)
            if job.get("probe"):
                os._exit(0)
            os.environ.clear()
            os.environ.update(HOME=jail.WORKDIR, TMPDIR=jail.WORKDIR, USER="jail", PATH="/usr/bin:/bin")
            tempfile.tempdir = jail.WORKDIR  # chosen before the jail (a /tmp that may be read-only in here)
            from edgenas.sandbox import guard

            guard.install([jail.WORKDIR])
            self.worker.run(job, payload, send)
        except BaseException:  # noqa: BLE001 - anything at all becomes a message, never a hang
            try:
                send({"kind": "error", "message": traceback.format_exc(limit=-3)[-2000:]})
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(0)

    # ------------------------------------------------------------ in the zygote

    def _watch(self, leader: int, pipes, start: float, send, control: wire.Channel | None) -> dict:
        limits = self.limits
        frames = wire.Channel(pipes["frames"][0], None, limits.max_payload_bytes)
        report = {"kind": "exit", "isolation": [], "timed_out": False, "cancelled": False, "output_flood": False,
                  "protocol_error": None, "setup_error": None, "exit_code": None, "signal": None}
        status_text, job_pid, released = b"", None, False
        tail, output_bytes = b"", 0
        deadline = start + limits.timeout_s
        with selectors.DefaultSelector() as sel:
            for name, fd in (("status", pipes["status"][0]), ("frames", frames.fileno()), ("output", pipes["output"][0]),
                             ("control", control.fileno() if control else None)):
                if fd is not None:
                    sel.register(fd, selectors.EVENT_READ, name)
            open_fds = 3
            while open_fds and not (report["timed_out"] or report["cancelled"] or report["output_flood"]
                                    or report["protocol_error"]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    report["timed_out"] = True
                    break
                for key, _ in sel.select(min(remaining, 1.0)):
                    name = key.data
                    if name == "status":
                        chunk = os.read(key.fd, 4096)
                        status_text += chunk
                        if not chunk:
                            sel.unregister(key.fd)
                            open_fds -= 1
                        if job_pid is None and status_text.startswith(b"pid "):
                            job_pid = int(status_text.split()[1])
                    elif name == "output":
                        chunk = os.read(key.fd, 1 << 16)
                        if not chunk:
                            sel.unregister(key.fd)
                            open_fds -= 1
                        output_bytes += len(chunk)
                        tail = (tail + chunk)[-OUTPUT_TAIL_BYTES:]
                        report["output_flood"] = output_bytes > limits.output_limit_bytes
                    elif name == "control":
                        control.pump()
                        report["cancelled"] = control.closed or any(f.kind == "cancel" for f in control.pending)
                        control.pending[:] = [f for f in control.pending if f.kind != "cancel"]
                    else:
                        try:
                            frames.pump()
                        except wire.WireError as e:
                            report["protocol_error"] = str(e)
                        if frames.closed:
                            sel.unregister(key.fd)
                            open_fds -= 1
                        for frame in frames.pending:
                            if not released:
                                if frame.kind != "ready" or job_pid is None:
                                    report["setup_error"] = str(frame.header.get("message", "no ready message"))[-500:]
                                    break
                                report["isolation"] = jail.verify(job_pid)
                                report["memory_cap_bytes"], report["memory_cap_inherited"] = jail.memory_cap(job_pid)
                                missing = [x for x in jail.REQUIRED if x not in report["isolation"]]
                                if missing and not limits.allow_unconfined:
                                    report["setup_error"] = f"the jail is missing {', '.join(missing)}"
                                    break
                                os.write(pipes["go"][1], b"g")
                                released = True
                            else:
                                send({"kind": "job", "message": frame.header}, frame.payload)
                        frames.pending.clear()
                        if report["setup_error"]:
                            open_fds = 0
        _kill_group(leader)
        words = status_text.decode(errors="replace").split()
        if "status" in words:
            status = int(words[words.index("status") + 1])
            report["exit_code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            report["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        elif "error" in words:
            report["setup_error"] = status_text.decode(errors="replace").split("error ", 1)[1].strip()
        report.update(output_tail=tail.decode(errors="replace"), elapsed_s=time.monotonic() - start)
        return report


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> None:
    jail.die_with_parent()
    jail.lift_soft_limit()
    zygote = None

    def handle(frame: wire.Frame, channel: wire.Channel) -> None:
        nonlocal zygote
        if frame.kind == "init":
            try:
                module, _, name = frame.header["worker"].partition(":")
                worker = getattr(importlib.import_module(module), name)(frame.header["init"])
                zygote = Zygote(worker, Limits(**frame.header["limits"]), frame.header["mount_point"])
                info = {**worker.info(), "isolation": zygote.probe()}
            except Exception as e:  # noqa: BLE001 - reported to the host as one line
                channel.send({"kind": "error", "message": str(e).splitlines()[0] if str(e) else type(e).__name__})
                return
            channel.send({"kind": "ready", "info": info})
        elif frame.kind == "run" and zygote is not None:
            channel.send(zygote.run(frame.header["job"], frame.payload, channel.send, channel))

    wire.serve(handle)


if __name__ == "__main__":
    main()
