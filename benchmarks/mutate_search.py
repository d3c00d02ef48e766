"""Best validation accuracy against iteration for a `mutate` search (the no-LLM baseline) on CIFAR-10.

Claim: the closed loop improves on its seed with no LLM at all, so every LLM search has a baseline to beat.
Writes benchmarks/results/mutate_search.json and mutate_search.png. This is the mutate baseline, not a
measure of any LLM's search quality.

    python benchmarks/mutate_search.py --iterations 20       # quickstart config, ~5-10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA_ROOT, REPO, RESULTS_DIR, machine_info, table

from edgenas.archive import Archive
from edgenas.config import load_config
from edgenas.search import run_search


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    valid = [r for r in rows if r["val_accuracy"] is not None]
    ax.scatter([r["iteration"] for r in valid], [100 * r["val_accuracy"] for r in valid], s=14, c="0.6", label="candidate")
    ax.step([r["iteration"] for r in rows], [100 * r["best"] if r["best"] else float("nan") for r in rows], where="post",
            c="tab:blue", label="best so far")
    ax.set(xlabel="iteration", ylabel="validation accuracy (%)", title="mutate search on a CIFAR-10 subset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep-run", type=Path, help="keep the run directory here (for archive_latency.py, finalize)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="ImageFolder tree with train/ and test/")
    args = p.parse_args()
    config = load_config(args.config, ["dataset.name=folder", f"dataset.root={args.data_root}",
                                       f"search.iterations={args.iterations}", *args.overrides])
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep_run or Path(tmp) / "run"
        run_search(config, run, resuming=False)
        archive = Archive(run)
        candidates = archive.all()
        archive.close()
    rows, best = [], None
    for c in candidates:
        if c.is_best:  # what the loop promoted (a close win must hold up over seeds, see search.confirm_margin)
            best = c.val_accuracy
        rows.append({"iteration": c.iteration, "status": c.status, "val_accuracy": c.val_accuracy, "best": best,
                     "params": c.result.params if c.result else None, "modification": c.modification})
    print(table("mutate search", ["it", "status", "val acc", "best", "params", "modification"],
                [[r["iteration"], r["status"], "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.2%}",
                  "-" if r["best"] is None else f"{r['best']:.2%}", r["params"] or "-", r["modification"][:48]] for r in rows]))
    first = next((r["val_accuracy"] for r in rows if r["val_accuracy"] is not None), None)
    print(f"seed {first:.2%} -> best {best:.2%} in {len(rows)} iterations, {time.time() - start:.0f} s")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS_DIR / "mutate_search.png")
    (RESULTS_DIR / "mutate_search.json").write_text(json.dumps(
        {"script": "mutate_search", "config": config.model_dump(mode="json"), "machine": machine_info(),
         "seconds": time.time() - start, "first_val_accuracy": first, "best_val_accuracy": best, "iterations": rows},
        indent=2) + "\n")
    print(f"wrote {RESULTS_DIR / 'mutate_search.json'} and mutate_search.png")


if __name__ == "__main__":
    main()
