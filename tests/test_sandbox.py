"""Hostile candidates: each must come back as the right failure kind with nothing escaping."""

import os
from pathlib import Path

import pytest

import edgenas
from edgenas.config import load_config
from edgenas.evaluate import Evaluator
from edgenas.records import FailureKind

from .conftest import program

OS = "getattr(torch, 'o' + 's')"  # reaches os past the static checks, so the run-time guard is what is tested
SYS = "getattr(torch, 's' + 'ys')"
SECRET = "sk-edgenas-test-secret-4242"
PACKAGE = Path(edgenas.__file__).parent


def net(body: str = "", forward: str = "return self.fc(x.mean((2, 3)))", module: str = "") -> str:
    return f"""{module}
class Net(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        {body or 'pass'}

    def forward(self, x):
        {forward}
"""


@pytest.fixture(scope="module")
def evaluator():
    os.environ["OPENAI_API_KEY"] = SECRET
    cfg = load_config(None, ["dataset.name=synthetic", "dataset.num_classes=4", "dataset.in_shape=[3,16,16]",
                             "dataset.synthetic_size=300", "dataset.val_size=60", "train.batch_size=32",
                             "eval.timeout_s=8", "eval.memory_limit_mb=1500", "eval.output_limit_bytes=65536",
                             "eval.latency_runs=3"])
    with Evaluator(cfg) as ev:
        yield ev
    del os.environ["OPENAI_API_KEY"]


def check(evaluator, code, kind, words="", stage=None):
    result = evaluator.evaluate(code)
    assert result.failure is not None, result
    assert result.failure.kind is kind, result.failure
    assert words in result.failure.message, result.failure.message
    if stage:
        assert result.stage == stage
    return result


def test_good_candidate_is_fully_measured(evaluator):
    result = evaluator.evaluate(program("good_cnn.py"))
    assert result.ok, result.failure
    # the exported graph folds each BatchNorm into its convolution: weights plus one bias per channel
    assert result.params == 16 * 27 + 16 + 32 * 16 * 9 + 32 + 32 * 4 + 4
    assert result.macs > 0 and result.peak_memory_bytes > 0 and result.weight_bytes == 4 * result.params
    assert 0 <= result.val_accuracy <= 1 and result.train_images == 240 and result.latency_ms > 0
    assert set(result.isolation) >= {"pid_namespace", "mount_namespace", "network_namespace", "private_root",
                                     "unprivileged_uid", "no_capabilities", "no_new_privs", "seccomp", "disk_cap"}
    assert set(result.stage_seconds) >= {"static", "build", "train", "validate", "latency"}


def test_same_code_gives_the_same_record_and_another_run_another_seed(evaluator):
    a, b = (evaluator.evaluate(program("good_cnn.py")) for _ in range(2))
    assert (a.val_accuracy, a.train_loss_last, a.peak_memory_bytes) == (b.val_accuracy, b.train_loss_last, b.peak_memory_bytes)
    c = evaluator.evaluate(program("good_cnn.py"), run=1)  # how a close win is re-run (search.confirm_margin)
    assert (a.seed, c.seed) == (evaluator.config.train.seed, evaluator.config.train.seed + 1)
    assert c.ok and c.train_loss_first != a.train_loss_first and c.params == a.params


def test_model_that_needs_nchw_falls_back_from_channels_last(evaluator):
    assert evaluator.evaluate(program("view_needs_nchw.py")).ok


def test_hang_in_forward_times_out(evaluator):
    check(evaluator, net(forward="while True:\n            pass"), FailureKind.timeout, "time limit", stage="forward")


def test_hang_at_import_times_out(evaluator):
    check(evaluator, net(module="while True:\n    pass"), FailureKind.timeout, "during build")


def test_memory_bomb_is_oom(evaluator):
    check(evaluator, net(body="self.big = torch.ones(1 << 40)"), FailureKind.oom, stage="build")


def test_slow_memory_bomb_in_forward_is_oom(evaluator):
    check(evaluator, net(forward="keep = [torch.ones(1 << 24) for _ in range(10000)]\n        return keep"), FailureKind.oom)


def test_process_spawn_is_forbidden_at_run_time(evaluator, tmp_path):
    marker = tmp_path / "spawned"
    check(evaluator, net(body=f"{OS}.system('touch {marker}')"), FailureKind.forbidden, "starting a process")
    assert not marker.exists()


def test_file_write_outside_is_forbidden(evaluator):
    target = PACKAGE / "escape.txt"  # edgenas's own folder is in the jail's view, read-only
    check(evaluator, net(body=f"{OS}.open('{target}', {OS}.O_WRONLY | {OS}.O_CREAT)"), FailureKind.forbidden, "writing")
    assert not target.exists()


def test_file_writes_the_audit_hook_cannot_see_hit_a_read_only_view(evaluator, tmp_path):
    # torch.save writes through C++, past Python's audit hooks: the mount table is what stops it
    result = check(evaluator, net(body=f"getattr(torch, 'sa' + 've')(self.state_dict(), '{PACKAGE / 'weights.pt'}')"),
                   FailureKind.build, "Read-only file system")
    assert "private_root" in result.isolation and not (PACKAGE / "weights.pt").exists()
    # the host's /tmp is not in the view at all: a write there lands in the job's own scratch space, then vanishes
    target = tmp_path / "weights.pt"
    check(evaluator, net(body=f"getattr(torch, 'sa' + 've')(self.state_dict(), '{target}')"), FailureKind.build)
    assert not target.exists()


def test_network_is_unreachable(evaluator, listener):
    port, hits = listener
    code = net(body=f"s = {SYS}.modules['importlib'].import_module('socket').create_connection(('127.0.0.1', {port}))")
    check(evaluator, code, FailureKind.forbidden, "network")
    assert hits == []


def test_signals_to_other_processes_are_forbidden(evaluator):
    check(evaluator, net(body=f"{OS}.kill({os.getpid()}, 9)"), FailureKind.forbidden, "signals")


def test_secrets_do_not_reach_the_candidate(evaluator):
    result = check(evaluator, net(body=f"raise ValueError(sorted({OS}.environ.items()))"), FailureKind.build)
    assert SECRET not in result.failure.message and "OPENAI_API_KEY" not in result.failure.message


def test_nan_loss(evaluator):
    body = "self.calls = 0"
    forward = "self.calls += 1\n        out = self.fc(x.mean((2, 3)))\n        return out * float('nan') if self.calls > 6 else out"
    check(evaluator, net(body=body, forward=forward), FailureKind.nan, "loss became nan", stage="train")


def test_wrong_output_shape(evaluator):
    check(evaluator, net(forward="return x.flatten(1)"), FailureKind.shape, "expected (2, 4)")


def test_placeholder_name_at_run_time(evaluator):
    # the star import makes static checks defer undefined names to run time
    code = net(module="from math import *", body="self.fc = nn.Linear(3, NUM_CLASSES_HERE)")
    check(evaluator, code, FailureKind.build, "placeholder")


def test_exit_is_reported(evaluator):
    check(evaluator, net(body="raise SystemExit(3)"), FailureKind.runtime, "exit()")


def test_hard_exit_is_crashed(evaluator):
    check(evaluator, net(body=f"{OS}._exit(0)"), FailureKind.crashed, "without a result")


def test_segfault_is_crashed(evaluator):
    body = f"{SYS}.modules['importlib'].import_module('faulthandler')._read_null()"
    check(evaluator, net(body=body), FailureKind.crashed, "SIGSEGV")


def test_output_flood_is_capped(evaluator):
    result = check(evaluator, net(forward="while True:\n            print('x' * 1000)"), FailureKind.runtime, "printed more output")
    assert len(result.output_tail) <= 1000


def test_over_budget_fails_before_training():
    cfg = load_config(None, ["dataset.name=synthetic", "dataset.num_classes=4", "dataset.in_shape=[3,16,16]",
                             "dataset.synthetic_size=100", "dataset.val_size=20", "budget.max_params=100"])
    with Evaluator(cfg) as ev:
        result = ev.evaluate(program("good_cnn.py"))
    assert result.failure.kind is FailureKind.budget and "exceed the budget of 100" in result.failure.message
    assert result.stage == "profile" and result.train_seconds is None


def test_evaluator_survives_all_of_it(evaluator):
    assert evaluator.evaluate(program("good_cnn.py")).ok


def test_ctypes_is_forbidden_for_candidate_code(evaluator):
    body = f"{SYS}.modules['importlib'].import_module('ctypes').c_int.from_address(id(self))"
    check(evaluator, net(body=body), FailureKind.forbidden, "ctypes")


def test_an_inherited_address_space_limit_is_the_cap_and_the_record_says_so(evaluator):
    """Under `ulimit -v` (common on shared clusters) a candidate still runs: capped at the lower limit, named."""
    import json
    import resource
    import subprocess
    import sys

    limit = 10 << 30  # below what torch's mappings plus eval.memory_limit_mb (8 GiB by default) would ask for

    def ulimit_v():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "edgenas.cli", "evaluate", str(PACKAGE.parent / "tests" / "programs"
                           / "good_cnn.py"), "--dataset", "synthetic", "--set", "dataset.in_shape=[3,16,16]",
                           "--set", "dataset.synthetic_size=200", "--val-size", "40", "--json"],
                          capture_output=True, text=True, preexec_fn=ulimit_v, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["memory_cap_bytes"] == limit, record
    assert record["memory_cap_source"] == "inherited limit"
    assert evaluator.evaluate(program("good_cnn.py")).memory_cap_source == "eval.memory_limit_mb"


def test_a_checkout_under_tmp_still_gets_a_jail(tmp_path):
    """edgenas itself is exposed read-only in the jail: from a clone under /tmp that path crosses the jail's /tmp."""
    import json
    import shutil
    import subprocess
    import sys

    checkout = tmp_path / "clone"
    for package in ("edgenas", "exporters"):
        shutil.copytree(PACKAGE.parent / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "edgenas.cli", "evaluate", str(PACKAGE.parent / "tests" / "programs"
                           / "good_cnn.py"), "--dataset", "synthetic", "--set", "dataset.in_shape=[3,16,16]",
                           "--set", "dataset.synthetic_size=200", "--val-size", "40", "--json"], cwd=checkout,
                          env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and "private_root" in record["isolation"], record
