"""Target latency: each valid candidate's graph measured where the model will run (a device agent, or onnxruntime on
this machine), recorded in the archive, used by the budget, the prompts, the Pareto front and `edgenas targets`, and
never lost to an agent that is down."""

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import onnx
import pytest

from edgenas import target
from edgenas.archive import Archive
from edgenas.config import BudgetConfig, load_config
from edgenas.evaluate import Evaluator
from edgenas.records import Candidate, EvalResult, Outcome, Status, TargetLatency
from exporters.agent import Agent

from .conftest import ROOT, program, run_cli
from .test_attacks import candidate as attack_candidate
from .test_attacks import found
from .test_loop import search_config

TOKEN = "feedc0de" * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> bytes:
    import torch

    from exporters.onnx_export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    return export_onnx(net, (3, 16, 16), tmp_path_factory.mktemp("g") / "g.onnx").read_bytes()


class InProcessAgent:
    """exporters.agent's server on a thread of the test, on a port that can be stopped and taken again."""

    def __init__(self, port: int = 0):
        self.server = Agent(("127.0.0.1", port), TOKEN, 1 << 20)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def targets_config(tmp_path, url, **target_keys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    overrides = [f"target.url={url}", f"target.token_file={token_file}", "target.retry_s=0.2", "target.runs=5",
                 "target.timeout_s=20", *(f"{k}={v}" for k, v in target_keys.items())]
    return load_config(None, overrides)


def waiting_candidate(iteration: int, accuracy: float = 0.5, is_best: bool = False) -> Candidate:
    result = EvalResult(status=Status.ok, val_accuracy=accuracy, params=100, macs=1000, latency_ms=0.1,
                        target=TargetLatency(status="waiting", reason="not sent to the agent yet"))
    return Candidate(iteration=iteration, status="ok", code="X = 1\n", result=result, is_best=is_best,
                     outcome=Outcome(status="ok", val_accuracy=accuracy))


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- the background measurement, in process


def test_a_graph_waits_while_the_agent_is_down_and_is_measured_when_it_answers(tmp_path, graph):
    port = free_port()
    config = targets_config(tmp_path, f"http://127.0.0.1:{port}")
    archive = Archive(tmp_path / "run")
    targets = target.Targets(config, tmp_path / "run", TOKEN)
    candidate = targets.prepare(waiting_candidate(0), graph)
    archive.add(candidate)
    targets.submit(candidate)
    waiting = lambda: archive.get(0).result.target  # noqa: E731
    assert wait_for(lambda: waiting().attempts >= 1)
    assert waiting().status == "waiting" and "ConnectionRefusedError" in waiting().reason
    assert (tmp_path / "run" / "targets" / "00000.onnx").read_bytes() == graph  # kept until measured
    agent = InProcessAgent(port)
    try:
        assert wait_for(lambda: waiting().status == "measured")
        measured = archive.get(0)
        assert measured.result.target.p50_ms > 0 and measured.result.target.p90_ms >= measured.result.target.p50_ms
        assert "onnxruntime" in measured.result.target.device and measured.outcome.target.startswith(
            f"{measured.result.target.p50_ms:.2f} ms on the target")
        assert archive.db.execute("SELECT target_latency_ms FROM candidates").fetchone()[0] == measured.result.target.p50_ms
        assert not (tmp_path / "run" / "targets" / "00000.onnx").exists()
        assert targets.close(drain=True) == 0
    finally:
        agent.stop()
        archive.close()


def test_targets_measure_sends_what_a_finished_run_left_waiting(tmp_path, graph):
    config = targets_config(tmp_path, "http://127.0.0.1:9")
    archive = Archive(tmp_path / "run")
    archive.add(target.Targets(config, tmp_path / "run", TOKEN).prepare(waiting_candidate(0), graph))
    archive.close()
    agent = InProcessAgent()
    try:  # the run's agent moved: --url gives the new address
        moved = config.model_copy(update={"target": config.target.model_copy(update={"url": agent.url})})
        assert target.measure_waiting(moved, tmp_path / "run") == (1, 0)
    finally:
        agent.stop()
    archive = Archive(tmp_path / "run", readonly=True)
    assert archive.get(0).result.target.status == "measured" and archive.waiting_for_target() == []
    archive.close()


def test_the_progress_line_counts_what_waits_for_the_device(tmp_path):
    import io

    from rich.console import Console

    from edgenas.config import SearchConfig
    from edgenas.search import Display

    archive = Archive(tmp_path / "run")
    archive.add(waiting_candidate(0))
    quiet = Console(file=io.StringIO())
    assert "1 waiting for the device" in Display(quiet, SearchConfig(), archive, agents=True)._describe(archive)
    assert "waiting for the device" not in Display(quiet, SearchConfig(), archive)._describe(archive)
    archive.close()


def test_a_model_the_agent_refuses_is_not_asked_again_and_the_candidate_stays_valid(tmp_path):
    agent = InProcessAgent()
    archive = Archive(tmp_path / "run")
    targets = target.Targets(targets_config(tmp_path, agent.url), tmp_path / "run", TOKEN)
    try:
        candidate = targets.prepare(waiting_candidate(0), b"not an onnx model")
        archive.add(candidate)
        targets.submit(candidate)
        assert wait_for(lambda: archive.get(0).result.target.status == "failed")
        refused = archive.get(0)
        assert refused.status == "ok" and "422" in refused.result.target.reason and refused.result.target.attempts == 1
        assert refused.outcome.target.startswith("not measurable on the target (the agent refused it (422)")
        assert targets.close(drain=True) == 0 and not list((tmp_path / "run" / "targets").iterdir())
    finally:
        agent.stop()
        archive.close()


def test_with_a_latency_budget_a_would_be_best_is_measured_before_promotion(tmp_path, graph):
    """Under budget it stays the best; over it, it is a failed (budget) attempt and never becomes a parent."""
    agent = InProcessAgent()
    try:
        for budget_ms, promoted in ((1000.0, True), (1e-6, False)):
            run = tmp_path / f"run-{promoted}"
            config = targets_config(run.parent, agent.url).model_copy(
                update={"budget": BudgetConfig(max_target_latency_ms=budget_ms)})
            targets = target.Targets(config, run, TOKEN)
            best = targets.prepare(waiting_candidate(0, is_best=True), graph)
            other = targets.prepare(waiting_candidate(1, is_best=False), graph)
            assert best.result.target.status == "measured" and other.result.target.status == "waiting"
            assert best.is_best is promoted and (best.status == "ok") is promoted
            if not promoted:
                assert best.result.failure.kind.value == "budget" and best.outcome.kind == "budget"
                assert "exceeds the target latency budget of 1e-06 ms" in best.outcome.diagnostic
            assert sorted(p.name for p in (run / "targets").iterdir()) == ["00001.onnx"]  # only what still waits
            targets.close(drain=False)
    finally:
        agent.stop()


def test_a_best_found_over_the_budget_after_the_fact_loses_its_promotion():
    over = TargetLatency(status="measured", p50_ms=9.0, p90_ms=9.5)
    demoted = target.with_target(waiting_candidate(3, is_best=True), over, max_ms=5.0)
    assert (demoted.status, demoted.is_best, demoted.val_accuracy) == ("failed", False, None)
    kept = target.with_target(waiting_candidate(3, is_best=True), over, max_ms=None)
    assert kept.is_best and kept.status == "ok" and kept.outcome.target == "9.00 ms on the target (fp32, batch 1, 1 thread(s))"


def test_under_a_budget_a_model_the_target_cannot_run_is_a_budget_failure():
    refused = TargetLatency(status="failed", reason="the agent refused it (422): cannot measure this model")
    failed = target.with_target(waiting_candidate(1, is_best=True), refused, max_ms=5.0)
    assert (failed.status, failed.is_best) == ("failed", False) and "cannot be shown to meet" in failed.outcome.diagnostic
    assert target.with_target(waiting_candidate(1, is_best=True), refused, max_ms=None).is_best  # no budget: it stays


def test_an_agent_that_never_answers_is_given_up_on_after_a_few_tries(tmp_path, graph):
    """A request past target.timeout_s may still be running there: the graph is tried SLOW_TRIES times, then failed."""
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    config = targets_config(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", **{"target.timeout_s": 0.3})
    targets = target.Targets(config, tmp_path / "run", TOKEN)
    try:
        t = waiting_candidate(0).result.target
        for _ in range(target.SLOW_TRIES):
            t = targets.measure(graph, t)
        assert t.status == "failed" and t.attempts == target.SLOW_TRIES and "raise target.timeout_s" in t.reason
    finally:
        targets.close(drain=False)
        silent.close()


def test_a_resume_may_move_the_agent_but_not_switch_between_agent_and_local(tmp_path):
    from edgenas.search import config_changes

    agent = targets_config(tmp_path, "http://10.0.0.2:8765")
    moved = targets_config(tmp_path, "http://10.0.0.3:8765")
    local = load_config(None, ["target.runs=5", "target.timeout_s=20", "target.retry_s=0.2"])
    assert config_changes(agent, moved) == {} and set(config_changes(agent, local)) == {"target.url"}


def test_prompts_show_the_target_latency_and_its_budget():
    from edgenas.prompts import Task, improver_messages

    task = Task("cifar10", 10, (3, 32, 32), BudgetConfig(max_target_latency_ms=4.0), "1 epoch", "int8, batch 1, 2 thread(s)")
    best = target.with_target(waiting_candidate(0, is_best=True),
                              TargetLatency(status="measured", p50_ms=3.25, p90_ms=3.5, precision="int8", threads=2), 4.0)
    text = improver_messages(task, best, best, [best.triple])[1]["content"]
    assert "at most 4 ms median latency on the target device (int8, batch 1, 2 thread(s))" in text
    assert text.count("3.25 ms on the target (int8, batch 1, 2 thread(s))") == 3  # the model, the last attempt, memory


def test_pareto_ranks_by_the_target_latency_and_leaves_out_what_waits():
    from edgenas import pareto

    def measured(iteration, accuracy, host_ms, target_ms):
        c = waiting_candidate(iteration, accuracy)
        c = c.model_copy(update={"result": c.result.model_copy(update={"latency_ms": host_ms})})
        return target.with_target(c, TargetLatency(status="measured", p50_ms=target_ms, p90_ms=target_ms), None)

    # 1 is faster on this machine but slower on the target than 0, and less accurate: dominated there
    candidates = [measured(0, 0.6, 0.5, 1.0), measured(1, 0.5, 0.1, 2.0), waiting_candidate(2, 0.9)]
    points = {p.iteration: p for p in pareto.front_of(candidates, BudgetConfig())}
    assert set(points) == {0, 1} and points[0].front == 0 and points[1].front == 1
    assert points[0].target_latency_ms == 1.0
    capped = pareto.front_of(candidates, BudgetConfig(max_target_latency_ms=1.5))
    assert [(p.iteration, p.feasible) for p in capped] == [(0, True), (1, False)]


# ---------------------------------------------------------------- the trusted worker's side


def test_the_worker_sends_a_checked_int8_graph_and_the_jail_never_sees_the_target(tmp_path):
    """The graph for the agent is the referee's checked copy, quantised; the candidate cannot learn where the agent
    is or where its token lies: an attack that looks for them in its own memory finds nothing (it would find the
    config's target section, token file path included, if the jail were given the whole config)."""
    config = load_config(search_config(tmp_path), [
        "target.url=http://127.0.0.1:9", f"target.token_file={tmp_path / 'token'}", "target.precision=int8"])
    spy = attack_candidate("""
os_, sys_, ct, libc = _neuter()
objects = sys_.modules['gc'].get_objects()
dicts = [o for o in objects if isinstance(o, dict)]
section = lambda v: isinstance(v, dict) and 'token_file' in v or isinstance(getattr(v, 'token_file', None), str)
_report({'config': any(getattr(o.get('dataset'), 'name', None) == 'synthetic' for o in dicts),  # the Config's fields
         'target': [repr(o['target'])[:200] for o in dicts if section(o.get('target'))],
         'token_file': [o['token_file'] for o in dicts if isinstance(o.get('token_file'), str)]})
""")
    with Evaluator(config) as evaluator:
        result = evaluator.evaluate(program("good_cnn.py"))
        sent = onnx.load_from_string(evaluator.last_graph)
        attacked = found(evaluator.evaluate(spy))
    assert result.ok and result.target.status == "waiting" and result.target.precision == "int8"
    assert result.stage_seconds["quantize"] > 0 and result.stage == "target"
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in sent.graph.node}
    # it reads the config it was given, without the target section
    assert attacked == {"config": True, "target": [], "token_file": []}


def test_without_an_agent_the_worker_measures_the_target_latency_and_enforces_its_budget(tmp_path):
    ok_config = load_config(search_config(tmp_path), ["target.batch=4", "target.runs=5"])
    with Evaluator(ok_config) as evaluator:
        result = evaluator.evaluate(program("good_cnn.py"))
        assert evaluator.last_graph == b""  # nothing for the host to send
    t = result.target
    assert result.ok and t.status == "measured" and t.agent == "local" and t.batch == 4 and 0 < t.p50_ms <= t.p90_ms
    assert "onnxruntime" in t.device and result.stage_seconds["target"] > 0
    tight = ok_config.model_copy(update={"budget": BudgetConfig(max_target_latency_ms=1e-6)})
    with Evaluator(tight) as evaluator:
        over = evaluator.evaluate(program("good_cnn.py"))
    assert not over.ok and over.failure.kind.value == "budget" and over.stage == "target"
    assert "exceeds the target latency budget" in over.failure.message and over.val_accuracy is not None


# ---------------------------------------------------------------- end to end: a search against an agent


def start_agent(python, port, token_file, cwd):
    proc = subprocess.Popen([python, "-m", "exporters.agent", "--port", str(port), "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(proc.stdout.readline())["listening"].endswith(f":{port}")
    return proc


def agent_search(tmp_path, iterations):
    """(port, token file, config file) of a mutate search whose target is an agent on a free local port."""
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": iterations},
                           target={"url": f"http://127.0.0.1:{port}", "token_file": str(token_file), "retry_s": 0.3,
                                   "runs": 5, "timeout_s": 20})
    return port, token_file, config


def target_rows(run):
    with sqlite3.connect(f"file:{run / 'archive.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT iteration, status, json_extract(record, '$.result.target.status') FROM candidates "
                          "WHERE status != 'pending'").fetchall()


def test_a_search_survives_the_agent_being_killed_and_restarted(tmp_path, device_python):
    """The agent runs in an environment without torch; killed mid-run and restarted on the same port, it loses no
    candidate: every valid one ends with its latency measured there, and the archive, show, pareto and targets
    rank by it."""
    port, token_file, config = agent_search(tmp_path, iterations=20)
    run = tmp_path / "run"
    agent = start_agent(device_python, port, token_file, tmp_path)
    search = subprocess.Popen([sys.executable, "-m", "edgenas.cli", "search", "--config", config, "--run-dir", str(run),
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (run / "archive.sqlite").exists() and any(
            t == "measured" for _, _, t in target_rows(run)), 240)
        agent.kill()
        agent.wait()
        assert wait_for(lambda: any(json.loads(line).get("status") == "waiting" for line in
                                    (run / "events.jsonl").read_text().splitlines() if '"event": "target"' in line), 240)
        assert search.poll() is None, "the search ended before the agent was restarted: make it longer"
        agent = start_agent(device_python, port, token_file, tmp_path)
        out, err = search.communicate(timeout=600)
    finally:
        search.kill()
        agent.kill()
        agent.wait()
    assert search.returncode == 0, err
    assert json.loads(out)["iterations"] == 20
    rows = json.loads(run_cli("show", run, "--json").stdout)
    valid = [r for r in rows if r["status"] == "ok"]
    assert [r["iteration"] for r in rows] == list(range(20)) and len(valid) >= 10
    assert all(r["target_status"] == "measured" and 0 < r["target_latency_ms"] <= r["target_p90_ms"] for r in valid)
    assert any(json.loads(line).get("status") == "waiting" for line in (run / "events.jsonl").read_text().splitlines()
               if '"event": "target"' in line)  # it really was down for some
    assert not list((run / "targets").iterdir())
    archive = Archive(run, readonly=True)  # what the feedback memory shows the LLM
    assert all(c.outcome.target.endswith("ms on the target (fp32, batch 1, 1 thread(s))")
               for c in archive.all() if c.status == "ok")
    archive.close()
    front = json.loads(run_cli("pareto", run, "--json").stdout)
    assert front and all(p["target_latency_ms"] is not None for p in front)
    agreement = json.loads(run_cli("targets", run, "--json").stdout)
    assert agreement["candidates"] == {"measured": len(valid), "waiting": 0, "failed": 0}
    assert {a["proxy"]: a["n"] for a in agreement["agreement"]} == {"macs": len(valid), "params": len(valid),
                                                                    "latency_ms": len(valid)}


def test_what_waits_when_no_agent_answered_is_measured_later_and_the_token_is_never_written(tmp_path, device_python):
    """A search whose agent never answers goes on and says how to measure later; once an agent is up, the next
    session measures what waits (`edgenas targets --measure` with a wrong token had left them waiting, with the
    reason). A candidate that prints the token (as if it had read it) finds it scrubbed from everything written."""
    port, token_file, config = agent_search(tmp_path, iterations=3)
    leaky = tmp_path / "leaky.py"
    leaky.write_text(f"print('the token is {TOKEN}')\n" + program("good_cnn.py"))
    run = tmp_path / "run"
    searched = run_cli("search", "--config", config, "--run-dir", run, "--seed-program", leaky, "--json")
    assert searched.returncode == 0, searched.stderr
    assert f"edgenas targets {run} --measure" in searched.stderr
    waited = [i for i, s, t in target_rows(run) if s == "ok" and t == "waiting"]
    assert waited and waited == [i for i, s, _ in target_rows(run) if s == "ok"]
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all\n")
    agent = start_agent(device_python, port, token_file, tmp_path)
    try:
        refused = run_cli("targets", run, "--measure", "--token-file", wrong)
        assert refused.returncode == 0 and "still wait" in refused.stderr
        reasons = [r["target_reason"] for r in json.loads(run_cli("show", run, "--json").stdout) if r["status"] == "ok"]
        assert "answered 401" in reasons[0]
        resumed = run_cli("search", "--run-dir", run, "--iterations", 4)
        assert resumed.returncode == 0 and "earlier sessions wait for their target latency: queued" in resumed.stderr
    finally:
        agent.kill()
        agent.wait()
    summary = json.loads(run_cli("targets", run, "--json").stdout)["candidates"]
    measured = [i for i, s, t in target_rows(run) if s == "ok" and t == "measured"]
    assert summary["waiting"] == 0 and set(waited) <= set(measured) and summary["measured"] == len(measured)
    assert run_cli("report", run).returncode == 0
    for path in run.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert "[redacted target.token_file]" in (run / "candidates" / "00000.py").read_text()


def test_bad_target_settings_are_one_line_errors(tmp_path):
    config = search_config(tmp_path, target={"url": "http://127.0.0.1:9", "token_file": str(tmp_path / "missing")})
    proc = run_cli("search", "--config", config, "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "target.token_file: cannot read" in proc.stderr and not (tmp_path / "run").exists()
    no_target = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": 1})
    assert run_cli("search", "--config", no_target, "--run-dir", tmp_path / "plain").returncode == 0
    proc = run_cli("targets", tmp_path / "plain")
    assert proc.returncode == 2 and "without a `target` section" in proc.stderr
