"""A new user's first run: missing data is a one-line error with the fix, leaves nothing behind, and the same
command works once the data is in place."""

import json

from .conftest import run_cli, write_cifar100


def test_missing_data_leaves_no_run_dir_and_the_same_command_then_works(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset: {{name: cifar100, root: {data}, download: false, val_size: 50}}\n"
                      "train: {batch_size: 64}\neval: {timeout_s: 120, latency_runs: 2}\n"
                      "llm: {generator: {backend: mutate}}\nsearch: {iterations: 1}\n")
    command = ["search", "--config", config, "--run-dir", run, "--json"]
    proc = run_cli(*command)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"mkdir -p {data} && tar -xzf cifar-100-python.tar.gz -C {data}" in proc.stderr
    assert not run.exists()  # nothing written before the evaluator started
    write_cifar100(data)
    proc = run_cli(*command)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["iterations"] == 1
