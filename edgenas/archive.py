"""The run directory, the single source of truth of a search.

    RUN_DIR/config.yaml        the config as run
    RUN_DIR/archive.sqlite     every candidate (schema below), WAL mode
    RUN_DIR/candidates/N.py    each candidate's code, for people
    RUN_DIR/events.jsonl       append-only event log (sessions' start, resume and stop: the run's wall time)
    RUN_DIR/targets/N.onnx     graphs waiting for their target latency (edgenas/target.py), deleted once measured

Everything written passes through `redact` first, so no API key or token from the environment lands in a run.
Contract: an iteration is written when it is proposed (status `pending`, with the LLM's code) and rewritten in
one transaction when it is measured, so a kill -9 at any moment loses no LLM reply and never leaves a partial or
duplicate row: a resumed run measures what was pending without asking the LLM again. Everything the loop needs to
resume (next iteration, each chain's best and memory window, what is in flight) is derived from the rows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from edgenas import redact
from edgenas.records import Candidate, Failure

SCHEMA_VERSION = 4  # 4: target latency; 3: chains, pending proposals, close wins re-run; 2: measured on the graph
# older schemas whose records load as they are (they lack only fields that have defaults): the columns they miss
UPGRADABLE = {2: ("chain INTEGER NOT NULL DEFAULT 0", "target_latency_ms REAL"), 3: ("target_latency_ms REAL",)}
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    iteration INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    failure_kind TEXT,
    val_accuracy REAL,
    params INTEGER,
    macs INTEGER,
    peak_memory_bytes INTEGER,
    latency_ms REAL,
    code_hash TEXT,
    is_best INTEGER NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL,
    chain INTEGER NOT NULL DEFAULT 0,
    target_latency_ms REAL
);
CREATE INDEX IF NOT EXISTS candidates_hash ON candidates (code_hash);
"""
# record: the whole Candidate as JSON (code, prompts, replies, result, re-runs, timings, tokens); the other columns
# are copies of its fields, there to be queried
COLUMNS = ("iteration", "status", "failure_kind", "val_accuracy", "params", "macs", "peak_memory_bytes", "latency_ms",
           "code_hash", "is_best", "created", "record", "chain", "target_latency_ms")


class ArchiveError(RuntimeError):
    pass


def _record(candidate: Candidate) -> str:
    """The candidate as JSON with secrets scrubbed from every string (code, prompts, replies, diagnostics)."""
    text = candidate.model_dump_json()
    if not redact.active():
        return text
    record = redact.scrub_data(json.loads(text))  # scrub parsed strings: text-level edits could split an escape
    for result in [record.get("result") or {}, *record.get("reruns", [])]:
        if result.get("failure"):  # a marker can be longer than the secret it replaces; the record must still load
            message = result["failure"]["message"]
            result["failure"]["message"] = message[:Failure.model_fields["message"].metadata[0].max_length]
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class Archive:
    def __init__(self, run_dir: str | Path, readonly: bool = False):
        """`readonly`: for looking (show, pareto, finalize); an older schema is read as it is, not upgraded, so the
        edgenas that wrote it can still resume it."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "candidates").mkdir(exist_ok=True)
        self.db = sqlite3.connect(self.dir / "archive.sqlite", timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        found = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if found is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(found[0]) in UPGRADABLE and readonly:
            pass
        elif int(found[0]) in UPGRADABLE:  # one chain, no target latency: the new columns' defaults say so
            with self.db:  # all or nothing: a kill in between must not leave a half-upgraded archive
                self.db.execute("BEGIN IMMEDIATE")
                for column in UPGRADABLE[int(found[0])]:
                    self.db.execute(f"ALTER TABLE candidates ADD COLUMN {column}")
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        elif int(found[0]) != SCHEMA_VERSION:
            raise ArchiveError(f"{self.dir} has archive schema {found[0]}; this edgenas reads schema {SCHEMA_VERSION} "
                               f"(use the edgenas version that wrote it, or start a new run directory)")

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (Path(run_dir) / "archive.sqlite").is_file()

    # ------------------------------------------------------------ writing

    @staticmethod
    def _row(candidate: Candidate) -> tuple:
        r = candidate.result
        target = r.target.p50_ms if r and r.target else None
        return (candidate.iteration, candidate.status, candidate.outcome.kind if candidate.status != "ok" else None,
                candidate.val_accuracy, r.params if r else None, r.macs if r else None,
                r.peak_memory_bytes if r else None, r.latency_ms if r else None, candidate.code_hash,
                int(candidate.is_best), candidate.created or time.time(), _record(candidate), candidate.chain, target)

    def add(self, candidate: Candidate) -> None:
        """Write a candidate: a new iteration, or the measured record of a pending one."""
        updates = ", ".join(f"{c}=excluded.{c}" for c in COLUMNS[1:])
        written = self.db.execute(f"INSERT INTO candidates ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                                  f"ON CONFLICT(iteration) DO UPDATE SET {updates} WHERE status='pending'",
                                  self._row(candidate)).rowcount
        if not written:
            raise ArchiveError(f"iteration {candidate.iteration} is already in {self.dir}")
        if candidate.code is not None:  # after the row: a refused write leaves the file of the row that stands
            path = self.dir / "candidates" / f"{candidate.iteration:05d}.py"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(redact.scrub(candidate.code))
            os.replace(tmp, path)
        self.event("candidate", iteration=candidate.iteration, status=candidate.status,
                   val_accuracy=candidate.val_accuracy, is_best=candidate.is_best)

    def revise(self, candidate: Candidate) -> None:
        """Rewrite a measured candidate whose target latency came in after it was written (edgenas/target.py)."""
        values = self._row(candidate)
        written = self.db.execute(f"UPDATE candidates SET {', '.join(f'{c}=?' for c in COLUMNS[1:])} WHERE "
                                  "iteration=? AND status!='pending'", (*values[1:], values[0])).rowcount
        if not written:
            raise ArchiveError(f"iteration {candidate.iteration} has no measured row in {self.dir} to revise")
        t = candidate.result.target
        self.event("target", iteration=candidate.iteration, status=t.status, p50_ms=t.p50_ms, reason=t.reason,
                   candidate_status=candidate.status)

    def event(self, kind: str, **data) -> None:
        line = json.dumps(redact.scrub_data({"time": time.time(), "event": kind, **data}),
                          default=lambda value: redact.scrub(str(value)))
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------ reading

    def _load(self, sql: str, args=()) -> list[Candidate]:
        return [Candidate.model_validate_json(row[0]) for row in self.db.execute(sql, args)]

    def get(self, iteration: int) -> Candidate | None:
        found = self._load("SELECT record FROM candidates WHERE iteration=?", (iteration,))
        return found[0] if found else None

    def waiting_for_target(self) -> list[int]:
        """Measured candidates whose target latency is still to be measured."""
        return [row[0] for row in self.db.execute(  # the plain columns first: only those rows' JSON is parsed
            "SELECT iteration FROM candidates WHERE status='ok' AND target_latency_ms IS NULL AND "
            "json_extract(record, '$.result.target.status')='waiting' ORDER BY iteration")]

    def next_iteration(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(iteration) + 1, 0) FROM candidates").fetchone()[0]

    def best(self, chain: int | None = None) -> Candidate | None:
        """The most accurate candidate promoted to best (of the run, or of one chain, counting another chain's best
        that it adopted): the most accurate valid one, unless a close win failed to hold up when re-run with other
        seeds (search.confirm_margin)."""
        where = "" if chain is None else (
            f" AND (chain={int(chain)} OR iteration IN (SELECT json_extract(record, '$.parent') FROM candidates "
            f"WHERE chain={int(chain)} AND json_extract(record, '$.adopted')))")
        found = self._load(f"SELECT record FROM candidates WHERE is_best=1{where} ORDER BY val_accuracy DESC, iteration LIMIT 1")
        return found[0] if found else None

    def recent(self, k: int, chain: int | None = None) -> list[Candidate]:
        """The last k measured candidates (of the run, or of one chain), oldest first."""
        if k <= 0:
            return []
        where = "" if chain is None else f" AND chain={int(chain)}"
        return self._load(f"SELECT record FROM (SELECT iteration, record FROM candidates WHERE status!='pending'{where} "
                          "ORDER BY iteration DESC LIMIT ?) ORDER BY iteration", (k,))

    def stalled(self, chain: int) -> int:
        """A chain's measured attempts since its last new best or adoption (all of them when it had neither)."""
        return self.db.execute(
            "SELECT COUNT(*) FROM candidates WHERE chain=?1 AND status!='pending' AND iteration > COALESCE((SELECT "
            "MAX(iteration) FROM candidates WHERE chain=?1 AND (is_best=1 OR json_extract(record, '$.adopted'))), -1)",
            (chain,)).fetchone()[0]

    def pending(self) -> list[Candidate]:
        """Proposals not yet measured: what a killed run had in flight."""
        return self._load("SELECT record FROM candidates WHERE status='pending' ORDER BY iteration")

    def proposals(self, chain: int) -> int:
        """How many iterations a chain has proposed (its LLM calls are seeded by this count)."""
        return self.db.execute("SELECT COUNT(*) FROM candidates WHERE chain=?", (chain,)).fetchone()[0]

    def find_hash(self, code_hash: str) -> int | None:
        row = self.db.execute("SELECT MIN(iteration) FROM candidates WHERE code_hash=?", (code_hash,)).fetchone()
        return row[0]

    def seconds_spent(self) -> float:
        """Wall time of the sessions so far, each from its start or resume event to its last event: a killed session
        counts up to its last finished iteration."""
        path = self.dir / "events.jsonl"
        total, began, last = 0.0, None, None
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed session can be torn
            if event["event"] in ("start", "resume"):
                total += last - began if began is not None else 0.0
                began = event["time"]
            last = event["time"]
        return total + (last - began if began is not None else 0.0)

    def all(self) -> list[Candidate]:
        return self._load("SELECT record FROM candidates ORDER BY iteration")

    def since_best(self) -> int:
        """Measured iterations since the last new best (all of them when there is none); those in flight may still
        turn out to be one."""
        return self.db.execute("SELECT COUNT(*) FROM candidates WHERE status!='pending' AND iteration > "
                               "COALESCE((SELECT MAX(iteration) FROM candidates WHERE is_best=1), -1)").fetchone()[0]

    def stats(self) -> dict:
        n, valid, tokens = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status='ok'), 0), COALESCE(SUM(json_extract(record, '$.tokens_in') + json_extract(record, '$.tokens_out')), 0) FROM candidates WHERE status!='pending'"
        ).fetchone()
        return {"iterations": n, "valid": valid, "valid_rate": valid / n if n else 0.0, "tokens": tokens}

    def close(self) -> None:
        self.db.close()
