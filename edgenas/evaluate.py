"""The host's handle on evaluation: static checks here, everything else in the trusted worker and its jail.

No torch in this module: the search loop and the CLI stay light, and a broken candidate costs milliseconds
when the static checks catch it. What comes back is validated into a frozen record and scrubbed of secrets.
"""

from __future__ import annotations

import time

from edgenas import redact
from edgenas.candidate import check_source
from edgenas.config import Config
from edgenas.records import EvalResult, FailureKind, Status, failed
from edgenas.sandbox import wire
from edgenas.sandbox.zygote import SandboxError, clean_env

STARTUP_TIMEOUT_S = 900.0  # the first start decodes the dataset into the cache
MEASURE_MARGIN_S = 120.0  # start-up of a replaced jail and the messages, on top of the two time limits


class Evaluator:
    """Evaluates candidate programs against one dataset and config; one warm worker and jail for all of them."""

    def __init__(self, config: Config, cpus: list[int] | None = None, gpu: str | None = None):
        """`cpus`, `gpu`: where this evaluator's processes run (search.workers shares the machine out)."""
        self.config, self.cpus, self.gpu = config, cpus, gpu
        self.peer: wire.Peer | None = None
        self.info: dict = {}
        self.last_graph: bytes = b""  # the last valid candidate's graph for the device agent (target.url), or b""
        self.closed = False  # closed by its owner: a measurement still in flight must not start a new worker

    @property
    def where(self) -> dict:
        """Where it runs, for the run's event log."""
        return {"cpus": self.cpus, "gpu": self.gpu}

    def start(self) -> dict:
        """Start the worker and its jail and load the data; raises SandboxError with a one-line reason."""
        self.launch()
        return self.ready()

    def launch(self) -> None:
        """Start the worker process, which then loads its data. The worker dies with the thread that launched it
        (PR_SET_PDEATHSIG follows threads): launch from a thread that outlives the evaluator."""
        self._stop()
        self.closed = False
        env = clean_env() if self.gpu is None else {**clean_env(), "CUDA_VISIBLE_DEVICES": self.gpu}
        self.peer = wire.Peer("edgenas.worker", env)
        self.peer.send({"kind": "init", "init": {"config": self.config.model_dump(mode="json"), "cpus": self.cpus}})

    def ready(self) -> dict:
        """Wait until the launched worker is ready (any thread may wait)."""
        try:
            self.info = self.peer.ready(STARTUP_TIMEOUT_S)
        except wire.WireError as e:
            self._stop()
            raise SandboxError(redact.scrub(str(e))) from None
        return self.info

    def evaluate(self, code: str, stages: tuple[str, ...] | None = None, run: int = 0) -> EvalResult:
        """Run every stage (or only `stages`, e.g. build/forward/profile) on one program. Run k trains with seed
        train.seed + k: the same code and run give the same record, another run shows the seed-to-seed spread."""
        if not self.info:
            self.start()
        start = time.perf_counter()
        base = {"device": self.info["device"], "dataset": self.info["dataset"], "seed": self.config.train.seed + run}
        if self.closed:  # the search is stopping: this record is never written, the candidate stays pending
            return failed(FailureKind.crashed, "the evaluator was closed before this candidate was measured", **base)
        problem = check_source(code)
        static_s = round(time.perf_counter() - start, 4)
        if problem:
            return EvalResult(status=Status.failed, failure=problem, stage="static", stage_seconds={"static": static_s}, **base)
        self.peer.send({"kind": "evaluate", "code": code, "stages": list(stages) if stages else None, "run": run})
        # the job's time limit, then as long again for the trusted side to measure its graph (and for its target)
        stages_s = 3 if self.config.target is not None else 2
        reply = self.peer.receive(stages_s * self.config.eval.timeout_s + MEASURE_MARGIN_S)
        self.last_graph = b""
        if reply is None or reply.kind != "record":
            if not self.closed:
                self.start()
            return failed(FailureKind.crashed, "the evaluation worker died or hung; the candidate was not measured", **base)
        record = redact.scrub_data(reply.header["record"])
        record["stage_seconds"] = {"static": static_s, **record.get("stage_seconds", {})}
        try:
            result = EvalResult.model_validate(record)
        except ValueError as e:
            return failed(FailureKind.crashed, f"the worker sent an invalid record ({str(e).splitlines()[0]})", **base)
        self.last_graph = reply.payload if result.ok else b""
        return result

    def close(self) -> None:
        self.closed = True
        self._stop()

    def _stop(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
