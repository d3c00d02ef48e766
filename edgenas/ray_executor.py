"""search.executor ray: the evaluation slots as Ray actors, each holding a warm evaluator (worker, jail and data) on
its own node of a cluster. The driver alone writes the archive. An actor whose node dies is restarted by Ray on a
live node and the candidate it was measuring runs again there: every iteration is still recorded exactly once.
"""

from __future__ import annotations

import contextlib
import sys
import time

import ray

from edgenas.config import Config
from edgenas.evaluate import STARTUP_TIMEOUT_S
from edgenas.records import EvalResult, FailureKind, failed
from edgenas.sandbox.zygote import SandboxError

RETRIES = 3  # a candidate whose worker (or node) died is measured again elsewhere up to this many times


class Slot:
    """One evaluation slot, inside a Ray actor process on some node."""

    def __init__(self, config: dict):
        from edgenas.evaluate import Evaluator

        self.evaluator = Evaluator(Config.model_validate(config))  # started in this actor's own main thread
        self.evaluator.start()

    def describe(self) -> dict:
        context = ray.get_runtime_context()
        return {**self.evaluator.info, "node": context.get_node_id(), "ip": ray.util.get_node_ip_address()}

    def evaluate(self, code: str, run: int) -> tuple[dict, bytes]:
        result = self.evaluator.evaluate(code, run=run)
        return result.model_dump(mode="json"), self.evaluator.last_graph


class RayEvaluator:
    """The driver's handle on one actor, with the evaluate() the search loop calls."""

    def __init__(self, actor, info: dict):
        self.actor, self.info = actor, info
        self.last_graph = b""  # the target graph of the last valid candidate (see Evaluator.last_graph)

    @property
    def where(self) -> dict:
        return {"node": self.info["node"], "ip": self.info["ip"]}

    def evaluate(self, code: str, run: int = 0) -> EvalResult:
        """Ray re-runs the task when the actor's process or node dies; while the actor restarts elsewhere (it loads
        its data again) it is unavailable: wait for it. Only a task lost more than RETRIES times is recorded."""
        deadline, lost = time.monotonic() + STARTUP_TIMEOUT_S, 0
        while True:
            try:
                record, self.last_graph = ray.get(self.actor.evaluate.remote(code, run))
                return EvalResult.model_validate(record)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    lost = RETRIES + 1
                time.sleep(1.0)
            except ray.exceptions.RayError:
                lost += 1
            if lost > RETRIES:
                self.last_graph = b""
                return failed(FailureKind.crashed, f"the Ray evaluation worker was lost {lost} times measuring it",
                              device=self.info["device"], dataset=self.info["dataset"])


def start(config: Config, stack: contextlib.ExitStack) -> list[RayEvaluator]:
    """search.workers actors spread over the cluster at ray.address (a local one when unset); shut down with
    `stack`."""
    rc = config.ray
    # Ray reports node events on stdout, which the command's result (--json) must have to itself
    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
    ray.init(address=rc.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             configure_logging=False)
    stack.callback(ray.shutdown)
    gpus = rc.gpus_per_worker if rc.gpus_per_worker is not None else float(config.eval.device == "cuda")
    actor = ray.remote(num_cpus=rc.cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=RETRIES)(Slot)
    actors = [actor.options(scheduling_strategy="SPREAD").remote(config.model_dump(mode="json"))
              for _ in range(config.search.workers)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayError as e:  # e.g. the data path does not exist on a node: one line, as locally
        raise SandboxError(f"a Ray evaluation worker could not start: {str(e.__cause__ or e).strip().splitlines()[-1]}") from None
    return [RayEvaluator(a, info) for a, info in zip(actors, infos, strict=True)]
