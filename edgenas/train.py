"""The training loop, shared by the one-epoch proxy and by finalize's full training."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from edgenas.config import TrainConfig
from edgenas.data import Normalize, Split, batches


class NonFiniteLoss(ArithmeticError):
    pass


@dataclass
class EpochStats:
    loss_first: float
    loss_mean: float
    loss_last: float  # mean over the last tenth of the steps: less noisy than one batch
    steps: int
    images: int
    seconds: float


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """SGD with momentum and weight decay (the paper's protocol), with an optional schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    elif cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(1, total_steps))
    else:
        scheduler = None
    return optimizer, scheduler


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def train_step(model, optimizer, images, labels, cfg: TrainConfig) -> torch.Tensor:
    with _autocast(images.device, cfg.amp):
        loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model, optimizer, scheduler, split: Split, normalize: Normalize, cfg: TrainConfig,
                generator: torch.Generator, max_steps: int | None = None, check_every: int = 10) -> EpochStats:
    """One pass (or `max_steps` batches) over `split`, shuffled and augmented per batch on its device."""
    model.train()
    start, losses = time.perf_counter(), []
    images_seen = 0
    for step, (images, labels) in enumerate(batches(split, cfg.batch_size, normalize, shuffle=True,
                                                    augment=cfg.augment, generator=generator)):
        if max_steps is not None and step >= max_steps:
            break
        losses.append(train_step(model, optimizer, images, labels, cfg))
        if scheduler is not None:
            scheduler.step()
        images_seen += len(labels)
        if step % check_every == 0 and not math.isfinite(losses[-1].item()):
            raise NonFiniteLoss(f"the training loss became {losses[-1].item()} at step {step}")
    values = torch.stack(losses).float().cpu()
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise NonFiniteLoss(f"the training loss became {values[bad].item()} at step {bad}")
    tail = values[-max(1, len(values) // 10):]
    return EpochStats(float(values[0]), float(values.mean()), float(tail.mean()), len(values), images_seen,
                      time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model, split: Split, normalize: Normalize, batch_size: int, amp: bool = False) -> tuple[float, float]:
    """(accuracy in 0..1, mean cross-entropy) over a whole split."""
    model.eval()
    correct = torch.zeros((), device=split.labels.device)
    loss_sum = torch.zeros((), device=split.labels.device)
    for images, labels in batches(split, batch_size, normalize):
        with _autocast(images.device, amp):
            logits = model(images).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return correct.item() / len(split), loss_sum.item() / len(split)
