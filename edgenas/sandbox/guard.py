"""Run-time guard for generated code: a Python audit hook installed before the candidate is imported.

Static checks refuse what they can see; this refuses what actually happens, whatever route the code
took to get there. It complements, not replaces, the OS limits set in sandbox.py (network namespace,
rlimits, process group): audit hooks see Python-level actions, the OS sees everything.
"""

from __future__ import annotations

import os
import sys

PROCESS_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn", "os.startfile", "_posixsubprocess.fork_exec",
}
NETWORK_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request", "http.client.connect", "ftplib.connect",
    "smtplib.connect", "poplib.connect", "imaplib.open", "telnetlib.Telnet.open",
}
SIGNAL_EVENTS = {"os.kill", "os.killpg", "signal.pthread_kill"}
ESCAPE_EVENTS = {
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer",
    "ctypes.call_function", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr",
    "resource.setrlimit", "resource.prlimit", "sys.setprofile", "sys.settrace", "sys._current_frames",
    "gc.get_referrers", "gc.get_referents", "gc.get_objects", "pickle.find_class",
    "os.setuid", "os.setgid", "os.chroot", "os.unshare", "os.setns",
}
PATH_EVENTS = {  # event -> indexes of path arguments that must stay inside the sandbox directory
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "shutil.rmtree": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.mkdir": (0,),
    "os.utime": (0,), "shutil.copyfile": (1,), "shutil.move": (1,), "os.chflags": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
}
# (event, file of the Python frame that raised it): trusted library code that needs an escape hatch.
# torch's ONNX exporter reads tensor memory through ctypes when it serialises weights.
TRUSTED_CALLERS = {("ctypes.cdata", os.path.join("torch", "onnx", "_internal", "exporter", "_core.py"))}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class SandboxViolation(PermissionError):
    """Raised inside the candidate; the evaluator reports it as a `forbidden` failure."""


def install(allowed_dirs: list[str]) -> None:
    """Deny processes, network, signals, escape hatches and writes outside `allowed_dirs`, for good.

    Audit hooks cannot be removed once added, so this is a one-way door for the process.
    """
    roots = tuple(os.path.realpath(d) + os.sep for d in allowed_dirs)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False  # writing to an inherited descriptor (e.g. a result pipe) is not the candidate's business
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(roots)
        except (TypeError, ValueError):
            return False

    def deny(what: str):
        raise SandboxViolation(f"sandbox: {what} is not allowed for a model")

    def hook(event: str, args: tuple) -> None:
        if event in PROCESS_EVENTS:
            deny("starting a process")
        elif event in NETWORK_EVENTS:
            deny("network access")
        elif event in SIGNAL_EVENTS:
            deny("sending signals")
        elif event in ESCAPE_EVENTS:
            caller = sys._getframe(1).f_code.co_filename
            if not any(event == e and caller.endswith(suffix) for e, suffix in TRUSTED_CALLERS):
                deny(f"'{event}'")
        elif event == "open":
            path, mode, flags = (args + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writes and not inside(path):
                deny(f"writing {path!r} (only the sandbox's own directories are writable)")
        elif event in PATH_EVENTS:
            if not all(inside(args[i]) for i in PATH_EVENTS[event] if i < len(args)):
                deny(f"'{event}' outside the sandbox's own directories")

    sys.addaudithook(hook)
