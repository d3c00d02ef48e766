"""Fixed per-candidate overhead of the evaluator: everything but training and validation compute.

overhead = evaluate() wall time - EvalResult.train_seconds - stage_seconds["validate"], measured on a
warm evaluator over several candidates (the reference CNN at three widths) with a small training
subset. It is broken down into the stage timings the worker reports (static checks on the host,
build, forward, profile with its memory-probe training steps, latency), the train stage's own setup
(stage time minus train_seconds) and the remainder: fork, isolation, IPC and record validation.

Claim: a candidate costs under a second on top of its training and validation.
Target: median overhead <= 1 s for every candidate, on this CPU.

    python benchmarks/overhead.py                               # 3 candidates, 5 timed rounds
    python benchmarks/overhead.py --repeats 2 --warmup 0
"""

from __future__ import annotations

import os
import time

from common import evaluate_timed, finish, fmt, machine_info, make_config, parser, reference_cnn, rounds, summary, table

TARGET_S = 1.0
CLAIM = "fixed per-candidate overhead (evaluate() wall minus training and validation) <= 1 s"
CANDIDATES = {"cnn-16-32-64": (16, 32, 64), "cnn-32-64-128 (reference)": (32, 64, 128),
              "cnn-64-128-256": (64, 128, 256)}
PARTS = ("static", "build", "forward", "profile", "latency", "train_setup", "fork_ipc")


def breakdown(run: dict) -> dict:
    """One evaluate() call -> overhead and its parts, in seconds."""
    stages = run["stage_seconds"]
    out = {part: stages.get(part, 0.0) for part in PARTS[:5]}
    out["train_setup"] = stages["train"] - run["train_s"]
    out["fork_ipc"] = run["wall_s"] - sum(stages.values())
    out["overhead"] = run["wall_s"] - run["train_s"] - stages["validate"]
    return out


def main() -> None:
    args = parser(__doc__, train_subset=512, val_size=500, repeats=5).parse_args()
    config = make_config(args)
    machine = machine_info()
    from edgenas.evaluate import Evaluator

    programs = {name: reference_cnn(widths) for name, widths in CANDIDATES.items()}
    evaluator = Evaluator(config)
    start = time.perf_counter()
    info = evaluator.start()
    start_s = time.perf_counter() - start
    runs = {name: [] for name in programs}
    try:
        for i, timed in rounds(args.warmup, args.repeats):
            names = list(programs) if i % 2 == 0 else list(reversed(programs))
            for name in names:
                run = evaluate_timed(evaluator, programs[name])
                run.update(breakdown(run), load1=os.getloadavg()[0])
                print(f"  {name}: wall {run['wall_s']:.2f} s, overhead {run['overhead']:.3f} s", flush=True)
                if timed:
                    runs[name].append(run)
    finally:
        evaluator.close()

    keys = ("wall_s", "train_s", "overhead", *PARTS)
    stats = {name: {k: summary([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    stats["all candidates"] = {k: summary([r[k] for rs in runs.values() for r in rs]) for k in keys}
    for name, rs in runs.items():
        stats[name]["params"] = rs[0]["params"]
    worst = max(stats[name]["overhead"]["median"] for name in programs)
    passed = worst <= TARGET_S

    def median_ms(s: dict) -> str:
        return f"{1000 * s['median']:.0f}"

    overview = table(
        f"per-candidate overhead: {info['train_images']} train images, {info['val_images']} val images, "
        f"{args.repeats} timed rounds after {args.warmup} warm-up",
        ["candidate", "params", "evaluate() wall", "train", "overhead median [min-max]", f"<= {TARGET_S:.0f} s"],
        [[name, f"{s['params']:,}" if "params" in s else "", fmt(s["wall_s"]), fmt(s["train_s"]),
          fmt(s["overhead"], digits=3), "ok" if s["overhead"]["median"] <= TARGET_S else "OVER"]
         for name, s in stats.items()])
    parts = table("overhead breakdown, median ms (fork_ipc = wall - sum of stage times; train_setup = train stage - "
                  "train_seconds)", ["candidate", *PARTS, "overhead"],
                  [[name, *(median_ms(s[p]) for p in PARTS), median_ms(s["overhead"])] for name, s in stats.items()])
    finish("overhead", claim=CLAIM, target=f"median overhead <= {TARGET_S} s for every candidate", passed=passed,
           args=args, config=config, machine=machine, tables=[overview, parts],
           results={"stats": stats, "runs": runs, "worst_median_overhead_s": worst, "evaluator_start_s": start_s,
                    "candidates": {name: list(w) for name, w in CANDIDATES.items()}, "worker_info": info},
           notes=[f"Evaluator.start() took {start_s:.2f} s once (not part of the per-candidate overhead)",
                  "medians of parts need not add up exactly to the median overhead"])


if __name__ == "__main__":
    main()
