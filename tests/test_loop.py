"""The search loop on narrow stand-ins (a scripted chat model, a fake evaluator) and end to end via the CLI."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from edgenas import loop
from edgenas.archive import Archive
from edgenas.config import BudgetConfig, SearchConfig
from edgenas.llm.base import LLMError, Reply, Sampling
from edgenas.prompts import Task
from edgenas.propose import LLMProposer
from edgenas.records import EvalResult, Failure, FailureKind, Status

from .conftest import PROGRAMS, run_cli

TASK = Task("synthetic", 4, (3, 16, 16), BudgetConfig(max_params=10_000), "1 epoch")


def program(accuracy: float, tag: str = "", reruns: tuple = ()) -> str:
    """`reruns`: the accuracy each other seed gives (None: that run fails)."""
    return f"ACC = {accuracy}\nTAG = {tag!r}\nRERUNS = {list(reruns)!r}\n\n\nclass Net(nn.Module):\n    pass\n"


class ScriptedChat:
    """Replies from a list (or a callable); remembers every message list it was sent."""

    identity = "scripted"

    def __init__(self, replies):
        self.replies, self.seen = (replies if callable(replies) else list(replies)), []

    def chat(self, messages, sampling):
        self.seen.append(messages)
        reply = self.replies.pop(0) if isinstance(self.replies, list) else self.replies(messages)
        if isinstance(reply, Exception):
            raise reply
        return Reply(reply, tokens_in=10, tokens_out=5, seconds=0.01)


class FakeEvaluator:
    """Accuracy read from the program's `ACC =` line (run k > 0: from `RERUNS` when given); programs tagged 'fail' fail with a
    shape error."""
    last_graph = b""

    def __init__(self):
        self.calls = []

    def evaluate(self, code, run=0):
        self.calls.append(run)
        if "TAG = 'fail'" in code:
            return EvalResult(status=Status.failed, failure=Failure(kind=FailureKind.shape, message="expected (2, 4)"))
        acc = float(re.search(r"ACC = ([\d.]+)", code).group(1))
        reruns = eval(re.search(r"RERUNS = (.*)", code).group(1))
        if run and reruns:
            acc = reruns[run - 1]
        if acc is None:
            return EvalResult(status=Status.failed, failure=Failure(kind=FailureKind.nan, message="loss is nan"), seed=run)
        return EvalResult(status=Status.ok, val_accuracy=acc, params=100, macs=1000, peak_memory_bytes=1 << 20, seed=run)


def fenced(code):
    return f"Here is the model:\n```python\n{code}```\nIt should work."


def improve(i):
    return json.dumps({"problem": f"problem {i}", "modification": f"change {i}"})


def proposer(generator, improver, **kw):
    return LLMProposer(generator, improver, Sampling(), Sampling(), TASK, **kw)


def test_loop_keeps_the_best_and_records_every_outcome(tmp_path):
    generator = ScriptedChat([fenced(program(0.3)), fenced(program(0.5)), fenced(program(0.2, "fail")),
                              "I cannot help with that.", fenced(program(0.5)), fenced(program(0.6))])
    improver = ScriptedChat([improve(i) for i in range(5)])
    archive = Archive(tmp_path / "run")
    reason = loop.run(archive, proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=6))
    rows = archive.all()
    assert reason == "reached 6 iterations"
    assert [r.status for r in rows] == ["ok", "ok", "failed", "no_code", "duplicate", "ok"]
    assert [r.is_best for r in rows] == [True, True, False, False, False, True]
    assert rows[4].duplicate_of == 1 and rows[2].outcome.kind == "shape"
    assert archive.best().iteration == 5 and rows[1].problem == "problem 0" and rows[0].problem == "no valid model yet"
    assert rows[5].parent == 1 and rows[1].tokens_in == 20  # improver + generator calls
    assert [c["role"] for c in rows[1].llm_calls] == ["improver", "generator"] and rows[1].llm_calls[0]["tokens_out"] == 5
    assert (tmp_path / "run" / "candidates" / "00005.py").read_text() == program(0.6)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_exactly_the_last_k_triples_reach_the_improver(tmp_path, k):
    n = 8
    generator = ScriptedChat(lambda m: fenced(program(0.1 + 0.01 * len(generator.seen))))
    improver = ScriptedChat(lambda m: improve(len(improver.seen)))
    loop.run(Archive(tmp_path / "run"), proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=n, history_size=k))
    last_prompt = improver.seen[-1][-1]["content"]
    shown = [int(i) for i in re.findall(r"^- iteration (\d+):", last_prompt, re.M)]
    assert shown == list(range(n - 1 - k, n - 1))
    if k == 0:
        assert "(no attempts yet)" in last_prompt


def test_failures_are_first_class_memory_entries(tmp_path):
    generator = ScriptedChat([fenced(program(0.3)), fenced(program(0.1, "fail")), fenced(program(0.4))])
    improver = ScriptedChat([improve(0), improve(1)])
    loop.run(Archive(tmp_path / "run"), proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=3))
    prompt = improver.seen[-1][-1]["content"]
    assert "FAILED (shape): expected (2, 4)" in prompt and "Latest attempt (iteration 1)" in prompt


def test_unparseable_improver_asks_again_then_falls_back(tmp_path):
    generator = ScriptedChat([fenced(program(0.3)), fenced(program(0.4)), fenced(program(0.5))])
    improver = ScriptedChat(["no json here", '{"problem": "p", "modification": "m"}', "still prose", "and again"])
    archive = Archive(tmp_path / "run")
    loop.run(archive, proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=3))
    rows = archive.all()
    assert (rows[1].problem, rows[1].modification) == ("p", "m") and len(rows[1].replies) == 3
    assert rows[2].problem.startswith("(fallback") and rows[2].status == "ok"


def test_llm_errors_and_ablations_never_stop_the_loop(tmp_path):
    generator = ScriptedChat([LLMError("connection refused"), fenced(program(0.3)), fenced(program(0.4))])
    improver = ScriptedChat([])
    archive = Archive(tmp_path / "run")
    p = proposer(generator, improver, use_improver=False, use_reference=False)
    loop.run(archive, p, [FakeEvaluator()], SearchConfig(iterations=3, history_size=0))
    assert [r.status for r in archive.all()] == ["llm_error", "ok", "ok"] and improver.seen == []
    assert "Reference model" not in generator.seen[-1][-1]["content"]


def test_stop_conditions(tmp_path):
    generator = ScriptedChat(lambda m: fenced(program(0.5 if len(generator.seen) < 3 else 0.1, str(len(generator.seen)))))
    improver = ScriptedChat(lambda m: improve(0))
    archive = Archive(tmp_path / "a")
    reason = loop.run(archive, proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=100, patience=4))
    assert reason == "no improvement in 4 iterations" and archive.next_iteration() == 5
    archive = Archive(tmp_path / "b")
    generator = ScriptedChat(lambda m: fenced(program(0.2 + 0.1 * len(generator.seen))))
    reason = loop.run(archive, proposer(generator, improver), [FakeEvaluator()], SearchConfig(iterations=100, target_accuracy=0.5))
    assert reason.startswith("reached the target") and archive.best().val_accuracy >= 0.5


def test_a_close_win_is_confirmed_with_other_seeds_before_it_becomes_the_parent(tmp_path):
    programs = [program(0.50), program(0.51, reruns=[0.45]), program(0.515, reruns=[0.53]), program(0.60, "clear"),
                program(0.61, reruns=[None]), program(0.605, "tie", reruns=[0.595])]
    generator = ScriptedChat([fenced(p) for p in programs])
    improver = ScriptedChat(lambda m: improve(len(improver.seen)))
    archive, evaluator = Archive(tmp_path / "run"), FakeEvaluator()
    loop.run(archive, proposer(generator, improver), [evaluator], SearchConfig(iterations=6, confirm_margin=0.02))
    rows = archive.all()
    assert evaluator.calls == [0, 0, 1, 0, 1, 0, 0, 1, 0, 1]  # a clear win (it 3) is not re-run
    assert [r.is_best for r in rows] == [True, False, True, True, False, False]
    assert rows[1].val_accuracy == pytest.approx(0.48) and rows[1].outcome.runs == [0.51, 0.45]
    assert rows[1].outcome.delta == pytest.approx(-0.02) and rows[1].reruns[0].val_accuracy == 0.45
    assert rows[2].val_accuracy == pytest.approx(0.5225) and rows[5].val_accuracy == pytest.approx(0.6)
    assert "not promoted: the re-run with seed 1 failed (nan" in rows[4].outcome.render()
    assert [r.parent for r in rows[1:]] == [0, 0, 2, 3, 3]
    assert "mean of 2 seeds: 51.00%, 45.00%" in improver.seen[1][-1]["content"]
    archive.close()
    assert Archive(tmp_path / "run").best().iteration == 3  # what a resumed run builds on: the promoted one


def test_several_confirm_runs_are_averaged(tmp_path):
    generator = ScriptedChat([fenced(program(0.50)), fenced(program(0.51, reruns=[0.52, 0.47])),
                              fenced(program(0.51, "b", reruns=[0.52, 0.53]))])
    improver = ScriptedChat(lambda m: improve(len(improver.seen)))
    archive, evaluator = Archive(tmp_path / "run"), FakeEvaluator()
    loop.run(archive, proposer(generator, improver), [evaluator], SearchConfig(iterations=3, confirm_runs=2))
    rows = archive.all()
    assert evaluator.calls == [0, 0, 1, 2, 0, 1, 2] and [r.is_best for r in rows] == [True, False, True]
    assert rows[1].outcome.runs == [0.51, 0.52, 0.47] and rows[2].val_accuracy == pytest.approx(0.52)


def test_without_a_confirm_margin_any_win_is_promoted_as_in_the_paper(tmp_path):
    generator = ScriptedChat([fenced(program(0.50)), fenced(program(0.51, reruns=[0.45]))])
    improver = ScriptedChat(lambda m: improve(len(improver.seen)))
    archive, evaluator = Archive(tmp_path / "run"), FakeEvaluator()
    loop.run(archive, proposer(generator, improver), [evaluator], SearchConfig(iterations=2, confirm_margin=None))
    assert evaluator.calls == [0, 0] and archive.best().iteration == 1 and archive.all()[1].reruns == []


# ---------------------------------------------------------------- end to end through the CLI


def search_config(tmp_path, **extra) -> str:
    lines = ["dataset: {name: synthetic, num_classes: 4, in_shape: [3, 16, 16], synthetic_size: 256, val_size: 64}",
             "train: {batch_size: 64}", "eval: {timeout_s: 60, latency_runs: 2}", "budget: {max_params: 300000}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_mutate_search_end_to_end_then_show(tmp_path):
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": 4})
    run = tmp_path / "run"
    proc = run_cli("search", "--config", config, "--run-dir", run, "--seed-program", PROGRAMS / "good_cnn.py", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["iterations"] == 4 and summary["best_val_accuracy"] is not None
    shown = json.loads(run_cli("show", run, "--json").stdout)
    assert [r["iteration"] for r in shown] == [0, 1, 2, 3] and shown[0]["problem"] == "seed program"
    required = {"iteration", "status", "failure_kind", "val_accuracy", "params", "macs", "peak_memory_bytes", "problem",
                "modification", "is_best"}
    assert all(required <= set(r) for r in shown)
    assert (run / "config.yaml").is_file() and (run / "events.jsonl").is_file()
    assert run_cli("show", run).returncode == 0


def test_search_resumes_after_sigkill_without_loss_or_duplicates(tmp_path):
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": 12})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgenas.cli", "search", "--config", config, "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            with sqlite3.connect(f"file:{run / 'archive.sqlite'}?mode=ro", uri=True) as db:
                if db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] >= 3:
                    break
        except sqlite3.OperationalError:
            pass  # not created yet, or its schema not yet written
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(run / "archive.sqlite") as db:
        before = [r[0] for r in db.execute("SELECT iteration FROM candidates ORDER BY iteration")]
    assert before == list(range(len(before))) and len(before) >= 3
    resumed = run_cli("search", "--run-dir", run, "--json")
    assert resumed.returncode == 0, resumed.stderr
    with sqlite3.connect(run / "archive.sqlite") as db:
        after = [r[0] for r in db.execute("SELECT iteration FROM candidates ORDER BY iteration")]
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert after == list(range(12))
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "resume" in events and events[-1] == "stop"


def test_search_usage_errors(tmp_path):
    assert run_cli("search").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {iterationz: 3}\n")
    proc = run_cli("search", "--config", bad)
    assert proc.returncode == 2 and "search.iterationz" in proc.stderr
    assert run_cli("show", tmp_path).returncode == 2
