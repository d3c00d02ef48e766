"""From a finished search to deployable models, end to end through the CLI on CIFAR-10 images (real ones where
../shared has them, a generated stand-in elsewhere)."""

import json

import pytest

from .conftest import PROGRAMS, run_cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_folder):
    tmp = tmp_path_factory.mktemp("finalize")
    config = tmp / "search.yaml"
    config.write_text(f"""
dataset: {{name: folder, root: "{cifar_folder}", train_subset: 1000, val_size: 300}}
train: {{lr: 0.05}}
eval: {{timeout_s: 300, latency_runs: 3}}
llm: {{generator: {{backend: mutate}}}}
search: {{iterations: 3}}
""")
    proc = run_cli("search", "--config", config, "--run-dir", tmp / "run", "--seed-program", PROGRAMS / "good_cnn.py")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_pareto_lists_the_front_and_plots_it(finished_run, tmp_path):
    proc = run_cli("pareto", finished_run, "--json", "--plot", tmp_path / "front.png")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and {r["front"] for r in rows} >= {0} and all(r["feasible"] for r in rows)
    assert (tmp_path / "front.png").stat().st_size > 1000


def test_finalize_trains_exports_quantizes_and_writes_cards(finished_run):
    # a relative run directory, as a person types it: the sandboxed child works elsewhere
    proc = run_cli("finalize", "run", "--candidates", "0", "--epochs", "2", "--seeds", "0,1", "--json", cwd=finished_run.parent)
    assert proc.returncode == 0, proc.stderr
    assert "candidate 0 seed 1: epoch 2/2" in proc.stderr  # progress streams out of the sandboxed child
    (card,) = json.loads(proc.stdout)
    out = finished_run / "final" / "00000"
    for name in ("model.pt", "model.onnx", "model.int8.onnx", "card.json", "card.md"):
        assert (out / name).is_file(), name
    acc = card["test_accuracy"]
    assert set(acc["per_seed"]) == {"0", "1"} and 0.15 < acc["mean"] <= 1
    assert abs(acc["onnx_fp32"] - acc["per_seed"]["0"]) < 0.002  # onnxruntime agrees with PyTorch
    assert abs(acc["onnx_int8"] - acc["onnx_fp32"]) < 0.05
    assert set(acc["int8_per_seed"]) == {"0", "1"} and acc["int8_per_seed"]["0"] == acc["onnx_int8"]
    assert card["parity"]["max_abs_diff"] < 1e-4 and card["parity"]["top1_agreement"] >= 0.999
    assert card["file_bytes"]["int8"] < card["file_bytes"]["fp32"]
    assert card["latency_ms"]["onnxruntime_fp32_threads_1"]["p50_ms"] > 0
    eager = card["latency_ms"]["torch_eager_threads_1"]
    assert 0 < eager["p50_ms"] <= eager["p90_ms"]
    assert json.loads((out / "card.json").read_text())["candidate"] == 0

    again = run_cli("finalize", finished_run, "--candidates", "0", "--epochs", "2", "--seeds", "0,1", "--json")
    assert again.returncode == 0, again.stderr  # both seeds were done: nothing is trained again
    assert json.loads(again.stdout)[0]["test_accuracy"]["per_seed"] == acc["per_seed"]
    assert "epoch" not in again.stderr

    bench = run_cli("bench", out / "model.int8.onnx", "--runs", "20", "--warmup", "2", "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["p50_ms"] > 0


def test_finalize_and_bench_bad_input(finished_run, tmp_path):
    proc = run_cli("finalize", finished_run, "--candidates", "99")
    assert proc.returncode != 0 and "99" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    proc = run_cli("bench", bad)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
