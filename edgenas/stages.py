"""The evaluation stages that run inside the sandbox, cheapest first: build -> forward -> profile/budget
-> train -> validate -> latency.

`Worker` lives in the sandbox's zygote and holds the data in memory; `prepare` and `run` execute in
each forked, limited child. The host side is evaluate.py.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import time

import torch

from edgenas import profile
from edgenas.candidate import ContractError, construct, describe_exception, load_module
from edgenas.config import Config
from edgenas.data import Normalize, load_data
from edgenas.guard import SandboxViolation
from edgenas.records import FailureKind
from edgenas.train import NonFiniteLoss, build_optimizer, evaluate, steps_per_epoch, train_epoch, train_step

STAGES = ("build", "forward", "profile", "train", "validate", "latency")
STAGE_KIND = {"build": FailureKind.build, "forward": FailureKind.forward}


class StageFailure(Exception):
    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def classify(exc: BaseException, stage: str) -> tuple[FailureKind, str]:
    """Exception inside a stage -> (kind, diagnostic for the LLM)."""
    text = describe_exception(exc)
    if isinstance(exc, StageFailure):
        return exc.kind, exc.message
    if isinstance(exc, SandboxViolation):
        return FailureKind.forbidden, text
    if isinstance(exc, ContractError):
        return FailureKind.contract, str(exc)
    if isinstance(exc, NonFiniteLoss):
        return FailureKind.nan, f"{exc}; add normalisation layers, use a smaller initialisation, or fix arithmetic that can overflow or divide by zero"
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() \
            or "can't allocate memory" in str(exc).lower():
        return FailureKind.oom, f"{text}\n(out of memory during {stage}: make the model or its activations smaller)"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return FailureKind.runtime, "the model printed more output than allowed; remove print() calls from forward"
    if isinstance(exc, SystemExit):
        return FailureKind.runtime, "the model called exit(); a model module must only define Net"
    return STAGE_KIND.get(stage, FailureKind.runtime), text


class Worker:
    """Zygote-side state: config and data loaded once; `prepare` and `run` execute in each child."""

    with_test = False  # the proxy never sees the test split

    def __init__(self, init: dict):
        torch.set_num_threads(1)  # a multi-threaded OpenMP pool does not survive fork
        import torchvision.models  # noqa: F401 - its C ops load through ctypes, which the guard denies later

        self.config = Config.model_validate(init["config"])
        self.data = load_data(self.config.dataset, with_test=self.with_test)
        wanted = self.config.eval.device
        cuda = wanted != "cpu" and torch.cuda.is_available()
        if wanted == "cuda" and not cuda:
            raise RuntimeError("eval.device is 'cuda' but no CUDA device is available")
        self.device = "cuda" if cuda else "cpu"
        _warm_up()

    def info(self) -> dict:
        return {"dataset": self.data.name, "num_classes": self.data.num_classes, "in_shape": self.data.in_shape,
                "train_images": len(self.data.train), "val_images": len(self.data.val), "device": self.device}

    def prepare(self, job: dict) -> None:
        torch.set_num_threads(self.config.eval.threads or os.cpu_count() or 1)
        self.torch_device = torch.device(self.device)
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.config.eval.memory_limit_mb * 2**20 / total))
        self.train_split = self.data.train.to(self.torch_device)
        self.val_split = self.data.val.to(self.torch_device)
        self.memory = profile.PeakMemory(self.torch_device)

    def run(self, job: dict, report, isolation: list[str]) -> dict:
        out = {"device": self.device, "dataset": self.data.name, "isolation": isolation, "stage_seconds": {}}
        stage = "build"
        try:
            for stage in job.get("stages", STAGES):
                report({"stage": stage})
                start = time.perf_counter()
                getattr(self, f"_{stage}")(job, out)
                out["stage_seconds"][stage] = round(time.perf_counter() - start, 4)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
            kind, message = classify(exc, stage)
            out.update(status="failed", stage=stage, failure={"kind": kind.value, "message": message})
            return out
        out.update(status="ok", stage=stage)
        return out

    # ------------------------------------------------------------ stages

    def _build(self, job, out):
        torch.manual_seed(self.config.train.seed)  # the same seed for the same code: reproducible records
        namespace = load_module(job["code"])
        if "Net" not in namespace:
            raise StageFailure(FailureKind.contract, "the module defines no `Net`")
        self.model, out["constructor"] = construct(namespace["Net"], self.data.in_shape, self.data.num_classes)

    def _forward(self, job, out):
        self.model.eval()
        with torch.no_grad():
            y = self.model(torch.randn(2, *self.data.in_shape))
        expected = (2, self.data.num_classes)
        if not isinstance(y, torch.Tensor):
            raise StageFailure(FailureKind.shape, f"forward returned {type(y).__name__}; it must return a logits tensor of shape (B, {expected[1]})")
        if tuple(y.shape) != expected:
            raise StageFailure(FailureKind.shape, f"forward on a batch of shape (2, {', '.join(map(str, self.data.in_shape))}) returned shape {tuple(y.shape)}; expected {expected}: batch first, one logit per class ({expected[1]} classes)")
        if not torch.isfinite(y).all():
            raise StageFailure(FailureKind.nan, "forward returned NaN or inf on a random input batch at initialisation")

    def _profile(self, job, out):
        budget = self.config.budget
        out["params"] = profile.count_params(self.model)
        out["weight_bytes"] = profile.weight_bytes(self.model)
        self.model.eval()
        macs, unsupported, torch_macs = profile.count_macs(self.model, torch.randn(1, *self.data.in_shape))
        out.update(macs=macs if macs is not None else torch_macs, macs_unsupported_ops=unsupported, macs_flop_counter=torch_macs)
        if budget.max_params and out["params"] > budget.max_params:
            raise StageFailure(FailureKind.budget, f"{out['params']:,} parameters exceed the budget of {budget.max_params:,}")
        if budget.max_macs and out["macs"] > budget.max_macs:
            raise StageFailure(FailureKind.budget, f"{out['macs']:,} MACs exceed the budget of {budget.max_macs:,}")
        out["peak_memory_bytes"] = self._training_step_memory()
        if budget.max_memory_mb and out["peak_memory_bytes"] > budget.max_memory_mb * 2**20:
            raise StageFailure(FailureKind.budget, f"one training step at batch {self.config.train.batch_size} peaks at {out['peak_memory_bytes'] / 2**20:.0f} MiB, over the budget of {budget.max_memory_mb:.0f} MiB")

    def _training_step_memory(self) -> int:
        """One real step at the configured batch size on a throwaway copy; settles the memory layout too."""
        cfg = self.config.train
        images = self.train_split.images[: cfg.batch_size]
        labels = self.train_split.labels[: cfg.batch_size]
        for channels_last in dict.fromkeys([cfg.channels_last, False]):
            peak = self._probe_step(channels_last, images, labels)
            if peak is not None:
                return peak
        raise AssertionError("unreachable: the default layout either works or raises")

    def _probe_step(self, channels_last: bool, images, labels) -> int | None:
        """Peak bytes of one training step in this layout, or None when the model cannot use channels_last."""
        cfg = self.config.train
        probe = copy.deepcopy(self.model).to(self.torch_device)
        if channels_last:
            probe = probe.to(memory_format=torch.channels_last)
        normalize = Normalize(self.data.mean, self.data.std, self.torch_device, channels_last)
        optimizer = torch.optim.SGD(probe.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        try:
            probe.train()
            train_step(probe, optimizer, normalize(images), labels, cfg)  # warm-up: optimizer state, lazy init
            optimizer.zero_grad(set_to_none=True)  # the profiler cannot see frees of blocks made before it starts
            state_bytes = sum(t.numel() * t.element_size() for t in _training_state(probe, optimizer))
            with self.memory.region() as step:
                train_step(probe, optimizer, normalize(images), labels, cfg)
        except RuntimeError as e:
            if not channels_last or "memory" in str(e).lower():
                raise
            return None  # a view() that assumes NCHW: train this model in the default layout
        self.channels_last, self.normalize = channels_last, normalize
        # what the step needs: weights, gradients and optimizer state, plus its activations and temporaries
        return state_bytes + step["peak"]

    def _train(self, job, out):
        cfg = self.config.train
        model = self.model.to(self.torch_device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        per_epoch = steps_per_epoch(len(self.train_split), cfg.batch_size)
        total = max(1, round(cfg.epochs * per_epoch))
        optimizer, scheduler = build_optimizer(model, cfg, total)
        generator = torch.Generator().manual_seed(cfg.seed)
        stats, seconds, images = [], 0.0, 0
        for epoch in range(math.ceil(cfg.epochs)):
            steps = min(per_epoch, total - epoch * per_epoch)
            stats.append(train_epoch(model, optimizer, scheduler, self.train_split, self.normalize, cfg, generator, steps))
            seconds += stats[-1].seconds
            images += stats[-1].images
        out.update(train_loss_first=stats[0].loss_first, train_loss_last=stats[-1].loss_last,
                   train_seconds=round(seconds, 3), train_images=images)

    def _validate(self, job, out):
        accuracy, loss = evaluate(self.model, self.val_split, self.normalize, self.config.train.eval_batch_size)
        out.update(val_accuracy=accuracy, val_loss=loss)

    def _latency(self, job, out):
        example = self.normalize(self.val_split.images[:1])
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.eval.latency_threads)
        try:
            out["latency_ms"] = round(profile.latency_ms(self.model, example, runs=self.config.eval.latency_runs), 4)
        finally:
            torch.set_num_threads(threads)


def _training_state(model, optimizer):
    """Every tensor a training step keeps alive between steps, each once."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return {t.data_ptr(): t for t in tensors}.values()


def _warm_up() -> None:
    """Pay one-time lazy initialisation (FLOP counter, fvcore, autograd) once in the zygote, not per child."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    profile.count_macs(model.eval(), torch.randn(1, 3, 8, 8))
    model.train()(torch.randn(2, 3, 8, 8)).sum().backward()


