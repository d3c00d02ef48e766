"""PyTorch-side costs for tools that hold a model: parameters and eager latency. The numbers a search ranks by
come from the exported graph instead (edgenas/referee.py)."""

from __future__ import annotations

import statistics
import time

import torch


def count_params(model: torch.nn.Module) -> int:
    """Each parameter tensor once, however many modules share it."""
    return sum(p.numel() for p in model.parameters())


def latency_ms(model: torch.nn.Module, example: torch.Tensor, runs: int = 30, warmup: int = 5) -> float:
    """Median batch-1 eager latency; warm-up excluded, the device synchronised around each run."""
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(example)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
