"""What runs inside the jail for one proxy evaluation: build -> forward check -> graph -> train -> trained graph.

Everything here touches candidate code and is untrusted by construction: it reports stages, failures with
diagnostics for the LLM, and hands back ONNX graphs (data, not code). It computes no number the search ranks
by: params, MACs, memory, accuracy and latency are measured by the trusted side (edgenas/referee.py) on the
graphs, with validation images this process never had.
"""

from __future__ import annotations

import contextlib
import errno
import math
import time

import torch

from edgenas.candidate import ContractError, construct, describe_exception, load_module
from edgenas.config import Config
from edgenas.data import Normalize, load_data
from edgenas.records import FailureKind
from edgenas.sandbox.guard import SandboxViolation
from edgenas.train import NonFiniteLoss, build_optimizer, steps_per_epoch, train_epoch, train_step

STAGES = ("build", "forward", "profile", "train", "validate", "latency")  # the last two run on the trusted side
STAGE_KIND = {"build": FailureKind.build, "forward": FailureKind.forward, "profile": FailureKind.export}


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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FailureKind.runtime, "the model wrote more to disk than allowed; a model module must not write files"
    if isinstance(exc, SystemExit):
        return FailureKind.runtime, "the model called exit(); a model module must only define Net"
    return STAGE_KIND.get(stage, FailureKind.runtime), text


class ProxyJob:
    """Zygote-side state (config, the training images, nothing else); `run` executes in each jailed job."""

    def __init__(self, init: dict):
        torch.set_num_threads(1)  # a multi-threaded OpenMP pool does not survive fork
        import torchvision.models  # noqa: F401 - loads its C ops now, while that is still allowed

        self.config = Config.model_validate(init["config"])
        self.data = load_data(self.config.dataset, parts=self.parts)
        wanted = self.config.eval.device
        cuda = wanted != "cpu" and torch.cuda.is_available()
        if wanted == "cuda" and not cuda:
            raise RuntimeError("eval.device is 'cuda' but no CUDA device is available")
        self.device = "cuda" if cuda else "cpu"
        _warm_up(self.data.in_shape)

    parts = ("train",)  # the proxy trains on the training split; validation images never enter the jail

    def info(self) -> dict:
        return {"dataset": self.data.name, "num_classes": self.data.num_classes, "in_shape": self.data.in_shape,
                "train_images": len(self.data.train), "device": self.device, "mean": self.data.mean,
                "std": self.data.std}

    def setup(self) -> None:
        """In the job, inside the jail: threads, the device and its memory cap, the data on it."""
        torch.set_num_threads(self.config.eval.threads or _cores())
        self.torch_device = torch.device(self.device)
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.config.eval.memory_limit_mb * 2**20 / total))
        self.train_split = self.data.train.to(self.torch_device)

    def run(self, job: dict, payload: bytes, send) -> None:
        self.job = job
        self.seed = job.get("seed", self.config.train.seed)  # another seed re-runs a close win (search.confirm_margin)
        self.setup()
        stage = "build"
        out: dict = {}
        try:
            for stage in [s for s in job.get("stages") or STAGES if s in ("build", "forward", "profile", "train")]:
                send({"kind": "stage", "stage": stage})
                getattr(self, f"_{stage}")(out, send)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message
            kind, message = classify(exc, stage)
            send({"kind": "result", "status": "failed", "stage": stage, "failure": {"kind": kind.value, "message": message}})
            return
        send({"kind": "result", "status": "ok", "stage": stage, **out})

    # ------------------------------------------------------------ stages

    def _build(self, out, send):
        torch.manual_seed(self.seed)  # the same seed for the same code: reproducible records
        namespace = load_module_checked(self.job["code"])
        self.model, out["constructor"] = construct(namespace["Net"], self.data.in_shape, self.data.num_classes)

    def _forward(self, out, send):
        check_forward(self.model, self.data.in_shape, self.data.num_classes)

    def _profile(self, out, send):
        """The untrained graph: the trusted side counts params, MACs and memory on it and checks the budgets while
        this job goes on (and stops it when one is exceeded)."""
        send({"kind": "graph", "trained": False}, export_graph(self.model, self.data.in_shape))

    def _train(self, out, send):
        cfg = self.config.train
        self.channels_last = cfg.channels_last and self._channels_last_works()
        model = self.model.to(self.torch_device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        normalize = Normalize(self.data.mean, self.data.std, self.torch_device, self.channels_last)
        per_epoch = steps_per_epoch(len(self.train_split), cfg.batch_size)
        total = max(1, round(cfg.epochs * per_epoch))
        optimizer, scheduler = build_optimizer(model, cfg, total)
        generator = torch.Generator().manual_seed(self.seed)
        stats, images = [], 0
        start = time.perf_counter()
        for epoch in range(math.ceil(cfg.epochs)):
            steps = min(per_epoch, total - epoch * per_epoch)
            stats.append(train_epoch(model, optimizer, scheduler, self.train_split, normalize, cfg, generator, steps))
            images += stats[-1].images
        out.update(train_loss_first=stats[0].loss_first, train_loss_last=stats[-1].loss_last,
                   train_seconds=round(time.perf_counter() - start, 3), train_images=images,
                   channels_last=self.channels_last)
        send({"kind": "graph", "trained": True}, export_graph(model, self.data.in_shape))

    def _channels_last_works(self) -> bool:
        """One training step at batch 2 in channels_last; a view() that assumes NCHW trains in the default layout."""
        import copy

        probe = copy.deepcopy(self.model).to(self.torch_device).to(memory_format=torch.channels_last)
        images = self.train_split.images[:2]
        normalize = Normalize(self.data.mean, self.data.std, self.torch_device, True)
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
        try:
            probe.train()
            train_step(probe, optimizer, normalize(images), self.train_split.labels[:2], self.config.train)
        except RuntimeError as e:
            if "memory" in str(e).lower():
                raise
            return False
        return True


def load_module_checked(code: str) -> dict:
    namespace = load_module(code)
    if "Net" not in namespace:
        raise StageFailure(FailureKind.contract, "the module defines no `Net`")
    return namespace


def check_forward(model, in_shape, num_classes: int) -> None:
    """A batch of 2 random images must give finite logits of shape (2, num_classes)."""
    model.eval()
    with torch.no_grad(), _submodule_inputs(model) as inputs:
        try:
            y = model(torch.randn(2, *in_shape))
        except Exception as exc:
            note = _failing_submodule(exc, model, inputs)
            if note:  # what add_note does, which Python 3.10 lacks; describe_exception shows it
                exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
            raise
    expected = (2, num_classes)
    if not isinstance(y, torch.Tensor):
        raise StageFailure(FailureKind.shape, f"forward returned {type(y).__name__}; it must return a logits tensor of shape (B, {num_classes})")
    if tuple(y.shape) != expected:
        raise StageFailure(FailureKind.shape, f"forward on a batch of shape (2, {', '.join(map(str, in_shape))}) returned shape {tuple(y.shape)}; expected {expected}: batch first, one logit per class ({num_classes} classes)")
    if not torch.isfinite(y).all():
        raise StageFailure(FailureKind.nan, "forward returned NaN or inf on a random input batch at initialisation")


@contextlib.contextmanager
def _submodule_inputs(model):
    """The input shapes each submodule was last called with, recorded by pre-hooks that live only for the check."""
    inputs: dict[int, str] = {}

    def record(module, args):
        inputs[id(module)] = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__
                                       for a in args)

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if m is not model and not isinstance(m, torch.jit.ScriptModule)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _failing_submodule(exc: BaseException, model, inputs: dict[int, str]) -> str | None:
    """The innermost submodule whose own code the exception passed through, what it got and what it expects.

    In a line like `self.fc(self.pool(self.features(x)))` the traceback's candidate line cannot say which call
    failed; the frames of the modules' forward methods can.
    """
    names = {id(m): name for name, m in model.named_modules() if m is not model}
    tb, innermost = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names and id(owner) in inputs:
            innermost = owner
        tb = tb.tb_next
    if innermost is None:
        return None
    expects = _expects(innermost)
    kind = type(innermost).__name__ + (f", {expects}" if expects else "")
    got = f": got input of shape {inputs[id(innermost)]}" if inputs[id(innermost)] else ""
    return f"in `{names[id(innermost)]}` ({kind}){got}"


def _expects(module) -> str:
    nn = torch.nn
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return ""
    if isinstance(module, nn.Linear):
        return f"expects {module.in_features} input features in the last dimension"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"expects {module.in_channels} input channels"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"expects {module.num_features} channels"
    if isinstance(module, nn.GroupNorm):
        return f"expects {module.num_channels} channels"
    if isinstance(module, nn.LayerNorm):
        return f"expects trailing dimensions {tuple(module.normalized_shape)}"
    return ""


def export_graph(model, in_shape) -> bytes:
    """The model in eval mode as ONNX bytes; a failure is the candidate's (kind `export`), with the exporter's reason."""
    from exporters.onnx_export import ExportError, graph_bytes

    try:
        return graph_bytes(model, in_shape)
    except ExportError as e:
        raise StageFailure(FailureKind.export, f"{e}; write forward without Python branches on tensor values, "
                                               f"in-place tricks or non-tensor outputs so it exports to ONNX") from None


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _warm_up(in_shape) -> None:
    """Pay one-time lazy initialisation (autograd, the ONNX exporter) once in the zygote, not per job."""
    model = torch.nn.Sequential(torch.nn.Conv2d(in_shape[0], 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model.train()(torch.randn(2, *in_shape)).sum().backward()
    export_graph(model, in_shape)
