"""What a model costs: parameters, MACs, weight bytes, training-step peak memory, eager latency."""

from __future__ import annotations

import os
import statistics
import time

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
    """Peak memory of a region: CUDA's allocator statistics, or the kernel's RSS high-water mark on CPU.

    On CPU /proc/self/clear_refs ("5") resets VmHWM to the current RSS, so the peak of one region can be
    read in a forked child whose counters were inherited. The handle is opened before the sandbox guard.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device):
        import ctypes

        self.device = device
        self.clear_fd = os.open("/proc/self/clear_refs", os.O_WRONLY) if device.type == "cpu" else None
        self._mallopt = ctypes.CDLL(None).mallopt if device.type == "cpu" else None

    def exact(self, on: bool) -> None:
        """While on, every buffer over 128 KiB is its own mmap, freed at once, so RSS peaks are honest.

        Off, glibc keeps and reuses freed buffers up to 32 MiB without faulting pages in again (what its
        dynamic threshold converges to): training runs ~2x faster that way, but a peak read then would miss
        memory reused from earlier steps. Setting one threshold freezes the other, so both are set.
        """
        if self._mallopt is not None:
            self._mallopt(self.M_MMAP_THRESHOLD, 128 << 10 if on else 32 << 20)
            self._mallopt(self.M_TRIM_THRESHOLD, 128 << 10 if on else 64 << 20)

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_kb("VmRSS:")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            os.write(self.clear_fd, b"5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kb("VmHWM:")


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
