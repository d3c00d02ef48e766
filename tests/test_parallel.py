"""Several chains over a pool of evaluation slots: every iteration exactly once, each chain's own memory window,
LLM calls and evaluations really side by side, and a kill -9 with work in flight resumed without asking again."""

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from edgenas import loop
from edgenas.archive import Archive
from edgenas.config import SearchConfig
from edgenas.propose import Proposal
from edgenas.records import Candidate, EvalResult, Outcome, Status

from .conftest import run_cli
from .fake_openai import FakeOpenAI, reply
from .test_loop import fenced, improve, program, proposer


class Gauge:
    """How many callers are inside at once, and the most there ever were."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


class SlowChat:
    """A thread-safe stand-in LLM that takes a while: the improver proposes, the generator writes a new program."""

    identity = "slow"

    def __init__(self, role: str, gauge: Gauge):
        self.role, self.gauge, self.seen, self.lock = role, gauge, [], threading.Lock()
        self.text = lambda n: fenced(program(round(0.1 + 0.01 * n, 2), tag=str(n)))  # the generator's n-th program

    def chat(self, messages, sampling):
        from edgenas.llm.base import Reply

        with self.gauge:
            time.sleep(0.05)
        with self.lock:
            self.seen.append(messages)
            n = len(self.seen)
        text = improve(n) if self.role == "improver" else self.text(n)
        return Reply(text, tokens_in=10, tokens_out=5, seconds=0.05)


class SlowEvaluator:
    last_graph = b""

    def __init__(self, shared: Gauge):
        self.shared, self.mine = shared, Gauge()

    def evaluate(self, code, run=0):
        with self.shared, self.mine:
            time.sleep(0.1)
        acc = float(re.search(r"ACC = ([\d.]+)", code).group(1))
        return EvalResult(status=Status.ok, val_accuracy=acc, params=100, macs=1000, peak_memory_bytes=1 << 20)


def test_chains_and_workers_give_each_iteration_once_and_each_chain_its_own_window(tmp_path):
    llm, evaluations = Gauge(), Gauge()
    generator, improver = SlowChat("generator", llm), SlowChat("improver", llm)
    evaluators = [SlowEvaluator(evaluations) for _ in range(2)]
    archive, k = Archive(tmp_path / "run"), 2
    reason = loop.run(archive, proposer(generator, improver), evaluators,
                      SearchConfig(iterations=16, chains=3, workers=2, history_size=k, confirm_margin=None))
    rows = archive.all()
    assert reason == "reached 16 iterations" and [r.iteration for r in rows] == list(range(16))
    assert not archive.pending() and all(r.status == "ok" for r in rows)
    chain_of = {r.iteration: r.chain for r in rows}
    assert set(chain_of.values()) == {0, 1, 2}
    assert llm.most == 3  # the three chains' LLM calls overlap
    assert evaluations.most == 2 and all(e.mine.most == 1 for e in evaluators)  # two slots, one candidate each
    lineage = {c: [i for i in sorted(chain_of) if chain_of[i] == c] for c in range(3)}
    windows = [[int(i) for i in re.findall(r"^- iteration (\d+):", m[-1]["content"], re.M)] for m in improver.seen]
    assert sum(map(bool, windows)) >= 10
    for shown in filter(None, windows):  # exactly the last k (or fewer, early) attempts of one chain
        own = lineage[chain_of[shown[0]]]
        end = own.index(shown[-1]) + 1
        assert shown == own[max(0, end - k):end], (shown, own)
    for r in rows:  # a chain builds on its own best once it has one
        if r.parent is not None and any(p.is_best and p.chain == r.chain and p.iteration < r.parent for p in rows):
            assert chain_of[r.parent] == r.chain, r.iteration


def test_one_chain_and_one_worker_is_the_serial_loop(tmp_path):
    llm, evaluations = Gauge(), Gauge()
    generator, improver = SlowChat("generator", llm), SlowChat("improver", llm)
    archive = Archive(tmp_path / "run")
    loop.run(archive, proposer(generator, improver), [SlowEvaluator(evaluations)], SearchConfig(iterations=5))
    rows = archive.all()
    assert llm.most == 1 and evaluations.most == 1 and {r.chain for r in rows} == {0}
    assert [r.parent for r in rows] == [None, 0, 1, 2, 3]  # every program is a new best here


WIDTHS = iter(range(8, 10_000, 4))


def responder(request):
    """The improver asks for one change; the generator writes a network of a width never used before."""
    time.sleep(0.3)
    if "diagnose" in request.messages[0]["content"]:
        return reply(json.dumps({"problem": "p", "modification": "m"}))
    width = next(WIDTHS)
    return reply(f"```python\nclass Net(nn.Module):\n    def __init__(self, num_classes=4):\n        super().__init__()\n"
                 f"        self.conv = nn.Conv2d(3, {width}, 3, padding=1)\n        self.fc = nn.Linear({width}, num_classes)\n\n"
                 f"    def forward(self, x):\n        return self.fc(F.relu(self.conv(x)).mean((2, 3)))\n```")


def test_kill_9_with_candidates_in_flight_then_resume_loses_and_repeats_nothing(tmp_path):
    run = tmp_path / "run"
    with FakeOpenAI(responder) as fake:
        config = tmp_path / "search.yaml"
        config.write_text(f"""
dataset: {{name: synthetic, num_classes: 4, in_shape: [3, 16, 16], synthetic_size: 256, val_size: 64}}
train: {{batch_size: 64}}
eval: {{timeout_s: 60, latency_runs: 2}}
llm: {{generator: {{backend: openai, model: fake-model, base_url: "{fake.url}"}}, cache: false}}
search: {{iterations: 10, chains: 2, workers: 2, history_size: 3}}
""")
        command = [sys.executable, "-m", "edgenas.cli", "search", "--config", str(config), "--run-dir", str(run)]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline, in_flight = time.time() + 300, []
        while time.time() < deadline and not in_flight:
            time.sleep(0.05)
            try:
                with sqlite3.connect(f"file:{run / 'archive.sqlite'}?mode=ro", uri=True) as db:
                    done = db.execute("SELECT COUNT(*) FROM candidates WHERE status!='pending'").fetchone()[0]
                    if done >= 2:
                        in_flight = db.execute("SELECT iteration, code_hash FROM candidates WHERE status='pending'").fetchall()
            except sqlite3.OperationalError:
                pass  # not created yet
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert in_flight, "no candidate was in flight when the run was killed"
        before = len(Archive(run).all())
        chats = lambda: sum(r.path.endswith("/chat/completions") for r in fake.requests)  # noqa: E731
        asked_before = chats()
        resumed = run_cli(*command[3:], "--json")
        asked_after = chats() - asked_before
    assert resumed.returncode == 0, resumed.stderr
    archive = Archive(run)
    rows = archive.all()
    assert [r.iteration for r in rows] == list(range(10)) and not archive.pending()
    by_iteration = {r.iteration: r for r in rows}
    for iteration, digest in in_flight:  # measured after the resume, from the code the LLM wrote before the kill
        assert by_iteration[iteration].code_hash == digest and by_iteration[iteration].status == "ok"
    new_calls = sum(len(r.llm_calls) for r in rows if r.iteration >= before)
    assert asked_after == new_calls  # the resumed session asked only for new iterations
    assert {r.chain for r in rows} == {0, 1}


class SizedEvaluator:
    """Accuracy from `ACC =`, parameter count from `TAG =`: a small model can be on the front though less accurate."""
    last_graph = b""

    def evaluate(self, code, run=0):
        acc = float(re.search(r"ACC = ([\d.]+)", code).group(1))
        params = int(re.search(r"TAG = '(\d+)'", code).group(1))
        return EvalResult(status=Status.ok, val_accuracy=acc, params=params, macs=params * 10, peak_memory_bytes=params)


def test_front_parents_are_drawn_from_the_accuracy_size_front(tmp_path):
    from edgenas import pareto
    from edgenas.config import BudgetConfig

    sizes = [(0.50, 1000), (0.30, 100), (0.20, 5000), (0.55, 2000), (0.40, 150), (0.45, 9000)] * 3
    generator = SlowChat("generator", Gauge())
    generator.text = lambda n: fenced(program(sizes[n - 1][0], tag=str(sizes[n - 1][1])))
    improver = SlowChat("improver", Gauge())
    archive = Archive(tmp_path / "run")
    budget = BudgetConfig(max_params=6000)
    choose = lambda a, draw: pareto.parent_from_front(a.all(), budget, draw)  # noqa: E731
    loop.run(archive, proposer(generator, improver), [SizedEvaluator()],
             SearchConfig(iterations=12, parent="front", confirm_margin=None), choose_parent=choose)
    rows = archive.all()
    parents = {r.parent for r in rows[1:]}
    for r in rows[1:]:  # each parent was on the feasible front when the change was proposed
        earlier = [c for c in rows if c.iteration < r.iteration]
        front = {p.iteration for p in pareto.front_of(earlier, budget) if p.feasible and p.front == 0}
        assert r.parent in front, (r.iteration, r.parent, front)
    assert len(parents) > 1 and any(rows[p].val_accuracy < archive.best().val_accuracy for p in parents)
    assert any("a model on the front of accuracy against size" in m[-1]["content"] for m in improver.seen)
    assert pareto.parent_from_front(rows, BudgetConfig(max_params=10), 0) is None  # nothing fits: the best instead


def test_a_stalled_chain_adopts_the_better_chain_best_and_records_it(tmp_path):
    archive = Archive(tmp_path / "run")
    for iteration, chain, acc, best in [(0, 0, 0.5, True), (1, 1, 0.3, True), (2, 0, 0.6, True), (3, 1, 0.2, False),
                                        (4, 0, 0.55, False), (5, 1, 0.25, False)]:
        archive.add(Candidate(iteration=iteration, chain=chain, status="ok", outcome=Outcome(status="ok"), is_best=best,
                              code=f"X = {iteration}\n", result=EvalResult(status=Status.ok, val_accuracy=acc)))
    patient = loop.context(archive, 1, SearchConfig(chains=2, adopt_after=3))
    assert (patient.best.iteration, patient.adopted) == (1, False)  # two stalled attempts: not yet
    ctx = loop.context(archive, 1, SearchConfig(chains=2, adopt_after=2))
    assert (ctx.best.iteration, ctx.adopted) == (2, True) and loop.context(archive, 0, SearchConfig(adopt_after=1)).adopted is False
    adopting = loop.triage(6, 1, Proposal("p", "m", "X = 6\n"), ctx, archive)
    archive.add(adopting)
    assert adopting.adopted and adopting.parent == 2 and archive.stalled(1) == 0
    assert archive.best(1).iteration == 2  # chain 1's bar is now the program it adopted
    assert loop.context(archive, 1, SearchConfig(chains=2, adopt_after=2)).adopted is False


def test_workers_share_the_cores_and_take_the_visible_gpus_in_turn(tmp_path, monkeypatch):
    from edgenas import search

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert search.placements(1, "cpu") == [{}]  # one worker: the whole machine, as the serial loop has it
    assert [p["cpus"] for p in search.placements(2, "cpu")] == [[0, 1], [2, 3]]
    assert [p["gpu"] for p in search.placements(2, "auto")] == [None, None]  # no NVIDIA driver here
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (tmp_path / "gpus" / "0000:02:00.0").mkdir()
    monkeypatch.setattr(search, "NVIDIA_GPUS", str(tmp_path / "gpus"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [p["gpu"] for p in search.placements(3, "cuda")] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the user's choice holds: every worker on that GPU
    assert [p["gpu"] for p in search.placements(2, "auto")] == ["1", "1"]
    assert [p["gpu"] for p in search.placements(2, "cpu")] == [None, None]


def test_patience_counts_only_measured_iterations(tmp_path):
    """Every program beats the one before: with candidates in flight, patience must not stop the run."""
    generator, improver = SlowChat("generator", Gauge()), SlowChat("improver", Gauge())
    archive = Archive(tmp_path / "run")
    reason = loop.run(archive, proposer(generator, improver), [SlowEvaluator(Gauge()) for _ in range(2)],
                      SearchConfig(iterations=9, chains=3, workers=2, patience=2, confirm_margin=None))
    assert reason == "reached 9 iterations" and all(c.is_best for c in archive.all()[:1])


def test_an_interrupted_run_leaves_at_once_and_keeps_what_is_in_flight(tmp_path):
    calls = itertools.count()

    class Stuck(SlowEvaluator):  # the first two measurements are quick, every later one takes 6 s
        def evaluate(self, code, run=0):
            if next(calls) >= 2:
                time.sleep(6)
            return super().evaluate(code, run)

    def interrupt(candidate, archive):  # Ctrl-C once others are in flight
        if candidate.status == "ok" and archive.pending():
            raise KeyboardInterrupt

    generator, improver = SlowChat("generator", Gauge()), SlowChat("improver", Gauge())
    archive = Archive(tmp_path / "run")
    start = time.monotonic()
    try:
        loop.run(archive, proposer(generator, improver), [Stuck(Gauge()) for _ in range(2)],
                 SearchConfig(iterations=9, chains=3, workers=2, confirm_margin=None), on_iteration=interrupt)
    except KeyboardInterrupt:
        pass
    assert time.monotonic() - start < 4  # not the 6 s the other measurements still need
    assert archive.pending() and all(c.status in ("ok", "pending") for c in archive.all())


def test_other_chains_wait_for_a_first_candidate_instead_of_writing_it_again(tmp_path):
    """Like the mutate baseline, this generator writes the same first program whenever it has no reference: only
    chain 0 may start from scratch, the others start from the run's best once there is one."""
    generator, improver = SlowChat("generator", Gauge()), SlowChat("improver", Gauge())
    chat = generator.chat

    def first_is_always_the_same(messages, sampling):
        reply = chat(messages, sampling)
        if "Reference model" not in messages[-1]["content"]:
            return type(reply)(fenced(program(0.2, tag="first")), 1, 1, 0.0)
        return reply

    generator.chat = first_is_always_the_same
    archive = Archive(tmp_path / "run")
    loop.run(archive, proposer(generator, improver), [SlowEvaluator(Gauge()) for _ in range(2)],
             SearchConfig(iterations=9, chains=3, workers=2, confirm_margin=None))
    rows = archive.all()
    assert [r.status for r in rows] == ["ok"] * 9 and rows[0].chain == 0
    assert all(r.parent is not None for r in rows[1:])
