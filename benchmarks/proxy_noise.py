"""How noisy the one-epoch proxy is, and what it is worth as a ranking of architectures.

1. Spread: every architecture trained for the proxy (the config's train.epochs, 1 by default) with seeds
   train.seed + 0..S-1 in the evaluator; per architecture the mean, standard deviation and range of validation
   accuracy, and the pooled standard deviation over all of them: the noise a new best must clear before it is
   trusted (search.confirm_margin).
2. Rank: the same architectures trained for --long-epochs with a cosine schedule (seed train.seed); Spearman's rho
   of the one-epoch accuracy (seed 0 alone, and the mean over seeds) with the long-training accuracy, and the share
   of pairs the proxy orders as the long training does.

Architectures: the benchmarks' reference CNN, MLPerf Tiny ResNet-8, and the valid candidates of a real run
(--run DIR), picked evenly over their accuracy range.

    python benchmarks/proxy_noise.py --run RUN_DIR        # 12 architectures x (3 seeds + 5 epochs): ~30 min on 2 cores
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path

from common import REFERENCE_CNN, finish, machine_info, make_config, parser, table
from export_latency import RESNET8

from edgenas.archive import Archive
from edgenas.evaluate import Evaluator
from edgenas.history import spearman


def pick(run_dir: Path, n: int) -> list[tuple[str, str]]:
    """n distinct valid programs of a run, evenly spread over its accuracy range: (label, code)."""
    archive = Archive(run_dir)
    found, seen = [], set()
    for c in sorted(archive.all(), key=lambda c: c.val_accuracy or -1):
        if c.val_accuracy is not None and c.code_hash not in seen:
            seen.add(c.code_hash)
            found.append((f"run it {c.iteration}", c.code))
    archive.close()
    if len(found) <= n:
        return found
    return [found[round(i * (len(found) - 1) / (n - 1))] for i in range(n)] if n > 1 else found[-1:]


def pairwise_agreement(x: list[float], y: list[float]) -> float:
    """The share of pairs (ties in either left out) that x and y put in the same order."""
    pairs = [(a, b) for a, b in itertools.combinations(range(len(x)), 2) if x[a] != x[b] and y[a] != y[b]]
    return sum((x[a] < x[b]) == (y[a] < y[b]) for a, b in pairs) / len(pairs)


def main() -> None:
    p = parser(__doc__, train_subset=10_000, val_size=5000, repeats=0, warmup=0)
    p.add_argument("--run", type=Path, help="a run directory whose valid candidates join the references")
    p.add_argument("--archs", type=int, default=10, help="how many of the run's candidates")
    p.add_argument("--seeds", type=int, default=3, help="proxy runs per architecture, seeds train.seed + 0..S-1")
    p.add_argument("--long-epochs", type=int, default=5, help="epochs of the longer training (cosine schedule)")
    args = p.parse_args()
    machine = machine_info()
    config = make_config(args)
    long_config = config.model_copy(update={"train": config.train.model_copy(
        update={"epochs": float(args.long_epochs), "schedule": "cosine"})})
    programs = [("reference CNN", REFERENCE_CNN), ("ResNet-8", RESNET8)]
    programs += pick(args.run, args.archs) if args.run else []
    rows = []
    with Evaluator(config) as proxy, Evaluator(long_config) as long:
        for label, code in programs:
            start = time.perf_counter()
            runs = [proxy.evaluate(code, run=k) for k in range(args.seeds)]
            trained = long.evaluate(code)
            failed = [r for r in (*runs, trained) if not r.ok]
            if failed:
                print(f"{label}: failed ({failed[0].failure.kind.value}: {failed[0].failure.message[:120]}); left out")
                continue
            acc = [r.val_accuracy for r in runs]
            rows.append({"label": label, "params": runs[0].params, "macs": runs[0].macs, "proxy": acc,
                         "mean": statistics.mean(acc), "stdev": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "range": max(acc) - min(acc), "long": trained.val_accuracy,
                         "seconds": time.perf_counter() - start})
            print(f"{label}: proxy {', '.join(f'{a:.2%}' for a in acc)}; {args.long_epochs} epochs "
                  f"{trained.val_accuracy:.2%} ({rows[-1]['seconds']:.0f} s)", flush=True)
    pooled = math.sqrt(statistics.mean(r["stdev"] ** 2 for r in rows))
    diffs = [abs(a - b) for r in rows for a, b in itertools.combinations(r["proxy"], 2)]
    # two architectures trained with the same seed share its initialisation stream and batch order: how much does
    # their difference move from seed to seed? (the noise of the comparison the search makes, best vs candidate)
    paired = [statistics.stdev([x - y for x, y in zip(a["proxy"], b["proxy"], strict=True)])
              for a, b in itertools.combinations(rows, 2)] if args.seeds > 1 else [0.0]
    long_acc = [r["long"] for r in rows]
    rank = {"n": len(rows),
            "spearman_seed0_long": spearman([r["proxy"][0] for r in rows], long_acc),
            "spearman_mean_long": spearman([r["mean"] for r in rows], long_acc),
            "pairwise_agreement_seed0": pairwise_agreement([r["proxy"][0] for r in rows], long_acc),
            "pairwise_agreement_mean": pairwise_agreement([r["mean"] for r in rows], long_acc)}
    spread = {"pooled_stdev": pooled, "median_seed_difference": statistics.median(diffs), "max_seed_difference": max(diffs),
              "largest_range": max(r["range"] for r in rows), "paired_difference_stdev_median": statistics.median(paired)}
    tables = [
        table(f"one-epoch proxy over {args.seeds} seeds vs {args.long_epochs} epochs (cosine), "
              f"{args.train_subset:,} train / {args.val_size:,} val images",
              ["architecture", "params", "MACs", "proxy per seed", "mean", "stdev", "range", "long"],
              [[r["label"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}M", " ".join(f"{a:.1%}" for a in r["proxy"]),
                f"{r['mean']:.2%}", f"{100 * r['stdev']:.2f} pt", f"{100 * r['range']:.2f} pt", f"{r['long']:.2%}"]
               for r in rows]),
        table("what the proxy is worth", ["measure", "value"],
              [["pooled seed-to-seed stdev", f"{100 * pooled:.2f} points"],
               ["median |difference| between two seeds", f"{100 * spread['median_seed_difference']:.2f} points"],
               ["largest |difference| between two seeds", f"{100 * spread['max_seed_difference']:.2f} points"],
               ["stdev of a same-seed difference of two archs (median)",
                f"{100 * spread['paired_difference_stdev_median']:.2f} points"],
               ["Spearman: seed-0 proxy vs long", f"{rank['spearman_seed0_long']:.3f}"],
               ["Spearman: mean-of-seeds proxy vs long", f"{rank['spearman_mean_long']:.3f}"],
               ["pairs ordered alike: seed-0 proxy", f"{rank['pairwise_agreement_seed0']:.1%}"],
               ["pairs ordered alike: mean-of-seeds proxy", f"{rank['pairwise_agreement_mean']:.1%}"]]),
    ]
    finish("proxy_noise", claim="the one-epoch proxy's seed-to-seed spread, and its rank agreement with longer "
           "training", target="measurement (no pass/fail): sets search.confirm_margin", passed=None, args=args,
           config=config, machine=machine, results={"architectures": rows, "spread": spread, "rank": rank},
           tables=tables, notes=[f"architectures from {args.run}" if args.run else "references only (no --run)"])


if __name__ == "__main__":
    main()
