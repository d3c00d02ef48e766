"""Batch-1 latency, file size and accuracy of MLPerf Tiny ResNet-8: torch eager vs onnxruntime fp32 vs INT8.

ResNet-8 (the MLPerf Tiny image-classification model: stem conv 16, residual stages 16/32/64 with stride
1/2/2, global pooling, linear; 77,946 parameters) is trained briefly on real CIFAR-10 images - by default
4 epochs over a 20,000-image subset with a one-cycle schedule, far short of a full training run, so its
accuracy is well below the ~87% of a fully trained ResNet-8. Training is there so that test accuracy and
top-1 agreement mean something. The model is exported with exporters.onnx_export (parity against PyTorch
checked on the whole test split), quantised with exporters.quantize (static QDQ, per-channel, calibrated
on training images) and timed:

- torch eager: edgenas.profile.latency_ms, in NCHW and channels_last (the faster is the baseline);
- onnxruntime fp32 and INT8: exporters.bench, each in a fresh `python -m exporters.bench` process (no torch
  threads spinning beside it), with 1 thread and all threads.

Every round measures every configuration, in alternating order; the table shows medians of the per-round
p50 latencies with [min-max] over rounds.

Targets: onnxruntime fp32 <= 0.3x torch eager; INT8 <= 0.8x onnxruntime fp32; INT8 file >= 3.5x smaller;
<= 1 point of test accuracy lost to INT8.

    python benchmarks/export_latency.py                          # 20,000 images x 4 epochs, 5 timed rounds
    python benchmarks/export_latency.py --epochs 1 --train-subset 5000 --repeats 2 --no-write   # smoke test
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import REPO, finish, fmt, machine_info, make_config, parser, rounds, summary, table
from torch.utils.flop_counter import FlopCounterMode

from edgenas.candidate import construct, load_module
from edgenas.data import Normalize, load_data
from edgenas.profile import count_params, latency_ms
from edgenas.train import build_optimizer, evaluate, steps_per_epoch, train_epoch
from exporters.bench import available_cores
from exporters.card import environment
from exporters.onnx_export import check_parity, export_onnx, onnx_logits, parity
from exporters.quantize import quantize_int8

RESNET8 = '''
class Block(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: identity, or a strided 1x1 conv where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Net(nn.Module):
    """MLPerf Tiny ResNet-8: stem conv 16, residual stages 16/32/64 (stride 1/2/2), average pool, linear."""

    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))
'''
TARGETS = {"ort_fp32_vs_eager": 0.3, "int8_vs_fp32": 0.8, "file_ratio": 3.5, "accuracy_drop_points": 1.0}
CLAIM = ("onnxruntime runs ResNet-8 at batch 1 far faster than torch eager, and static INT8 is faster, "
         "3.5x smaller and as accurate")
TRAIN_DEFAULTS = ["train.schedule=onecycle", "train.lr=0.1"]


def train(model, data, config, epochs: int) -> None:
    """The evaluator's training loop (edgenas.train), channels_last, a one-cycle schedule over all epochs."""
    normalize = Normalize(data.mean, data.std, "cpu", channels_last=True)
    model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, config.train, epochs * steps_per_epoch(len(data.train),
                                                                                         config.train.batch_size))
    generator = torch.Generator().manual_seed(config.train.seed)
    for epoch in range(epochs):
        stats = train_epoch(model, optimizer, scheduler, data.train, normalize, config.train, generator)
        print(f"  epoch {epoch + 1}/{epochs}: loss {stats.loss_mean:.3f}, {stats.seconds:.0f} s", flush=True)


def ort_bench(path: Path, threads: int, runs: int) -> dict:
    """exporters.bench in a fresh process, as a torch-free target device would run it."""
    proc = subprocess.run([sys.executable, "-m", "exporters.bench", str(path), "--threads", str(threads),
                           "--runs", str(runs), "--warmup", "30", "--json"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"exporters.bench failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def eager_bench(model, example, threads: int, runs: int, channels_last: bool) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    try:
        return latency_ms(model.to(memory_format=fmt_), example.contiguous(memory_format=fmt_), runs=runs, warmup=30)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    p = parser(__doc__, train_subset=20000, val_size=1000, repeats=5)
    p.add_argument("--epochs", type=int, default=4, help="training epochs over the subset")
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs per latency measurement")
    p.add_argument("--calibration", type=int, default=500, help="training images that calibrate INT8")
    args = p.parse_args()
    args.overrides = [*TRAIN_DEFAULTS, *args.overrides]
    config = make_config(args)
    machine = {**machine_info(), "versions": environment()}
    all_threads = available_cores()

    data = load_data(config.dataset, ("train", "val", "test"))
    torch.manual_seed(config.train.seed)
    model, _ = construct(load_module(RESNET8)["Net"], data.in_shape, data.num_classes)
    normalize = Normalize(data.mean, data.std, "cpu")
    example = normalize(data.test.images[:1])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(example)
    macs = counter.get_total_flops() // 2
    print(f"ResNet-8: {count_params(model):,} parameters, {macs:,} MACs; training {args.epochs} epochs on "
          f"{len(data.train):,} images", flush=True)
    train(model, data, config, args.epochs)
    model.eval()

    work = Path(tempfile.mkdtemp(prefix="export-latency-"))
    fp32_path = export_onnx(model, data.in_shape, work / "resnet8.onnx")
    test_images = normalize(data.test.images)
    labels = data.test.labels.numpy()
    parity_report = check_parity(parity(model, fp32_path, test_images))
    int8_path = quantize_int8(fp32_path, work / "resnet8.int8.onnx", normalize(data.train.images[: args.calibration]))
    accuracy = {
        "torch": evaluate(model, data.test, normalize, 500)[0],
        "onnx_fp32": float((onnx_logits(fp32_path, test_images).argmax(1) == labels).mean()),
        "onnx_int8": float((onnx_logits(int8_path, test_images).argmax(1) == labels).mean()),
    }
    sizes = {"fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}

    configs = [(f"{kind} {threads}t", kind, threads) for threads in dict.fromkeys([1, all_threads])
               for kind in ("eager NCHW", "eager channels_last", "onnxruntime fp32", "onnxruntime int8")]
    p50 = {name: [] for name, _, _ in configs}
    p90 = {name: [] for name, _, _ in configs if name.startswith("onnx")}
    for i, timed in rounds(args.warmup, args.repeats):
        for name, kind, threads in configs if i % 2 == 0 else configs[::-1]:
            if kind.startswith("eager"):
                value = eager_bench(model, example, threads, args.runs, kind.endswith("channels_last"))
            else:
                result = ort_bench(fp32_path if kind.endswith("fp32") else int8_path, threads, args.runs)
                value = result["p50_ms"]
                if timed:
                    p90[name].append(result["p90_ms"])
            if timed:
                p50[name].append(value)
    shutil.rmtree(work)
    stats = {name: summary(values) for name, values in p50.items()}
    p90_stats = {name: summary(values) for name, values in p90.items()}

    rows, checks = [], {}

    def check(key: str, value: float, target: float, at_least: bool = False) -> None:
        checks[key] = {"value": value, "target": target, "ok": value >= target if at_least else value <= target}

    for threads in dict.fromkeys([1, all_threads]):
        eager = min(stats[f"eager NCHW {threads}t"]["median"], stats[f"eager channels_last {threads}t"]["median"])
        fp32 = stats[f"onnxruntime fp32 {threads}t"]["median"]
        check(f"ort fp32 / eager, {threads} thread(s)", fp32 / eager, TARGETS["ort_fp32_vs_eager"])
        check(f"int8 / ort fp32, {threads} thread(s)", stats[f"onnxruntime int8 {threads}t"]["median"] / fp32,
              TARGETS["int8_vs_fp32"])
        for kind in ("eager NCHW", "eager channels_last", "onnxruntime fp32", "onnxruntime int8"):
            name = f"{kind} {threads}t"
            med = stats[name]["median"]
            rows.append([kind, threads, fmt(stats[name], " ms", 3),
                         fmt(p90_stats[name], " ms", 3) if name in p90_stats else "-",
                         f"{med / eager:.2f}x", f"{med / fp32:.2f}x" if kind.startswith("onnx") else "-"])
    file_ratio = sizes["fp32_bytes"] / sizes["int8_bytes"]
    drop = 100 * (accuracy["onnx_fp32"] - accuracy["onnx_int8"])
    check("fp32 file / int8 file", file_ratio, TARGETS["file_ratio"], at_least=True)
    check("accuracy points lost to int8", drop, TARGETS["accuracy_drop_points"])

    latency_table = table(
        f"ResNet-8 batch-1 latency, median of {args.repeats} rounds of p50 over {args.runs} runs [min-max]",
        ["runtime", "threads", "p50", "p90", "vs eager", "vs ort fp32"], rows)
    quality_table = table(
        f"ResNet-8 files and accuracy on the {len(labels):,} test images",
        ["measure", "fp32", "int8", "ratio / change", "target", ""],
        [["file bytes", f"{sizes['fp32_bytes']:,}", f"{sizes['int8_bytes']:,}", f"{file_ratio:.2f}x smaller",
          f">= {TARGETS['file_ratio']}x", ""],
         ["test top-1 (onnxruntime)", f"{accuracy['onnx_fp32']:.2%}", f"{accuracy['onnx_int8']:.2%}",
          f"{-drop:+.2f} points", f"<= {TARGETS['accuracy_drop_points']} lost", ""],
         ["test top-1 (torch)", f"{accuracy['torch']:.2%}", "-", "-", "-", "-"],
         ["parity fp32 vs torch", f"max |diff| {parity_report['max_abs_diff']:.2g}",
          f"top-1 agreement {parity_report['top1_agreement']:.2%}", "-", "<= 1e-4, >= 99.9%", "checked"]])
    verdict_table = table("targets", ["check", "value", "target", "verdict"],
                          [[key, f"{c['value']:.2f}", c["target"], "ok" if c["ok"] else "MISSED"]
                           for key, c in checks.items()])
    finish("export_latency", claim=CLAIM,
           target="ort fp32 <= 0.3x eager; int8 <= 0.8x ort fp32; int8 file >= 3.5x smaller; <= 1 point lost",
           passed=all(c["ok"] for c in checks.values()), args=args, config=config, machine=machine,
           tables=[latency_table, quality_table, verdict_table],
           results={"params": count_params(model), "macs": macs, "epochs": args.epochs,
                    "train_images": len(data.train), "accuracy": accuracy, "sizes": sizes, "parity": parity_report,
                    "p50_ms": stats, "p90_ms": p90_stats, "checks": checks,
                    "targets": TARGETS, "model_source": RESNET8},
           notes=[f"trained {args.epochs} epochs on {len(data.train):,} CIFAR-10 images only (brief, not converged)",
                  "eager baseline = the faster of NCHW and channels_last at the same thread count",
                  f"onnxruntime timings from fresh `python -m exporters.bench` processes, {args.runs} runs each"])


if __name__ == "__main__":
    main()
