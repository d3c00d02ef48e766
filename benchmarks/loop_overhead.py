"""The search loop's own cost per iteration, LLM and evaluator time excluded.

Claim: prompt rendering, reply extraction, code hashing, memory and the SQLite archive (fsync per
iteration) cost well under the LLM call and the evaluation they sit between, also late in a long run.
Target: <= 50 ms per iteration (median), early and after --iterations iterations. The LLM and the
evaluator are instant stand-ins returning realistic replies and records, so all measured time is the loop's.

    python benchmarks/loop_overhead.py            # 1,000 iterations, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REFERENCE_CNN, RESULTS_DIR, machine_info, reference_cnn, summary, table

from edgenas import loop
from edgenas.archive import Archive
from edgenas.config import BudgetConfig, SearchConfig
from edgenas.llm.base import Reply, Sampling
from edgenas.prompts import Task
from edgenas.propose import LLMProposer
from edgenas.records import EvalResult, Status


class InstantChat:
    """Answers at once: the improver with JSON, the generator with a fenced program of realistic size."""

    identity = "instant"

    def __init__(self):
        self.calls = 0

    def chat(self, messages, sampling):
        self.calls += 1
        if "diagnose" in messages[0]["content"]:
            text = json.dumps({"problem": "the model underfits after one epoch", "modification": "widen the last stage"})
        else:  # a different program each time, so no iteration short-cuts as a duplicate
            text = f"Here is the model:\n```python\n{reference_cnn((32, 64, 128 + self.calls))}```\nDone."
        return Reply(text, tokens_in=1500, tokens_out=600, seconds=0.0)


class InstantEvaluator:
    last_graph = b""

    def evaluate(self, code, run=0):
        return EvalResult(status=Status.ok, val_accuracy=0.4 + (hash(code) % 1000) / 1e5, params=94_762, macs=12_000_000,
                          peak_memory_bytes=90 << 20, latency_ms=0.9, train_seconds=30.0, device="cpu", dataset="cifar10",
                          stage_seconds={"static": 0.01, "build": 0.01, "train": 30.0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--window", type=int, default=100, help="iterations per measured window (first and last)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    task = Task("cifar10", 10, (3, 32, 32), BudgetConfig(max_params=1_000_000), "1 epoch of SGD")
    chat = InstantChat()
    proposer = LLMProposer(chat, chat, Sampling(), Sampling(), task)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(candidate, archive):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        archive = Archive(Path(tmp) / "run")
        loop.run(archive, proposer, [InstantEvaluator()], SearchConfig(iterations=args.iterations), on_iteration=tick)
        size = (Path(tmp) / "run" / "archive.sqlite").stat().st_size
        archive.close()
    early, late = summary([t * 1000 for t in times[1 : args.window + 1]]), summary([t * 1000 for t in times[-args.window :]])
    passed = early["median"] <= 50 and late["median"] <= 50
    rows = [[f"iterations 1-{args.window}", f"{early['median']:.2f}", f"{early['min']:.2f}", f"{early['max']:.2f}"],
            [f"last {args.window} of {args.iterations}", f"{late['median']:.2f}", f"{late['min']:.2f}", f"{late['max']:.2f}"]]
    print(table("loop overhead per iteration (ms), LLM and evaluator instant", ["window", "median", "min", "max"], rows))
    print(f"target: <= 50 ms median -> {'PASS' if passed else 'FAIL'}; archive {size / 2**20:.1f} MiB after "
          f"{args.iterations} iterations; reference program {len(REFERENCE_CNN)} chars")
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / "loop_overhead.json"
        out.write_text(json.dumps({"script": "loop_overhead", "target": "<= 50 ms per iteration", "passed": passed,
                                   "args": vars(args), "machine": machine_info(), "early_ms": early, "late_ms": late,
                                   "archive_bytes": size}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
