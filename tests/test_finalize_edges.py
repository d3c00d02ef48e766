"""finalize's edges on synthetic data: reuse only under the same settings, resumable schedules, a time limit, and
an INT8 file that pays off in size even for a model as small as MLPerf Tiny's ResNet-8."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgenas.candidate import construct, load_module
from edgenas.profile import count_params
from exporters import finalize as finalize_module
from exporters.onnx_export import export_onnx
from exporters.quantize import quantize_int8

from .conftest import ROOT, run_cli
from .test_attacks_finalize import SYNTHETIC

TINY = """
class Net(nn.Module):
    def __init__(self, in_shape=(3, 16, 16), num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1), 1))
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    (tmp / "search.yaml").write_text(SYNTHETIC)
    (tmp / "tiny.py").write_text(TINY)
    proc = run_cli("search", "--config", tmp / "search.yaml", "--run-dir", tmp / "run", "--seed-program",
                   tmp / "tiny.py", "--json")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


@pytest.fixture
def run_dir(searched, tmp_path):
    return shutil.copytree(searched, tmp_path / "run")


def finalize(run_dir, *args):
    return run_cli("finalize", run_dir, "--candidates", "0", "--json", *args, timeout=600)


def epochs_trained(stderr: str) -> list[int]:
    return [int(line.split("epoch ")[1].split("/")[0]) for line in stderr.splitlines() if ": epoch " in line]


class Stop(Exception):
    pass


def interrupt(run_dir, epochs: int, at: int, overrides=()):
    """A finalize stopped right after epoch `at`: its checkpoint stays behind, as after Ctrl-C."""

    def progress(_, p):
        if p["epoch"] == at:
            raise Stop

    with pytest.raises(Stop):
        finalize_module.finalize(run_dir, ids=[0], epochs=epochs, overrides=tuple(overrides), on_progress=progress)
    assert (run_dir / "final" / "00000" / "seed0.ckpt").is_file()


def test_a_finished_seed_is_reused_only_with_the_same_settings(run_dir):
    first = finalize(run_dir, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert epochs_trained(first.stderr) == [1]
    (card,) = json.loads(first.stdout)
    same = finalize(run_dir, "--epochs", "1")
    assert same.returncode == 0 and epochs_trained(same.stderr) == [], same.stderr
    assert json.loads(same.stdout)[0]["test_accuracy"] == card["test_accuracy"]
    for changed in (["--epochs", "2"], ["--epochs", "2", "--set", "train.lr=0.02"],
                    ["--epochs", "2", "--set", "train.schedule=constant"]):
        proc = finalize(run_dir, *changed)
        assert proc.returncode == 0 and epochs_trained(proc.stderr) == [1, 2], (changed, proc.stderr)


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_schedules_resume_and_a_stale_checkpoint_is_ignored(run_dir, schedule):
    interrupt(run_dir, epochs=4, at=2, overrides=[f"train.schedule={schedule}"])
    proc = finalize(run_dir, "--epochs", "4", "--set", f"train.schedule={schedule}")
    assert proc.returncode == 0, proc.stderr
    assert epochs_trained(proc.stderr) == [3, 4]  # resumed with its optimizer and schedule state

    shutil.rmtree(run_dir / "final")
    interrupt(run_dir, epochs=4, at=2, overrides=[f"train.schedule={schedule}"])
    proc = finalize(run_dir, "--epochs", "4")  # cosine now: the checkpoint's schedule state does not apply
    assert proc.returncode == 0, proc.stderr
    assert epochs_trained(proc.stderr) == [1, 2, 3, 4]
    assert not list((run_dir / "final" / "00000").glob("seed0.ckpt*"))


def test_card_has_int8_accuracy_per_seed_and_eager_percentiles(run_dir):
    proc = finalize(run_dir, "--epochs", "1", "--seeds", "0,1")
    assert proc.returncode == 0, proc.stderr
    (card,) = json.loads(proc.stdout)
    acc = card["test_accuracy"]
    assert set(acc["int8_per_seed"]) == {"0", "1"} and acc["onnx_int8"] == acc["int8_per_seed"]["0"]
    assert all(0 <= v <= 1 for v in acc["int8_per_seed"].values())
    eager = card["latency_ms"]["torch_eager_threads_1"]
    assert 0 < eager["p50_ms"] <= eager["p90_ms"]
    out = run_dir / "final" / "00000"
    assert (out / "model.int8.onnx").read_bytes() == (out / "model-seed0.int8.onnx").read_bytes()
    assert "| torch eager | 1 |" in (out / "card.md").read_text()


def test_timeout_stops_a_slow_seed_with_one_line(run_dir):
    proc = finalize(run_dir, "--epochs", "100000", "--timeout", "5")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "candidate 0, seed 0: timeout: " in lines[-1] and "within the 5 s limit" in lines[-1], lines[-1]
    assert (run_dir / "final" / "00000" / "seed0.ckpt").is_file()  # the epochs it finished are kept for a rerun


def resnet8() -> str:
    """The benchmark's MLPerf Tiny ResNet-8 source (77,946 parameters)."""
    return (ROOT / "benchmarks" / "export_latency.py").read_text().split("RESNET8 = '''")[1].split("'''")[0]


def test_int8_file_is_3_5x_smaller_for_a_78k_parameter_model(tmp_path):
    torch.manual_seed(0)
    model = construct(load_module(resnet8())["Net"], (3, 32, 32), 10)[0].eval()
    assert 75_000 < count_params(model) < 80_000
    fp32 = export_onnx(model, (3, 32, 32), tmp_path / "model.onnx")
    images = np.random.default_rng(0).standard_normal((64, 3, 32, 32), dtype=np.float32)
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", images)
    ratio = fp32.stat().st_size / int8.stat().st_size
    assert ratio >= 3.5, f"int8 file only {ratio:.2f}x smaller"
    graph = onnx.load(str(int8)).graph
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]

    options = ort.SessionOptions()  # onnxruntime still fuses every conv and the linear layer into integer kernels
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 9 and ops["QGemm"] == 1, ops
    (logits,) = session.run(None, {"input": images[:8]})
    with torch.no_grad():
        expected = model(torch.from_numpy(images[:8])).numpy()
    assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()
