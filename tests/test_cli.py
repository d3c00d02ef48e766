"""The CLI end to end, on real files: JSON contract, exit codes, one-line errors."""

import json
import subprocess
import sys

from edgenas.archive import Archive
from edgenas.cli import interrupted_message
from edgenas.memory import outcome_of
from edgenas.records import Candidate, EvalResult, Failure, FailureKind, Status

from .conftest import PROGRAMS, run_cli

EXPECTED_KEYS = {"status", "failure", "params", "macs", "peak_memory_bytes", "val_accuracy", "train_seconds",
                 "latency_ms", "device", "dataset", "stage_seconds"}


def test_evaluate_on_a_cifar10_folder_prints_one_complete_json(cifar_folder):
    proc = run_cli("evaluate", PROGRAMS / "good_cnn.py", "--dataset", "folder", "--data-root", cifar_folder,
                   "--train-subset", "2000", "--val-size", "500", "--set", "train.lr=0.05", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
    assert EXPECTED_KEYS <= set(record)
    assert record["status"] == "ok" and record["failure"] is None and record["dataset"] == "folder"
    assert 0.15 < record["val_accuracy"] <= 1 and record["params"] == 448 + 4640 + 330  # BatchNorm folded into the convolutions
    assert record["stage_seconds"]["train"] > 0


def test_evaluate_failed_candidate_prints_its_record_and_exits_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nclass Net(nn.Module):\n    pass\n")
    proc = run_cli("evaluate", bad, "--dataset", "synthetic", "--val-size", "100", "--json")
    assert proc.returncode == 1, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "failed" and record["failure"]["kind"] == "forbidden"
    assert run_cli("evaluate", bad, "--dataset", "synthetic", "--val-size", "100").returncode == 1


def test_show_gives_each_failure_its_reason_in_the_search_logs_memory_unit(tmp_path):
    archive = Archive(tmp_path / "run")
    ok = EvalResult(status=Status.ok, val_accuracy=0.5, params=100, macs=1000, peak_memory_bytes=3 * 2**20)
    archive.add(Candidate(iteration=0, status="ok", result=ok, outcome=outcome_of(ok, None), is_best=True))
    failure = Failure(kind=FailureKind.shape, message="expected (2, 4) got (2, 7)")
    bad = EvalResult(status=Status.failed, failure=failure)
    archive.add(Candidate(iteration=1, status="failed", result=bad, outcome=outcome_of(bad, 0.5)))
    archive.close()
    rows = json.loads(run_cli("show", tmp_path / "run", "--json").stdout)
    assert [r["failure_reason"] for r in rows] == [None, "expected (2, 4) got (2, 7)"]
    table = run_cli("show", tmp_path / "run", env={"COLUMNS": "250"})
    assert table.returncode == 0 and "expected (2, 4) got (2, 7)" in table.stdout and "3 MiB" in table.stdout


def test_ctrl_c_hint_names_the_real_run_directory(tmp_path):
    run = tmp_path / "my runs" / "quick"
    assert "nothing was written" in interrupted_message(run) and "nothing was written" in interrupted_message(None)
    Archive(run).close()
    assert interrupted_message(run) == f"interrupted; resume with: edgenas search --run-dir '{run}'"


def test_evaluate_table_output(tmp_path):
    proc = run_cli("evaluate", PROGRAMS / "good_cnn.py", "--dataset", "synthetic", "--val-size", "100",
                   "--set", "dataset.synthetic_size=400")
    assert proc.returncode == 0, proc.stderr
    assert "val accuracy" in proc.stdout and "ok" in proc.stdout


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    cases = [
        ("evaluate", PROGRAMS / "good_cnn.py", "--dataset", "cifar10", "--data-root", tmp_path / "none", "--set", "dataset.download=false"),
        ("evaluate", PROGRAMS / "good_cnn.py", "--set", "train.lrr=0.1"),
        ("evaluate", PROGRAMS / "good_cnn.py", "--dataset", "folder", "--data-root", tmp_path),
        ("evaluate", tmp_path / "missing.py"),
        ("profile", PROGRAMS / "good_cnn.py", "--in-shape", "3,32"),
    ]
    for args in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        assert proc.stdout == "" and len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr


def test_profile_resnet18_matches_the_reference_counts():
    proc = run_cli("profile", PROGRAMS / "resnet18.py", "--in-shape", "3,224,224", "--num-classes", "1000",
                   "--batch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["params"] == 11_689_512 - 4_800  # each BatchNorm (4,800 channels) folds into one conv bias
    assert abs(record["macs"] - 1.82e9) < 0.01e9, record["macs"]
    assert record["peak_memory_bytes"] > record["weight_bytes"] and record["val_accuracy"] is None


def test_edgenas_bench_needs_neither_the_config_stack_nor_torch(tmp_path):
    """On a device only click, numpy and onnxruntime are installed: `edgenas bench` imports nothing else."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "w"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(np.ones((192, 10), np.float32), "w")])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    blocked = ("yaml", "pydantic", "torch", "onnx")  # importing any of them now raises ImportError
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from edgenas.cli import main; "
            f"sys.argv = ['edgenas', 'bench', {str(path)!r}, '--runs', '5', '--warmup', '1', '--json']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["runs"] == 5
