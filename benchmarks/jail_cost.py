"""What the jail costs per candidate: a plain fork of a torch-loaded process against a job taken through every
layer (leader fork, namespaces, private mounts and pivot_root, uid and capability drop, rlimits, the seccomp
filter, the zygote's check of /proc and the release), both ending at once.

Claim: the layers add milliseconds per candidate, not the seconds a fresh interpreter per candidate would cost.
Target: the jailed job's median <= 100 ms.

    python benchmarks/jail_cost.py                   # 5 warm-up + 30 timed rounds each
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from common import finish, fmt, machine_info, parser, rounds, summary, table

TARGET_MS = 100.0
CLAIM = "the jail's layers cost milliseconds per candidate (fork + namespaces + mounts + drop + seccomp + check)"


def fresh_interpreter_s() -> float:
    """What exec'ing a new Python that imports torch costs (what bubblewrap or nsjail per candidate would pay)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__, train_subset=0, val_size=0, repeats=30, warmup=5).parse_args()
    import torch  # noqa: F401 - the zygote's state: torch in memory

    from edgenas.sandbox.zygote import Limits, Zygote

    class Idle:
        device = "cpu"

    mount_point = tempfile.mkdtemp(prefix="edgenas-jail-")
    zygote = Zygote(Idle(), Limits(timeout_s=30), mount_point)
    times = {"plain fork": [], "jailed job": []}
    layers = []
    try:
        for _, timed in rounds(args.warmup, args.repeats, log=lambda *a, **k: None):
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            report = zygote.run({"probe": True}, b"", lambda *a: None)
            jailed = time.perf_counter() - start
            layers = report["isolation"]
            if timed:
                times["plain fork"].append(plain * 1000)
                times["jailed job"].append(jailed * 1000)
    finally:
        os.rmdir(mount_point)
    interpreter = summary([fresh_interpreter_s() * 1000 for _ in range(3)])
    stats = {name: summary(values) for name, values in times.items()}
    stats["fresh interpreter + import torch"] = interpreter
    passed = stats["jailed job"]["median"] <= TARGET_MS
    overview = table(f"one job that ends at once, {args.repeats} timed rounds after {args.warmup} warm-up (ms)",
                     ["", "median [min-max]"], [[name, fmt(s, " ms", 1)] for name, s in stats.items()])
    finish("jail_cost", claim=CLAIM, target=f"jailed job median <= {TARGET_MS:.0f} ms", passed=passed, args=args,
           config=None, machine=machine_info(), results={"ms": stats, "layers": layers}, tables=[overview],
           notes=[f"layers verified: {', '.join(layers)}"])


if __name__ == "__main__":
    main()
