"""Entering the jail, and checking from outside that a job is in it.

    zygote ─fork─> leader: own session, unshare(pid, mount, net, ipc, uts [, user]) ─fork─> job (pid 1 there)
    job: private mounts: a read-only view of the Python installation, /dev/null & co, a fresh /proc, and a
         size- and inode-limited tmpfs /work (noexec) -> pivot_root -> an unprivileged uid with no capabilities
         and no_new_privs -> rlimits -> a seccomp filter -> candidate code

As root the job drops to a dedicated unprivileged uid; a normal user gets the same layers through an
unprivileged user namespace. The zygote reads /proc/<job>/... before it lets the job go on, so a job cannot
claim layers it does not have. bubblewrap and nsjail do this well but exec a fresh program per job, which would
pay torch's import (seconds) per candidate; the zygote keeps torch warm and forks, so the namespace steps are
done here, in this one file, and the syscall filter comes from libseccomp (pyseccomp).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 2, 1, 38, 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, CAP_VERSION_3 = 47, 4, 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
TIOCSTI, TIOCLINUX, AF_UNIX = 0x5412, 0x541C, 1

JAIL_ID = 65534  # nobody: owns no files the job could see
WORKDIR = "/job"  # the job's writable tmpfs, its cwd, HOME and TMPDIR
REQUIRED = ("pid_namespace", "mount_namespace", "private_root", "network_namespace", "unprivileged_uid",
            "no_capabilities", "no_new_privs")
# refused with EPERM: leaving or making namespaces, mounts, other processes' memory, kernel state, process
# creation (threads are fine), io_uring (its operations bypass this filter), and memory the address-space cap does
# not count (memfd and SysV shared memory that is written but not mapped; memfd is also a way to load native code)
DENIED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "fork", "vfork", "execve", "execveat", "setsid", "setpgid",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd", "pidfd_open",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl",
    "ioperm", "syslog", "quotactl", "quotactl_fd", "lookup_dcookie", "vhangup", "add_key", "request_key", "keyctl",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "personality", "memfd_create", "memfd_secret",
    "shmget", "shmat", "msgget", "semget",
)


class JailError(RuntimeError):
    """A layer could not be set up; the message is one line."""


_libc = ctypes.CDLL(None, use_errno=True)
try:  # loaded now: finding the library runs ldconfig, which a jailed job cannot
    import pyseccomp as seccomp
except (ImportError, OSError, RuntimeError):
    seccomp = None


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(code)}")


def _mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
    def enc(text):
        return text.encode() if text else None

    _check(_libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def root_mode() -> bool:
    """Root that can switch to the jail uid: then no user namespace is needed and the job's uid is truly unprivileged."""
    if os.geteuid() != 0:
        return False
    with open("/proc/self/uid_map") as f:
        return any(int(inside) <= JAIL_ID < int(inside) + int(count) for inside, _, count in (line.split() for line in f))


# ---------------------------------------------------------------- the leader (trusted, between zygote and job)


def die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def lead() -> None:
    """Own session, die with the zygote, new namespaces for the job this process forks next."""
    os.setsid()
    die_with_parent()
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
    if root_mode():
        _check(_libc.unshare(flags), "unshare")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare (user namespace)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{JAIL_ID} {uid} 1"), ("gid_map", f"{JAIL_ID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


# ---------------------------------------------------------------- the job (before candidate code)


def exposed_paths(gpu: bool = False) -> list[str]:
    """Host paths the job sees, read-only: system libraries, the Python installation, edgenas itself. No home,
    no /tmp, no data cache, no run directories."""
    import edgenas
    import exporters

    paths = ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
             sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(edgenas.__file__), os.path.dirname(exporters.__file__)]
    paths += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    if gpu:
        paths += ["/sys"] + [f"/dev/{d}" for d in os.listdir("/dev") if d.startswith("nvidia")]
    real = sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})
    # a path inside another exposed directory is already there
    return [p for p in real if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in real)]


def _bind_readonly(source: str, root: str) -> None:
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(source).f_flag & (MS_NOEXEC | 1024 | 2048 | (1 << 21))  # noexec, noatime, nodiratime, relatime
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def enter(mount_point: str, disk_bytes: int, max_files: int, memory_bytes: int | None, gpu: bool = False) -> None:
    """Called by the job, pid 1 of its namespace: build its file system, drop every privilege, filter syscalls."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = mount_point
    _mount("jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    for path in exposed_paths(gpu):
        _bind_readonly(path, root)
    os.makedirs(root + "/dev", exist_ok=True)
    for device in ("null", "zero", "full", "random", "urandom"):
        _bind_readonly(f"/dev/{device}", root)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.exists(root + WORKDIR):
        raise JailError(f"an exposed host path lies under {WORKDIR}, where the job's own directory goes")
    os.makedirs(root + WORKDIR)
    owner = f"uid={JAIL_ID},gid={JAIL_ID}" if root_mode() else ""
    _mount("job", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={disk_bytes},nr_inodes={max_files},mode=700" + (f",{owner}" if owner else ""))
    if not os.path.lexists(root + "/tmp"):  # (an exposed path may lie under /tmp: a checkout there)
        os.symlink(WORKDIR.lstrip("/"), root + "/tmp")
    os.makedirs(root + "/.old")
    if SYS_PIVOT_ROOT is None:
        raise JailError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(SYS_PIVOT_ROOT, root.encode(), (root + "/.old").encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(WORKDIR)
    _drop_privileges()
    die_with_parent()  # a credential change clears it: set it again
    restrict(memory_bytes)


def restrict(memory_bytes: int | None) -> None:
    """The layers that need no namespace: rlimits, no_new_privs and the syscall filter (all a job gets unconfined)."""
    _limit(memory_bytes)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _filter_syscalls()


def _drop_privileges() -> None:
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if root_mode():
        os.setgroups([])
        os.setresgid(JAIL_ID, JAIL_ID, JAIL_ID)
        os.setresuid(JAIL_ID, JAIL_ID, JAIL_ID)  # from root to a plain uid: the kernel clears every capability

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc.capset(ctypes.byref(Header(CAP_VERSION_3, 0)), (Data * 2)()), "capset")


def _limit(memory_bytes: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if root_mode():  # counted per real uid: only meaningful for the dedicated jail uid
        threads = 4 * (os.cpu_count() or 1) + 64
        resource.setrlimit(resource.RLIMIT_NPROC, (threads, threads))
    if memory_bytes is not None:
        cap_address_space(memory_bytes)


def cap_address_space(extra_bytes: int, soft_only: bool = False) -> None:
    """RLIMIT_AS at what this process has mapped now plus `extra_bytes` (never above an inherited hard limit).

    soft_only leaves the hard limit alone, so a child of ours may lift the cap for itself (see lift_soft_limit).
    """
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = mapped + extra_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)  # an inherited limit (ulimit -v) cannot be raised
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard if soft_only else cap))


def lift_soft_limit() -> None:
    """Back to the hard address-space limit: the trusted worker's own soft cap is not the jail's (its jobs set
    theirs; a CUDA job maps far more address space than it uses)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _filter_syscalls() -> None:
    """libseccomp filter: EPERM for DENIED, for new processes (clone without CLONE_THREAD), for sockets other than
    AF_UNIX and for terminal injection. Skipped, and so missing from the verified layers, without libseccomp."""
    if seccomp is None:
        return
    deny = seccomp.ERRNO(errno.EPERM)
    rules = [(name,) for name in DENIED] + [
        ("clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0)),
        ("socket", seccomp.Arg(0, seccomp.NE, AF_UNIX)),
        ("ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, TIOCSTI)),
        ("ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, TIOCLINUX)),
    ]
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    for name, *args in rules:
        try:
            f.add_rule(deny, name, *args)
        except (RuntimeError, ValueError, OSError):
            pass  # a syscall this architecture does not have
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # flags hide in a struct; glibc falls back to clone
    f.load()


# ---------------------------------------------------------------- the zygote's check


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def memory_cap(pid: int) -> tuple[int | None, bool]:
    """(the job's address-space cap in bytes or None, whether it is a limit this process inherited rather than
    eval.memory_limit_mb: a `ulimit -v` lower than the configured cap wins)."""
    with open(f"/proc/{pid}/limits") as f:
        fields = next((line.split() for line in f if line.startswith("Max address space")), [])
    cap = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None
    inherited = resource.getrlimit(resource.RLIMIT_AS)[1]
    return cap, cap is not None and inherited != resource.RLIM_INFINITY and cap == inherited


def verify(pid: int) -> list[str]:
    """The layers a running job really has, read by its parent from the kernel's view of it."""
    layers = []
    for ns, name in (("pid", "pid_namespace"), ("mnt", "mount_namespace"), ("net", "network_namespace"),
                     ("ipc", "ipc_namespace"), ("uts", "uts_namespace"), ("user", "user_namespace")):
        try:
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                layers.append(name)
        except OSError:
            pass
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root/"), os.stat("/")
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            layers.append("private_root")
    except OSError:
        pass
    status = _status(pid)
    if all(int(v) != 0 for v in status["Uid"].split() + status["Gid"].split()):
        layers.append("unprivileged_uid")
    if all(int(status[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")):
        layers.append("no_capabilities")
    if status.get("NoNewPrivs") == "1":
        layers.append("no_new_privs")
    if status.get("Seccomp") == "2":
        layers.append("seccomp")
    with open(f"/proc/{pid}/limits") as f:
        if any(line.startswith("Max address space") and "unlimited" not in line for line in f):
            layers.append("memory_cap")
    with open(f"/proc/{pid}/mountinfo") as f:
        if any(f" {WORKDIR} " in line and " - tmpfs " in line and "size=" in line and "nr_inodes=" in line for line in f):
            layers.append("disk_cap")
    return layers
