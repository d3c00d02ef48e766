"""Shared pieces of the benchmark scripts: arguments, the reference program, timing runs, statistics,
machine description, tables and JSON results.

Measurement rules (airbench style): warm-up rounds are run and thrown away, the timed rounds are
repeated, and every number is reported as a median with its min, max and spread. Each result file
records the torch version, the CPU model, the git commit and the exact config it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "cifar10-jpeg"
# the evaluation workers are child processes started in /tmp: they must import the tree being measured (a clean
# worktree of the commit a result records), not whichever checkout pip installed in editable mode
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

# ---------------------------------------------------------------- the reference candidate

REFERENCE_WIDTHS = (32, 64, 128)

_CNN_TEMPLATE = '''import torch
import torch.nn as nn


class Net(nn.Module):
    """Three 3x3 conv-BN-ReLU-maxpool blocks ({widths}), global average pooling, one linear layer."""

    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        layers, channels = [], in_shape[0]
        for width in {widths!r}:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))
'''


def reference_cnn(widths: tuple[int, int, int] = REFERENCE_WIDTHS) -> str:
    """Source text of a candidate module; the default widths give 94,762 parameters on CIFAR-10."""
    return _CNN_TEMPLATE.format(widths=tuple(widths))


REFERENCE_CNN = reference_cnn()

# ---------------------------------------------------------------- arguments and config


def parser(doc: str, *, train_subset: int, val_size: int, repeats: int, warmup: int = 1) -> argparse.ArgumentParser:
    """The flags every script shares; the defaults are each script's own."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="ImageFolder tree with train/ and test/")
    p.add_argument("--train-subset", type=int, default=train_subset, help="training images per candidate")
    p.add_argument("--val-size", type=int, default=val_size, help="held-out validation images")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds run first and discarded")
    p.add_argument("--config", default=None, help="optional YAML config; the flags above override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, as in the CLI (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print the table only, write no JSON")
    p.add_argument("--result-name", help="write benchmarks/results/NAME.json instead of the script's name")
    return p


def make_config(args: argparse.Namespace):
    from edgenas.config import load_config

    overrides = ["dataset.name=folder", f"dataset.root={args.data_root}",
                 f"dataset.train_subset={args.train_subset}", f"dataset.val_size={args.val_size}", *args.overrides]
    return load_config(args.config, overrides)


# ---------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict:
    """Median, min, max, spread (max - min) and sample standard deviation of the timed rounds."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    med = statistics.median(values)
    return {"n": len(values), "median": med, "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def fmt(stats: dict, unit: str = " s", digits: int = 2) -> str:
    """'12.34 s [12.01-12.90]' for a summary(); the median first, then the range."""
    if not stats.get("n"):
        return "-"
    text = f"{stats['median']:.{digits}f}{unit}"
    if stats["n"] > 1:
        text += f" [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"
    return text


def ratio(numerator: dict, denominator: dict) -> float:
    return numerator["median"] / denominator["median"]


# ---------------------------------------------------------------- timed runs


def evaluate_timed(evaluator, code: str) -> dict:
    """One evaluate() call, its host-side wall time and the numbers it reported; a failure raises."""
    start = time.perf_counter()
    result = evaluator.evaluate(code)
    wall = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"the reference candidate failed in {result.stage}: {result.failure.message}")
    return {"wall_s": wall, "train_s": result.train_seconds, "train_images": result.train_images,
            "stage_seconds": dict(result.stage_seconds), "val_accuracy": result.val_accuracy,
            "params": result.params}


def run_python(source: str, params: dict, timeout_s: float = 1800) -> dict:
    """Run `source` in a fresh interpreter with `params` as JSON in argv[1]; it must print one JSON line last.

    Returns that JSON plus `process_wall_s`, the wall time seen from here (interpreter start to exit).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="edgenas-bench-", delete=False) as f:
        f.write(source)
        path = f.name
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, path, json.dumps(params)], capture_output=True, text=True,
                              timeout=timeout_s, cwd=tempfile.gettempdir())
        wall = time.perf_counter() - start
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise RuntimeError(f"the baseline process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {**json.loads(lines[-1]), "process_wall_s": wall}


def rounds(warmup: int, repeats: int, log=print):
    """Yield (round index, timed?) and log progress; round 0..warmup-1 are discarded warm-up."""
    for i in range(warmup + repeats):
        timed = i >= warmup
        log(f"[round {i + 1}/{warmup + repeats}{'' if timed else ', warm-up'}]", flush=True)
        yield i, timed


# ---------------------------------------------------------------- machine and results


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict:
    import torch
    import torchvision

    dirty = _git("status", "--porcelain", "--", ".", ":!benchmarks/results")
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(), "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        # every uncommitted path of the tree but the results themselves
        "git_dirty": None if dirty is None else [line.split(maxsplit=1)[1] for line in dirty.splitlines()],
        "load_average_start": os.getloadavg(),
    }


def table(title: str, headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table; the first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, rule, line(cells[0]), rule, *map(line, cells[1:]), rule])


def finish(script: str, *, claim: str, target: str, passed: bool | None, args: argparse.Namespace, config,
           machine: dict, results: dict, tables: list[str], notes: list[str] = ()) -> Path | None:
    """Print the tables and notes, then write benchmarks/results/<script>.json (unless --no-write)."""
    machine = {**machine, "load_average_end": os.getloadavg()}
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[passed]
    notes = [*notes, f"load average at start {_loads(machine['load_average_start'])}, at end "
                     f"{_loads(machine['load_average_end'])} on {machine['cpu_count']} cores "
                     f"(anything above ~0 means the CPU was shared while measuring)"]
    print()
    for t in tables:
        print(t, end="\n\n")
    print(f"claim:  {claim}\ntarget: {target} -> {verdict}")
    for note in notes:
        print(f"note:   {note}")
    print(f"machine: {machine['cpu_model']} x{machine['cpu_count']}, torch {machine['torch']}, "
          f"commit {(machine['git_commit'] or '?')[:10]}")
    if args.no_write:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{getattr(args, 'result_name', None) or script}.json"
    payload = {"script": script, "claim": claim, "target": target, "passed": passed, "notes": notes,
               "args": vars(args), "config": config.model_dump(mode="json") if config is not None else None,
               "machine": machine, "results": results}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")  # default: paths among the args
    print(f"wrote {path.relative_to(REPO)}")
    return path


def _loads(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)
