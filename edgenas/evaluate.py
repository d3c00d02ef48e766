"""The host's handle on evaluation: static checks here, everything else in the sandboxed worker.

No torch in this module: the search loop and the CLI stay light, and a broken candidate costs
milliseconds when the static checks catch it.
"""

from __future__ import annotations

import signal
import time

from edgenas.candidate import check_source
from edgenas.config import Config
from edgenas.records import EvalResult, FailureKind, Status, failed
from edgenas.sandbox import Limits, Sandbox


class Evaluator:
    """Evaluates candidate programs against one dataset and config; one warm sandbox for all of them."""

    def __init__(self, config: Config):
        self.config = config
        self.sandbox = Sandbox("edgenas.stages:Worker", {"config": config.model_dump(mode="json")})
        self.info: dict = {}

    def start(self) -> dict:
        """Start the worker and load the data; raises SandboxError with a one-line reason."""
        self.info = self.sandbox.start()
        return self.info

    def limits(self) -> Limits:
        ev = self.config.eval
        return Limits(timeout_s=ev.timeout_s, memory_limit_mb=ev.memory_limit_mb,
                      output_limit_bytes=ev.output_limit_bytes, network_isolation=ev.network_isolation,
                      cap_address_space=self.info.get("device", "cpu") == "cpu")

    def evaluate(self, code: str, stages: tuple[str, ...] | None = None) -> EvalResult:
        """Run every stage (or only `stages`, e.g. build/forward/profile) on one program."""
        if not self.info:
            self.start()
        start = time.perf_counter()
        base = {"device": self.info["device"], "dataset": self.info["dataset"]}
        problem = check_source(code)
        if problem:
            return EvalResult(status=Status.failed, failure=problem, stage="static",
                              stage_seconds={"static": round(time.perf_counter() - start, 4)}, **base)
        static_s = round(time.perf_counter() - start, 4)
        job = {"code": code, **({"stages": list(stages)} if stages else {})}
        reply = self.sandbox.run(job, self.limits())
        return to_record(reply, base, static_s, self.config.eval.timeout_s)

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()


def to_record(reply: dict, base: dict, static_s: float, timeout_s: float) -> EvalResult:
    """The child's reply -> a validated record; a missing or malformed result becomes a failure."""
    tail = (reply.get("output_tail") or "")[-1000:]
    stage = reply.get("stage")
    result = reply.get("result")
    if isinstance(result, dict) and not reply.get("timed_out"):
        result = {**result, "output_tail": tail}
        result["stage_seconds"] = {"static": static_s, **result.get("stage_seconds", {})}
        try:
            return EvalResult.model_validate(result)
        except Exception as e:  # noqa: BLE001 - a forged or broken reply is not trusted
            return failed(FailureKind.crashed, f"the worker sent an invalid result ({str(e).splitlines()[0]})", stage=stage, output_tail=tail, **base)
    during = f" during {stage}" if stage else ""
    if reply.get("timed_out"):
        return failed(FailureKind.timeout, f"the candidate exceeded the {timeout_s:.0f} s time limit{during}; make it smaller or remove loops that never end", stage=stage, output_tail=tail, **base)
    sig = reply.get("signal")
    if sig == signal.SIGKILL:
        return failed(FailureKind.oom, f"the candidate process was killed{during}, most likely for using too much memory", stage=stage, output_tail=tail, **base)
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return failed(FailureKind.crashed, f"the candidate process died with {name}{during}", stage=stage, output_tail=tail, **base)
    if reply.get("zygote_lost"):
        return failed(FailureKind.crashed, "the evaluation worker died; the candidate was not measured", stage=stage, **base)
    error = (reply.get("error") or "").strip().splitlines()
    detail = f": {error[-1]}" if error else f" (exit code {reply.get('exit_code')}); a model module must not exit the process"
    return failed(FailureKind.crashed, f"the candidate process ended without a result{during}{detail}", stage=stage, output_tail=tail, **base)

