"""Latency on the deployment target, measured by device agents (python -m exporters.agent) while the search goes on.

    trusted worker --checked graph (INT8 when asked)--> host: RUN_DIR/targets/N.onnx --POST /measure--> agent
                                                         archive row N  <--  p50, p90, device  <--'

A valid candidate's row is written with its target latency `waiting`; one thread per agent sends the graphs in turn,
so a measurement overlaps the next candidates' proposal and training instead of adding to them. Each graph is saved
before its row is written and deleted once its latency is in the row: an agent that is down or slow, a killed run or
a resumed one loses nothing; what waits is measured when an agent answers again (later in the session, in the next
session, or with `edgenas targets RUN_DIR --measure`). With budget.max_target_latency_ms, a candidate about to become
the best is measured before it is promoted (it would be the next parent); one that turns out over the budget later
becomes a failed (budget) attempt and loses its promotion.
"""

from __future__ import annotations

import heapq
import http.client
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from edgenas import memory, redact
from edgenas.config import Config, ConfigError, TargetConfig
from edgenas.records import Candidate, Failure, FailureKind, Status, TargetLatency


class AgentDown(Exception):
    """The agent did not measure (unreachable, an error of its own, a token it refuses): try again later."""


class AgentSlow(AgentDown):
    """No answer within target.timeout_s: the agent may still be measuring, so a graph is tried only SLOW_TRIES times."""


class Refused(Exception):
    """The agent refused this graph (not runnable there, too large for it): asking again would not help."""


SLOW_TRIES = 3


def device_line(device: dict) -> str:
    """One line for a record: what measured it."""
    return (f"{device.get('cpu', '?')} ({device.get('cores', '?')} cores, {device.get('machine', '?')}), "
            f"onnxruntime {device.get('onnxruntime', '?')}")


def over_budget(target: TargetLatency, max_ms: float | None) -> str | None:
    """Why a candidate breaks budget.max_target_latency_ms: too slow there, or the target cannot run it at all."""
    if max_ms is None or target.status == "waiting" or (target.status == "measured" and target.p50_ms <= max_ms):
        return None
    if target.status == "failed":
        return (f"the model is {target.render()}, so it cannot be shown to meet the target latency budget of "
                f"{max_ms:g} ms; use standard layers the target's onnxruntime runs")
    return (f"{target.render()} exceeds the target latency budget of {max_ms:g} ms; make it faster on the target "
            f"(fewer MACs in the early high-resolution layers, fewer layers, cheaper ops)")


def with_target(candidate: Candidate, target: TargetLatency, max_ms: float | None) -> Candidate:
    """The candidate with its target latency; over budget.max_target_latency_ms it is a failed (budget) attempt."""
    result = candidate.result.model_copy(update={"target": target})
    over = over_budget(target, max_ms)
    if over is None:
        return candidate.model_copy(update={"result": result,
                                            "outcome": candidate.outcome.model_copy(update={"target": target.render()})})
    result = result.model_copy(update={"status": Status.failed, "stage": "target",
                                       "failure": Failure(kind=FailureKind.budget, message=over)})
    return candidate.model_copy(update={"status": "failed", "result": result, "is_best": False,
                                        "outcome": memory.outcome_of(result, None)})


def read_token(cfg: TargetConfig) -> str:
    """The agent's token from target.token_file; from now on it is scrubbed from everything written."""
    try:
        token = Path(cfg.token_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"target.token_file: cannot read {cfg.token_file} ({e.strerror})") from None
    if not token:
        raise ConfigError(f"target.token_file: {cfg.token_file} is empty")
    redact.register_value("target.token_file", token)
    return token


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout), parts.path.rstrip("/")


def health(url: str, timeout: float = 5.0) -> str | None:
    """None when the agent answers GET /health, else why not."""
    try:
        conn, base = _connection(url, timeout)
        conn.request("GET", f"{base}/health")
        status = conn.getresponse().status
        conn.close()
        return None if status == 200 else f"GET /health answered {status}"
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}"


def post(url: str, token: str, graph: bytes, cfg: TargetConfig) -> dict:
    """One measurement on one agent -> its reply (p50_ms, p90_ms, device). Raises AgentDown or Refused."""
    query = urlencode({"threads": cfg.threads, "batch": cfg.batch, "runs": cfg.runs, "warmup": cfg.warmup})
    try:
        conn, base = _connection(url, cfg.timeout_s)
        conn.request("POST", f"{base}/measure?{query}", body=graph,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
    except TimeoutError:
        raise AgentSlow(f"no answer within target.timeout_s ({cfg.timeout_s:g} s)") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise AgentDown(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    try:
        reply = json.loads(body)
    except ValueError:  # e.g. a proxy's HTML page
        reply = {"error": " ".join(body[:200].decode(errors="replace").split())}
    error = str(reply.get("error", ""))[:300] if isinstance(reply, dict) else ""
    if status in (400, 413, 422):
        raise Refused(f"the agent refused it ({status}): {error}")
    if status != 200:  # 401: a wrong token stays wrong until a session starts with the right one
        raise AgentDown(f"answered {status}: {error}")
    try:
        if all(float(reply[k]) >= 0 and math.isfinite(float(reply[k])) for k in ("p50_ms", "p90_ms")):
            return reply
    except (TypeError, KeyError, ValueError, OverflowError):
        pass
    raise AgentDown("answered without valid p50_ms and p90_ms")


class Targets:
    """The target side of a search: measures graphs on the agents, each agent one graph at a time."""

    def __init__(self, config: Config, run_dir: str | Path, token: str):
        self.cfg, self.token, self.budget_ms = config.target, token, config.budget.max_target_latency_ms
        self.run_dir, self.dir = Path(run_dir), Path(run_dir) / "targets"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # agents not measuring right now
        for url in self.cfg.urls:
            self.free.put(url)
        self.due: list[tuple[float, int]] = []  # (when, iteration): a heap of the graphs waiting
        self.changed = threading.Condition()
        self.draining = self.stopping = False
        self.threads = [threading.Thread(target=self._serve, daemon=True, name=f"target-{i}")
                        for i in range(len(self.cfg.urls))]
        for thread in self.threads:
            thread.start()

    def measure(self, graph: bytes, target: TargetLatency) -> TargetLatency:
        """One attempt on the next free agent; never raises."""
        url = self.free.get()
        attempts = target.attempts + 1
        try:
            reply = post(url, self.token, graph, self.cfg)
        except AgentSlow as e:
            if attempts < SLOW_TRIES:
                return target.model_copy(update={"status": "waiting", "agent": url, "attempts": attempts, "reason": (
                    f"{url}: {e}; tried {attempts} time(s), measured when an agent answers")})
            return target.model_copy(update={"status": "failed", "agent": url, "attempts": attempts, "reason": (
                f"{url}: {e} in {attempts} tries; raise target.timeout_s or lower target.runs")})
        except AgentDown as e:
            return target.model_copy(update={"status": "waiting", "agent": url, "attempts": attempts, "reason": (
                f"{url}: {redact.scrub(str(e))}; tried {attempts} time(s), measured when an agent answers")})
        except Refused as e:
            return target.model_copy(update={"status": "failed", "agent": url, "attempts": attempts,
                                             "reason": redact.scrub(str(e))})
        finally:
            self.free.put(url)
        device = reply.get("device") if isinstance(reply.get("device"), dict) else {}
        return target.model_copy(update={"status": "measured", "p50_ms": round(float(reply["p50_ms"]), 4),
                                         "p90_ms": round(float(reply["p90_ms"]), 4), "agent": url, "reason": None,
                                         "device": redact.scrub(device_line(device))[:300], "attempts": attempts})

    def prepare(self, candidate: Candidate, graph: bytes) -> Candidate:
        """Called as a candidate's measurement ends: keeps its graph until the agent has measured it, and measures a
        would-be best at once when a target latency budget decides whether it may be promoted."""
        target = candidate.result.target if candidate.result else None
        if target is None or target.status != "waiting" or not graph:
            return candidate
        if self.budget_ms is not None and candidate.is_best:
            candidate = with_target(candidate, self.measure(graph, target), self.budget_ms)
            if candidate.result.target.status != "waiting":
                return candidate
        path = self._path(candidate.iteration)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(graph)
        os.replace(tmp, path)
        return candidate

    def submit(self, candidate: Candidate) -> None:
        """Queue a written candidate whose target latency is waiting."""
        target = candidate.result.target if candidate.result else None
        if target is not None and target.status == "waiting":
            self._queue(candidate.iteration, time.monotonic())

    def resume(self, archive) -> int:
        """Queue what earlier sessions left waiting; returns how many."""
        waiting = archive.waiting_for_target()
        for iteration in waiting:
            self._queue(iteration, time.monotonic())
        return len(waiting)

    def close(self, drain: bool) -> int:
        """Stop the agents' threads, first measuring what waits (`drain`, until an agent fails); returns how many
        graphs still wait (measured in a later session or with `edgenas targets RUN_DIR --measure`)."""
        with self.changed:
            self.draining, self.stopping = drain, not drain
            self.changed.notify_all()
        for thread in self.threads:
            thread.join(None if drain else 1.0)
        with self.changed:
            return len(self.due)

    def _path(self, iteration: int) -> Path:
        return self.dir / f"{iteration:05d}.onnx"

    def _queue(self, iteration: int, when: float) -> None:
        with self.changed:
            heapq.heappush(self.due, (when, iteration))
            self.changed.notify()

    def _next(self) -> int | None:
        with self.changed:
            while True:
                if self.stopping or (self.draining and not self.due):
                    return None
                wait = self.due[0][0] - time.monotonic() if self.due else None
                if self.due and (wait <= 0 or self.draining):
                    return heapq.heappop(self.due)[1]
                self.changed.wait(wait)

    def _serve(self) -> None:
        """One agent's thread: its own archive connection, the loop's is not shared across threads."""
        from edgenas.archive import Archive

        archive = Archive(self.run_dir)
        try:
            while (iteration := self._next()) is not None:
                try:
                    done = self._one(archive, iteration)
                except Exception as e:  # noqa: BLE001 - a busy archive, an unreadable file: this graph waits on
                    done = False
                    print(f"warning: target latency of iteration {iteration}: {type(e).__name__}: "
                          f"{redact.scrub(str(e))[:200]}", file=sys.stderr)
                if done:
                    continue
                with self.changed:
                    heapq.heappush(self.due, (time.monotonic() + self.cfg.retry_s, iteration))
                    self.stopping = self.stopping or self.draining  # the agent is down: what waits, waits for later
        finally:
            archive.close()

    def _one(self, archive, iteration: int) -> bool:
        """Measure one waiting graph and write the result; False when it still waits."""
        candidate = archive.get(iteration)
        target = candidate.result.target if candidate and candidate.result else None
        if target is None or target.status != "waiting":
            return True
        path = self._path(iteration)
        target = (self.measure(path.read_bytes(), target) if path.is_file() else target.model_copy(
            update={"status": "failed", "reason": f"its graph is gone ({path} was deleted)"}))
        archive.revise(with_target(candidate, target, self.budget_ms))
        if target.status == "waiting":
            return False
        path.unlink(missing_ok=True)
        return True


def measure_waiting(config: Config, run_dir: str | Path) -> tuple[int, int]:
    """Send what a run left waiting to the agents of config.target now -> (queued, still waiting). Writes the
    archive: not while a search runs on the same directory."""
    from edgenas.archive import Archive

    token = read_token(config.target)
    archive = Archive(run_dir)
    try:
        targets = Targets(config, run_dir, token)
        queued = targets.resume(archive)
        return queued, targets.close(drain=True)
    finally:
        archive.close()
