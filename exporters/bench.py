"""onnxruntime latency of one .onnx file, runnable on a target device that has only onnxruntime and numpy.

Nothing on this module's import path may import torch (exporters/__init__.py imports nothing):

    python -m exporters.bench model.onnx --threads 1 --runs 200 --warmup 20 --batch 1 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnxruntime as ort

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def available_cores() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device() -> dict:
    """What latency numbers are measured on."""
    return {"cpu": cpu_model(), "cores": available_cores(), "machine": platform.machine(),
            "system": platform.platform(), "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def session(model: str | os.PathLike | bytes, threads: int, optimize: bool = True) -> ort.InferenceSession:
    """CPU session with every graph optimisation (or none) and a fixed intra-op thread count (0 would mean ORT's
    guess). A model given as bytes is read from no path."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def timed_runs(sess: ort.InferenceSession, feed: dict, runs: int, warmup: int,
               deadline: float | None = None) -> np.ndarray:
    """Milliseconds of `runs` session.run calls after `warmup` untimed ones; only run() sits inside the timer.
    Past `deadline` (time.monotonic), no new run starts: fewer times come back, at least one."""
    outputs = [o.name for o in sess.get_outputs()]
    past = (lambda: False) if deadline is None else (lambda: time.monotonic() > deadline)
    for _ in range(warmup):
        if past():
            break
        sess.run(outputs, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(outputs, feed)
        times.append(time.perf_counter() - start)
        if past():
            break
    return np.array(times) * 1000


def random_input(node, batch: int) -> np.ndarray:
    """Standard-normal input of the node's shape; the leading (batch) dim becomes `batch`."""
    if node.type not in DTYPES:
        raise ValueError(f"input '{node.name}' has type {node.type}; only float inputs can be benchmarked")
    shape = list(node.shape)
    if isinstance(shape[0], int) and shape[0] != batch:
        raise ValueError(f"input '{node.name}' has a fixed batch of {shape[0]}; cannot run batch {batch}")
    shape[0] = batch
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input '{node.name}' has dynamic dims besides the batch: {node.shape}")
    return np.random.default_rng(0).standard_normal(shape).astype(DTYPES[node.type])


def bench(model_path: str | os.PathLike | bytes, threads: int | None = None, runs: int = 200, warmup: int = 20,
          batch: int = 1, deadline: float | None = None) -> dict:
    """Latency percentiles of `runs` timed session.run calls after `warmup` untimed ones (fewer past `deadline`, a
    time.monotonic() value).

    threads=None uses every core this process may run on. Only session.run sits inside the timer. The model is a
    path, or the file's bytes (the device agent's and the search's case).
    """
    if runs < 1 or warmup < 0 or batch < 1:
        raise ValueError("runs and batch must be >= 1 and warmup >= 0")
    threads = threads or available_cores()
    sess = session(model_path, threads)
    node = sess.get_inputs()[0]
    feed = {node.name: random_input(node, batch)}
    times = timed_runs(sess, feed, runs, warmup, deadline)
    p50 = float(np.percentile(times, 50))
    return {
        "model": f"{len(model_path):,} bytes" if isinstance(model_path, bytes) else str(model_path), "p50_ms": p50, "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(times.mean()), "min_ms": float(times.min()), "throughput_per_s": 1000 * batch / p50,
        "threads": threads, "batch": batch, "runs": runs, "warmup": warmup, "input_shape": list(feed[node.name].shape),
        "onnxruntime": ort.__version__, "cpu": cpu_model(), "cores": available_cores(),
        "providers": sess.get_providers(),
    }


def format_table(result: dict) -> str:
    """Two aligned columns, one line per field."""
    width = max(map(len, result))
    return "\n".join(f"{key.ljust(width)}  {f'{value:.3f}' if isinstance(value, float) else value}"
                     for key, value in result.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exporters.bench", description="onnxruntime latency of an .onnx model")
    p.add_argument("model", help="path of the .onnx file")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all available cores)")
    p.add_argument("--runs", type=int, default=200, help="timed runs")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    result = bench(args.model, threads=args.threads, runs=args.runs, warmup=args.warmup, batch=args.batch)
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
