"""How long `edgenas report` takes on a long run, and how large the page is.

A 2,000-iteration archive is written with records shaped like a real search's (code of ~60 lines, the improver's
and generator's prompts and replies, a 70% valid rate with failures of several kinds, three chains), then the
report is rendered from it several times. Targets: a few seconds, and a file that mails (under 15 MB).

    python benchmarks/report_speed.py          # about a minute
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

from common import REFERENCE_CNN, finish, machine_info, parser, table

from edgenas import html_report
from edgenas.archive import Archive
from edgenas.records import Candidate, EvalResult, Failure, FailureKind, Outcome, Status

KINDS = [FailureKind.shape, FailureKind.budget, FailureKind.oom, FailureKind.export, FailureKind.nan]


def fill(run: Path, iterations: int, chains: int = 3) -> None:
    rng = random.Random(0)
    archive, best = Archive(run), {}
    (run / "config.yaml").write_text("search: {chains: 3}\nbudget: {max_params: 300000}\n")
    prompt = [{"role": "system", "content": "You design networks. " * 20}, {"role": "user", "content": REFERENCE_CNN * 2}]
    for i in range(iterations):
        chain = i % chains
        common = dict(iteration=i, chain=chain, code=REFERENCE_CNN.replace("32", str(8 + i % 200)), created=1e9 + 30 * i,
                      problem="the model underfits: too few channels in the last stage",
                      modification=f"widen the third block to {64 + i % 64} channels", prompts=[prompt, prompt],
                      replies=["{}", REFERENCE_CNN], tokens_in=2400, tokens_out=900, llm_seconds=8.0, eval_seconds=20.0,
                      parent=best.get(chain), llm_calls=[{"role": "improver"}, {"role": "generator"}])
        if rng.random() < 0.3:
            kind = rng.choice(KINDS)
            message = f"{kind.value}: expected (2, 10), got (2, {rng.randint(1, 99)}) in features.{rng.randint(0, 9)}"
            archive.add(Candidate(status="failed", outcome=Outcome(status="failed", kind=kind.value, diagnostic=message),
                                  result=EvalResult(status=Status.failed, failure=Failure(kind=kind, message=message)),
                                  **common))
            continue
        acc = min(0.9, 0.3 + 0.0002 * i + rng.gauss(0, 0.03))
        is_best = acc > best.get((chain, "acc"), 0)
        if is_best:
            best[chain], best[(chain, "acc")] = i, acc
        result = EvalResult(status=Status.ok, val_accuracy=round(acc, 4), params=rng.randint(20_000, 300_000),
                            macs=rng.randint(1, 60) * 10**6, peak_memory_bytes=rng.randint(50, 400) << 20,
                            latency_ms=rng.uniform(0.2, 3.0))
        archive.add(Candidate(status="ok", result=result, is_best=is_best, outcome=Outcome(status="ok", val_accuracy=acc),
                              **common))
    archive.close()


def main() -> None:
    p = parser(__doc__, train_subset=0, val_size=0, repeats=3)
    p.add_argument("--iterations", type=int, default=2000)
    args = p.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        fill(run, args.iterations)
        seconds = []
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            out = html_report.write([run], run / "report.html")
            seconds.append(time.perf_counter() - start)
        seconds, size = seconds[args.warmup:], out.stat().st_size
    median = statistics.median(seconds)
    passed = median <= 5.0 and size <= 15e6
    tables = [table(f"report of a {args.iterations:,}-iteration archive", ["measure", "value"],
                    [["render and write, median", f"{median:.2f} s [{min(seconds):.2f}-{max(seconds):.2f}]"],
                     ["file size", f"{size / 1e6:.1f} MB (plotly.js is 4.8 MB of it)"]])]
    finish("report_speed", claim="a report of a 2,000-iteration run is written in a few seconds and mails",
           target="<= 5 s median, <= 15 MB", passed=passed, args=args, config=None, machine=machine,
           results={"seconds": seconds, "median_s": median, "bytes": size}, tables=tables)


if __name__ == "__main__":
    main()
