"""The trusted worker: holds the validation split, runs each candidate in the jail, measures what comes back.

    host (no torch) --frames--> this process (our code only; validation images and labels)
                                  └─ jail zygote (training images only) ─> one jailed job per candidate

The job hands back ONNX graphs; every number in the record (params, MACs, memory, validation accuracy and loss,
latency) is computed here by edgenas/referee.py, on data the job never had. What the job says about itself is
validated (edgenas/sandbox/messages.py) and used only for diagnostics. The budgets are checked on the untrained
graph while the job goes on training, and the job is stopped as soon as one is exceeded. With a `target` section the
checked trained graph (INT8 when asked) is measured here with the target's settings, or handed back for the host to
send to a device agent (edgenas/target.py); the jail is never told about the target.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

from edgenas import referee, target
from edgenas.config import BudgetConfig, Config
from edgenas.records import FailureKind, TargetLatency
from edgenas.sandbox import jail, messages, wire
from edgenas.sandbox.zygote import JailClient, Limits
from exporters import bench


def limits_of(config: Config, device: str = "cpu") -> Limits:
    ev = config.eval
    return Limits(timeout_s=ev.timeout_s, memory_limit_mb=ev.memory_limit_mb if device == "cpu" else None,
                  output_limit_bytes=ev.output_limit_bytes, disk_limit_mb=ev.disk_limit_mb, max_files=ev.max_files,
                  allow_unconfined=ev.allow_unconfined)


def budget_problem(stats: referee.GraphStats, budget: BudgetConfig, batch_size: int) -> str | None:
    memory = stats.training_memory_bytes(batch_size)
    if budget.max_params and stats.params > budget.max_params:
        return f"{stats.params:,} parameters exceed the budget of {budget.max_params:,}"
    if budget.max_macs and stats.macs > budget.max_macs:
        return f"{stats.macs:,} MACs exceed the budget of {budget.max_macs:,}"
    if budget.max_memory_mb and memory > budget.max_memory_mb * 2**20:
        return (f"one training step at batch {batch_size} needs about {memory / 2**20:.0f} MiB (weights, gradients, "
                f"momentum and activations), over the budget of {budget.max_memory_mb:.0f} MiB")
    return None


def exit_failure(report: dict, stage: str | None, timeout_s: float) -> tuple[FailureKind, str]:
    """A job that ended without a result -> (kind, diagnostic), from what the zygote saw."""
    during = f" during {stage}" if stage else ""
    if report.get("zygote_lost"):
        return FailureKind.crashed, "the evaluation worker died; the candidate was not measured"
    if report.get("setup_error"):
        return FailureKind.crashed, f"the sandbox could not be set up: {report['setup_error']}"
    if report.get("timed_out"):
        return FailureKind.timeout, f"the candidate exceeded the {timeout_s:.0f} s time limit{during}; make it smaller or remove loops that never end"
    if report.get("output_flood"):
        return FailureKind.runtime, "the model printed more output than allowed; remove print() calls from forward"
    if report.get("protocol_error"):
        return FailureKind.crashed, f"the candidate process broke the result channel ({report['protocol_error']})"
    sig = report.get("signal")
    if sig == signal.SIGKILL:
        return FailureKind.oom, f"the candidate process was killed{during}, most likely for using too much memory"
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return FailureKind.crashed, f"the candidate process died with {name}{during}"
    return FailureKind.crashed, (f"the candidate process ended without a result{during} (exit code "
                                 f"{report.get('exit_code')}); a model module must not exit the process")


class TrustedWorker:
    """Evaluates candidates for one config: the jail trains, this process measures."""

    def __init__(self, init: dict):
        from edgenas.data import load_data

        self.config = Config.model_validate(init["config"])
        if init.get("cpus"):  # this evaluation slot's share of the cores: the jail and the measurements inherit it
            os.sched_setaffinity(0, init["cpus"])
        val = load_data(self.config.dataset, parts=("val",)).val
        self.val_images, self.val_labels = val.images.numpy(), val.labels.numpy()
        # the jail never learns where the target is or where its token lies (nor the budget that needs a target)
        jailed = {key: value for key, value in init["config"].items() if key != "target"}
        jailed["budget"] = {**jailed["budget"], "max_target_latency_ms": None}
        self.jail = JailClient("edgenas.sandbox.inside:ProxyJob", {"config": jailed}, limits_of(self.config))
        self.info = self.jail.start()
        if self.info["device"] != "cpu":  # the memory cap of a CUDA job is its memory fraction, set inside
            self.jail.limits = limits_of(self.config, self.info["device"])
        self.mean, self.std = self.info["mean"], self.info["std"]
        self.probe = referee.normalize(self.val_images[:1], self.mean, self.std)  # the shape probe: a real image
        self.cores = len(os.sched_getaffinity(0))
        # graphs are hostile data too: whatever one makes onnxruntime allocate here stays under the candidate's cap
        # (a soft limit: a jail zygote started from here later lifts it for itself)
        self.memory_bytes = self.config.eval.memory_limit_mb << 20
        jail.cap_address_space(self.memory_bytes + referee.SCORE_CAP_BYTES, soft_only=True)
        if self.config.target is not None and self.config.target.precision == "int8":
            import exporters.quantize  # noqa: F401 - onnxruntime's quantiser loads now, not during the first candidate
        self.device = target.device_line(bench.device())  # what a local target latency is measured on

    def describe(self) -> dict:
        return {**self.info, "val_images": len(self.val_labels)}

    def evaluate(self, code: str, stages: list[str] | None = None, run: int = 0) -> tuple[dict, bytes]:
        """One candidate -> (record fields, trained ONNX graph or b""); run k > 0 trains with seed train.seed + k."""
        seed = self.config.train.seed + run
        out = {"device": self.info["device"], "dataset": self.info["dataset"], "seed": seed, "stage_seconds": {}}
        state = {"stage": None, "since": time.perf_counter(), "failure": None, "result": None, "graph": b"",
                 "graphs": set()}

        def tick(stage: str | None) -> None:
            now = time.perf_counter()
            if state["stage"]:
                out["stage_seconds"][state["stage"]] = round(now - state["since"], 4)
            state["stage"], state["since"] = stage, now

        def on_message(header: dict, payload: bytes):
            if state["failure"]:
                return "cancel"
            try:
                message = messages.parse(header)
                if isinstance(message, messages.Graph) and message.trained in state["graphs"]:
                    raise ValueError("the job sent a second graph of the same kind")  # each costs trusted work
                if isinstance(message, messages.Result | messages.Error) and state["result"] is not None:
                    raise ValueError("the job sent a second result")
            except ValueError as e:
                state["failure"], state["failed_stage"] = (FailureKind.crashed, str(e)), state["stage"]
                return "cancel"
            if isinstance(message, messages.Stage):
                tick(message.stage)
            elif isinstance(message, messages.Graph):
                state["graphs"].add(message.trained)
            if isinstance(message, messages.Graph) and not message.trained:
                problem = self._measure(payload, out)
                if problem:
                    state["failure"], state["failed_stage"] = problem, "profile"
                    return "cancel"
            elif isinstance(message, messages.Graph):
                state["graph"] = payload
            elif isinstance(message, messages.Result | messages.Error):
                state["result"] = message
            return None

        report = self.jail.run({"code": code, "stages": stages, "seed": seed}, on_message)
        stage = state["stage"]
        tick(None)
        out.update(isolation=report.get("isolation", []), output_tail=report.get("output_tail", "")[-1000:],
                   memory_cap_bytes=report.get("memory_cap_bytes"), memory_cap_source=(
                       None if report.get("memory_cap_bytes") is None else
                       "inherited limit" if report.get("memory_cap_inherited") else "eval.memory_limit_mb"))
        result = state["result"]
        if state["failure"]:
            return self._failed(out, *state["failure"], stage=state["failed_stage"]), b""
        if isinstance(result, messages.Result) and result.status == "failed":
            return self._failed(out, result.failure.kind, result.failure.message, stage=result.stage), b""
        if not isinstance(result, messages.Result):
            error = result.message.strip().splitlines()[-1] if isinstance(result, messages.Error) else None
            kind, message = exit_failure(report, stage, self.config.eval.timeout_s)
            if error and kind is FailureKind.crashed and not report.get("setup_error"):
                message = f"the candidate process ended without a result during {stage}: {error}"
            return self._failed(out, kind, message, stage=stage), b""
        if "params" not in out:
            return self._failed(out, FailureKind.crashed, "the candidate reported success without a graph", stage=stage), b""
        out["constructor"] = result.constructor
        if stages and "train" not in stages:  # a profile-only run: measured on the untrained graph
            return {**out, "status": "ok", "stage": result.stage}, b""
        if not state["graph"]:
            return self._failed(out, FailureKind.crashed, "the candidate reported success without a trained graph", stage="train"), b""
        out.update(train_loss_first=result.train_loss_first, train_loss_last=result.train_loss_last,
                   train_seconds=result.train_seconds, train_images=result.train_images)
        problem = self._measure(state["graph"], out) or self._score(state["graph"], out)
        if problem:
            return self._failed(out, *problem, stage="validate"), b""
        out["artifact_sha256"] = hashlib.sha256(state["graph"]).hexdigest()
        if self.config.target is None or run > 0:  # a re-run checks the accuracy; its latency is the first run's
            return {**out, "status": "ok", "stage": "latency"}, b""
        graph = self._target(out)
        budget_ms = self.config.budget.max_target_latency_ms
        over = target.over_budget(TargetLatency.model_validate(out["target"]), budget_ms)
        if over:
            return self._failed(out, FailureKind.budget, over, stage="target"), b""
        return {**out, "status": "ok", "stage": "target"}, graph

    def _measure(self, graph: bytes, out: dict) -> tuple[FailureKind, str] | None:
        """Params, MACs and the training-memory estimate from a graph, then the budgets."""
        try:
            model = referee.load(graph, tuple(self.info["in_shape"]), self.info["num_classes"])
            stats = referee.inspect(model, self.probe, max_bytes=self.memory_bytes,
                                    deadline=time.monotonic() + self.config.eval.timeout_s)
        except referee.TooSlow as e:
            return FailureKind.timeout, str(e)
        except referee.GraphError as e:
            return FailureKind.export, str(e)
        self._model = model  # the checked graph: what a target is sent
        out.update(params=stats.params, weight_bytes=stats.weight_bytes, macs=stats.macs,
                   macs_uncounted_ops=dict(stats.macs_uncounted_ops),
                   peak_memory_bytes=stats.training_memory_bytes(self.config.train.batch_size))
        self._stats = stats
        problem = budget_problem(stats, self.config.budget, self.config.train.batch_size)
        return (FailureKind.budget, problem) if problem else None

    def _score(self, graph: bytes, out: dict) -> tuple[FailureKind, str] | None:
        """Validation accuracy and loss with every core, then batch-1 latency on `eval.latency_threads`."""
        ev = self.config.eval
        deadline = time.monotonic() + ev.timeout_s  # the graph gets as long to be measured as the job had to train
        try:
            start = time.perf_counter()
            session = referee.session(graph, self.cores)
            batch = referee.score_batch(self._stats)
            out["val_accuracy"], out["val_loss"] = referee.score(session, self.val_images, self.val_labels,
                                                                 self.mean, self.std, batch, deadline)
            out["stage_seconds"]["validate"] = round(time.perf_counter() - start, 4)
            start = time.perf_counter()
            out["latency_ms"] = round(referee.latency_ms(referee.session(graph, ev.latency_threads), self.probe,
                                                         runs=ev.latency_runs, warmup=5, deadline=deadline), 4)
            out["stage_seconds"]["latency"] = round(time.perf_counter() - start, 4)
        except referee.TooSlow as e:
            return FailureKind.timeout, str(e)
        except referee.GraphError as e:
            return FailureKind.nan if "NaN" in str(e) else FailureKind.export, str(e)
        return None

    def _target(self, out: dict) -> bytes:
        """The graph for the deployment target: the referee's checked copy of the trained graph, INT8 when asked
        (calibrated on validation images: only its speed counts, never its accuracy). Measured here without
        target.url; otherwise returned, and the host sends it to an agent while the next candidate trains."""
        t = self.config.target
        settings = {"precision": t.precision, "threads": t.threads, "batch": t.batch}
        graph = self._model.SerializeToString()
        start = time.perf_counter()
        try:
            if t.precision == "int8":
                from exporters import quantize

                graph = quantize.quantize_int8_bytes(graph, referee.normalize(
                    self.val_images[:t.calibration_images], self.mean, self.std))
                out["stage_seconds"]["quantize"] = round(time.perf_counter() - start, 4)
                start = time.perf_counter()
            if t.urls:
                out["target"] = {"status": "waiting", "reason": "not sent to the agent yet", "agent": ", ".join(t.urls),
                                 **settings}
                return graph
            # what a device agent runs, with the same input, on this machine
            measured = bench.bench(graph, t.threads, t.runs, t.warmup, t.batch,
                                   deadline=time.monotonic() + self.config.eval.timeout_s)
            out["target"] = {"status": "measured", "p50_ms": round(measured["p50_ms"], 4),
                             "p90_ms": round(measured["p90_ms"], 4), "device": self.device, **settings}
        except Exception as e:  # noqa: BLE001 - quantisation or onnxruntime: the model does not run there as asked
            out["target"] = {"status": "failed", "reason": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                             **settings}
        out["stage_seconds"]["target"] = round(time.perf_counter() - start, 4)
        return b""

    @staticmethod
    def _failed(out: dict, kind: FailureKind, message: str, stage: str | None) -> dict:
        return {**out, "status": "failed", "stage": stage, "failure": {"kind": kind.value, "message": message[:4000]}}

    def close(self) -> None:
        self.jail.close()


def main() -> None:
    worker: TrustedWorker | None = None

    def handle(frame: wire.Frame, channel: wire.Channel) -> None:
        nonlocal worker
        if frame.kind == "init":
            try:
                worker = TrustedWorker(frame.header["init"])
            except Exception as e:  # noqa: BLE001 - one line for the host
                channel.send({"kind": "error", "message": str(e).splitlines()[0] if str(e) else type(e).__name__})
                return
            channel.send({"kind": "ready", "info": worker.describe()})
        elif frame.kind == "evaluate" and worker is not None:
            record, graph = worker.evaluate(frame.header["code"], frame.header.get("stages"),
                                           int(frame.header.get("run") or 0))
            channel.send({"kind": "record", "record": record}, graph)

    jail.die_with_parent()
    try:
        wire.serve(handle)
    finally:
        if worker is not None:
            worker.close()


if __name__ == "__main__":
    main()
