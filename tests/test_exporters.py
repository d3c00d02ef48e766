"""Export, parity, INT8 quantisation, torch-free benchmarking and model cards, on a CNN trained on real CIFAR-10.

The CNN is trained for a few hundred steps so that its top-1 is meaningful: agreement between PyTorch and
onnxruntime on an untrained net measures rounding of near-ties, not the export.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgenas.candidate import construct, load_module
from edgenas.config import DatasetConfig, TrainConfig
from edgenas.data import Normalize, load_data
from edgenas.profile import count_params
from edgenas.train import build_optimizer, steps_per_epoch, train_epoch
from exporters.bench import bench
from exporters.card import environment, write_card
from exporters.onnx_export import ParityError, check_parity, export_onnx, onnx_logits, parity
from exporters.quantize import quantize_int8

from .conftest import ROOT, program

# Weights sit in the low-resolution layers: 133k parameters (enough for int8 to pay off in file size)
# for 4 M MACs (cheap to train on a shared CPU). Residual add, BatchNorm and adaptive pooling included.
SMALL_CNN = '''
class Net(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()

        def conv(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(conv(in_shape[0], 16, 2), conv(16, 32), nn.MaxPool2d(2), conv(32, 64),
                                      nn.MaxPool2d(2))
        self.residual = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
        self.widen = conv(64, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = F.relu(x + self.residual(x))
        return self.head(torch.flatten(nn.AdaptiveAvgPool2d(1)(self.widen(x)), 1))
'''
STEPS, BATCH = 300, 64
N_TEST = 2000  # every fifth real test image (200 per class), or every generated one


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return construct(load_module(SMALL_CNN)["Net"], (3, 32, 32), 10)[0]


@pytest.fixture(scope="module")
def data(cifar_folder):
    # the cache goes to $EDGENAS_CACHE, which conftest points at a temporary directory for the session
    return load_data(DatasetConfig(name="folder", root=str(cifar_folder), train_subset=STEPS * BATCH // 3,
                                   val_size=500), ("train", "val", "test"))


@pytest.fixture(scope="module")
def normalize(data):
    return Normalize(data.mean, data.std, "cpu")


@pytest.fixture(scope="module")
def test_images(data, normalize):
    step = max(1, len(data.test) // N_TEST)
    return normalize(data.test.images[::step][:N_TEST]), data.test.labels[::step][:N_TEST].numpy()


@pytest.fixture(scope="module")
def trained(data):
    """Three epochs over 6,400 training images: 300 steps of 64."""
    model = build(0).to(memory_format=torch.channels_last)
    cfg = TrainConfig(batch_size=BATCH, lr=0.05, schedule="onecycle", epochs=3)
    optimizer, scheduler = build_optimizer(model, cfg, 3 * steps_per_epoch(len(data.train), BATCH))
    fast = Normalize(data.mean, data.std, "cpu", channels_last=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_epoch(model, optimizer, scheduler, data.train, fast, cfg, generator)
    return model.eval()


@pytest.fixture(scope="module")
def fp32_path(trained, tmp_path_factory):
    return export_onnx(trained, (3, 32, 32), tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def int8_path(fp32_path, data, normalize):
    return quantize_int8(fp32_path, fp32_path.with_name("model.int8.onnx"), normalize(data.train.images[:256]))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_export_is_one_valid_file_with_a_dynamic_batch(fp32_path):
    onnx.checker.check_model(str(fp32_path), full_check=True)
    graph = onnx.load(str(fp32_path)).graph
    assert not list(fp32_path.parent.glob("*.data"))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        (logits,) = session.run(None, {"input": np.random.default_rng(0).standard_normal((batch, 3, 32, 32),
                                                                                         dtype=np.float32)})
        assert logits.shape == (batch, 10)


def test_training_made_top1_meaningful(trained, test_images):
    images, labels = test_images
    with torch.no_grad():
        assert accuracy(trained(images).numpy(), labels) > 0.3  # chance is 0.1


def test_parity_on_test_images(trained, fp32_path, test_images):
    report = check_parity(parity(trained, fp32_path, test_images[0]))
    assert report["n"] == len(test_images[0]) >= 1000
    assert report["max_abs_diff"] < 1e-4 and report["top1_agreement"] >= 0.999


def test_parity_fails_loudly(trained, fp32_path, test_images, tmp_path):
    images = test_images[0][:500]
    with pytest.raises(ParityError, match="differs"):  # another model than the one exported
        check_parity(parity(build(1).eval(), fp32_path, images))

    tampered = onnx.load(str(fp32_path))  # weights corrupted inside a valid file
    weight = max(tampered.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(values + 0.05 * np.abs(values).max(), weight.name))
    onnx.save(tampered, str(tmp_path / "tampered.onnx"))
    with pytest.raises(ParityError, match="max"):
        check_parity(parity(trained, tmp_path / "tampered.onnx", images))

    damaged = tmp_path / "damaged.onnx"  # a truncated file
    damaged.write_bytes(fp32_path.read_bytes()[: fp32_path.stat().st_size // 2])
    with pytest.raises(ParityError, match="cannot run"):
        parity(trained, damaged, images)


def test_export_resnet18_candidate(tmp_path):
    model, _ = construct(load_module(program("resnet18.py"))["Net"], (3, 64, 64), 10)
    path = export_onnx(model, (3, 64, 64), tmp_path / "resnet18.onnx")
    report = parity(model, path, torch.randn(3, 3, 64, 64))  # untrained: only the logits' difference counts
    assert report["max_abs_diff"] < 1e-4


def test_int8_is_smaller_and_about_as_accurate(trained, fp32_path, int8_path, test_images):
    assert count_params(trained) > 100_000
    ratio = fp32_path.stat().st_size / int8_path.stat().st_size
    assert ratio >= 3.5, f"int8 file only {ratio:.2f}x smaller"
    images, labels = test_images
    fp32, int8 = accuracy(onnx_logits(fp32_path, images), labels), accuracy(onnx_logits(int8_path, images), labels)
    assert int8 >= fp32 - 0.03, f"int8 accuracy {int8:.3f} vs fp32 {fp32:.3f}"


def test_bench_runs_without_torch(int8_path):
    code = ("import json, sys; from exporters.bench import bench; "
            f"r = bench({str(int8_path)!r}, threads=1, runs=20, warmup=3); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runs"] == 20 and result["threads"] == 1 and 0 < result["p50_ms"] <= result["p90_ms"]


def test_bench_cli_prints_json(fp32_path):
    proc = subprocess.run([sys.executable, "-m", "exporters.bench", str(fp32_path), "--threads", "1", "--runs", "10",
                           "--warmup", "2", "--batch", "3", "--json"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["batch"] == 3 and result["input_shape"] == [3, 3, 32, 32]
    assert result["throughput_per_s"] == pytest.approx(3000 / result["p50_ms"])


def test_write_card(trained, fp32_path, int8_path, tmp_path):
    """card.md reads as a model card: what the model is, its files, accuracy per seed, latency, training, limits."""
    latency = bench(int8_path, threads=1, runs=20, warmup=3)
    card = {"name": "cifar10-candidate-00007", "candidate": 7, "shipped_seed": 1, "dataset": "cifar10", "in_shape": "3x32x32",
            "params": count_params(trained), "macs": 2_500_000, "val_accuracy_proxy": 0.4512,
            "training": {"epochs": 30.0, "schedule": "cosine", "lr": 0.05, "label_smoothing": 0.1,
                         "train_images": 45_000, "device": "cpu", "isolation": ["pid_namespace", "seccomp"]},
            "test_accuracy": {"per_seed": {"0": 0.8123, "1": 0.8077}, "mean": 0.81, "std": 0.0023,
                              "int8_per_seed": {"0": 0.8101, "1": 0.8052}, "int8_mean": 0.8077, "int8_std": 0.0025,
                              "onnx_fp32": 0.8123, "onnx_int8": 0.8101},
            "file_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
            "parity": {"n": 1000.0, "max_abs_diff": 3e-6, "top1_agreement": 1.0},  # as the job's message has it
            "latency_ms": {"onnxruntime_int8_threads_1": {"p50_ms": latency["p50_ms"], "p90_ms": latency["p90_ms"]}},
            "environment": environment()}
    json_path, md_path = write_card(tmp_path / "card", card)
    assert json.loads(json_path.read_text()) == card
    text = md_path.read_text()
    assert text.startswith("# cifar10-candidate-00007\n\nAn image classifier for cifar10 (input 3x32x32) with "
                           f"{count_params(trained):,} parameters and 2.5M multiply-adds")
    for needle in ("| 0 | 81.23% | 81.01% |", "| 1 | 80.77% | 80.52% |", "| mean (std) | 81.00% (0.23) | 80.77% (0.25) |",
                   f"| onnxruntime int8 | 1 | {latency['p50_ms']:.3f} | {latency['p90_ms']:.3f} |", "45.12%",
                   "30 epochs over 45,000 training images", "pid_namespace, seccomp", "## Limits of these numbers",
                   "the shipped files are seed 1's", "PyTorch on 1,000 images",
                   f"| onnxruntime | {ort.__version__} |"):
        assert needle in text, needle
