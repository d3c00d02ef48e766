"""What a model costs: parameters, MACs, weight bytes, training-step peak memory, eager latency."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch


def count_params(model: torch.nn.Module) -> int:
    """Each parameter tensor once, however many modules share it."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the saved weights: parameters and buffers, shared tensors once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t.numel()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> tuple[int | None, dict[str, int], int]:
    """Multiply-accumulates for one forward pass, by fvcore, cross-checked by torch's FLOP counter.

    fvcore counts one per multiply-add and names the ops it could not count; torch.utils.flop_counter
    counts conv/linear/matmul FLOPs (2 per MAC) and survives models fvcore's JIT trace cannot follow.
    Returns (fvcore MACs or None if tracing failed, uncounted ops, flop_counter MACs).
    """
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(example)
        torch_macs = counter.get_total_flops() // 2
        try:
            analysis = FlopCountAnalysis(model, example)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            return int(analysis.total()), dict(analysis.unsupported_ops()), int(torch_macs)
        except Exception:  # noqa: BLE001 - data-dependent control flow defeats tracing; fall back
            return None, {}, int(torch_macs)


class PeakMemory:
    """Peak bytes that tensors allocated during a region, above what was allocated when it began.

    CUDA: the caching allocator's statistics. CPU: the profiler's allocation events, replayed in order; this
    is allocator-exact and the same on every run, unlike the process's RSS (which moves with page
    granularity and glibc's caching), so records and the prompts built from them reproduce.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.quiet_fd = os.open(os.devnull, os.O_WRONLY)  # opened before the sandbox guard denies it

    @contextmanager
    def region(self):
        found: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield found
            torch.cuda.synchronize(self.device)
            found["peak"] = torch.cuda.max_memory_allocated(self.device) - start
            return
        from torch.profiler import ProfilerActivity, profile

        saved = os.dup(2)
        os.dup2(self.quiet_fd, 2)  # the profiler logs its start and stop on stderr, into the candidate's output
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield found
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        running = peak = 0
        for _, nbytes in deltas:
            running += nbytes
            peak = max(peak, running)
        found["peak"] = peak


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
