"""Resuming a run: the command that started it resumes it, a different config is refused by key, wall time adds up."""

import json

from edgenas.archive import Archive

from .conftest import run_cli
from .test_loop import search_config


def events(run):
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def test_the_same_command_line_resumes_and_may_extend_the_run(tmp_path):
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}})
    run = tmp_path / "run"
    command = ["search", "--config", config, "--set", "train.lr=0.05", "--set", "search.seed=3", "--run-dir", run,
               "--iterations", "2", "--json"]
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr
    again = run_cli(*command)  # what a user types after a kill: the saved config holds the --set values
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["iterations"] == 2
    extended = run_cli(*command[:-3], "--iterations", "3", "--json")
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["iterations"] == 3
    assert [e["event"] for e in events(run) if e["event"] in ("start", "resume")] == ["start", "resume", "resume"]


def test_a_different_config_is_refused_with_the_keys_that_differ(tmp_path):
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": 1})
    run = tmp_path / "run"
    assert run_cli("search", "--config", config, "--run-dir", run).returncode == 0
    for extra in (["--config", config, "--set", "train.lr=0.1"], ["--set", "train.lr=0.1"]):
        proc = run_cli("search", *extra, "--set", "budget.max_params=5", "--run-dir", run)
        assert proc.returncode == 2, proc.stderr
        assert "budget.max_params (300000 -> 5)" in proc.stderr and "train.lr (0.01 -> 0.1)" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
    assert len(Archive(run).all()) == 1


def test_max_wall_s_counts_the_time_of_earlier_sessions(tmp_path):
    config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}}, search={"iterations": 1})
    run = tmp_path / "run"
    assert run_cli("search", "--config", config, "--run-dir", run).returncode == 0
    with open(run / "events.jsonl", "a") as f:  # an earlier session that ran for 1,000 s before a kill
        for event in ({"time": 1e9, "event": "resume"}, {"time": 1e9 + 1000, "event": "candidate"}):
            f.write(json.dumps(event) + "\n")
    proc = run_cli("search", "--run-dir", run, "--iterations", "5", "--set", "search.max_wall_s=500", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["iterations"] == 1 and summary["reason"].startswith("reached the wall-time limit of 500 s")


def test_seconds_spent_sums_sessions_and_skips_a_torn_line(tmp_path):
    archive = Archive(tmp_path / "run")
    lines = [{"time": 100, "event": "start"}, {"time": 130, "event": "candidate"}, {"time": 150, "event": "stop"},
             {"time": 500, "event": "resume"}, {"time": 510, "event": "candidate"}]
    (tmp_path / "run" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"time": 9')
    assert archive.seconds_spent() == 60
    archive.close()


def test_an_archive_of_schema_2_is_read_as_it_is_and_upgraded_when_a_search_writes(tmp_path):
    """Archives written before chains and re-runs: `show` leaves them readable by the edgenas that wrote them; a
    resumed search upgrades them in place (one chain, nothing pending) and goes on."""
    import sqlite3

    from edgenas.records import Candidate, EvalResult, Outcome, Status

    run = tmp_path / "run"
    run.mkdir()
    with sqlite3.connect(run / "archive.sqlite") as db:  # what schema 2 wrote: no chain column, no new fields
        db.executescript("""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '2');
CREATE TABLE candidates (iteration INTEGER PRIMARY KEY, status TEXT NOT NULL, failure_kind TEXT, val_accuracy REAL,
    params INTEGER, macs INTEGER, peak_memory_bytes INTEGER, latency_ms REAL, code_hash TEXT, is_best INTEGER NOT NULL,
    created REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX candidates_hash ON candidates (code_hash);
""")
        for i, acc in enumerate((0.3, 0.5, 0.4)):
            c = Candidate(iteration=i, status="ok", code=f"X = {i}\n", outcome=Outcome(status="ok"), is_best=acc != 0.4,
                          result=EvalResult(status=Status.ok, val_accuracy=acc))
            record = c.model_dump(mode="json", exclude={"chain", "reruns"})
            del record["result"]["seed"]
            db.execute("INSERT INTO candidates VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (i, "ok", None, acc, None, None, None, None, None, int(c.is_best), 0.0, json.dumps(record)))
    version = lambda: sqlite3.connect(run / "archive.sqlite").execute("SELECT value FROM meta").fetchone()[0]  # noqa: E731
    shown = run_cli("show", run, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [r["val_accuracy"] for r in json.loads(shown.stdout)] == [0.3, 0.5, 0.4] and version() == "2"
    archive = Archive(run)
    columns = [row[1] for row in sqlite3.connect(run / "archive.sqlite").execute("PRAGMA table_info(candidates)")]
    assert version() == "4" and columns[-2:] == ["chain", "target_latency_ms"]
    assert archive.best().iteration == 1 and [c.iteration for c in archive.recent(2, chain=0)] == [1, 2]
    archive.add(Candidate(iteration=3, status="failed", outcome=Outcome(status="failed")))
    assert archive.next_iteration() == 4 and archive.proposals(0) == 4
