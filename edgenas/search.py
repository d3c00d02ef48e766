"""A search session: run directory (new or resumed), evaluator, proposer, then the loop with a live display."""

from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime
from pathlib import Path

from edgenas import loop, redact, target
from edgenas.archive import Archive
from edgenas.config import Config, ConfigError, dump_config, load_config
from edgenas.llm.base import Sampling
from edgenas.prompts import Task
from exporters.card import environment

NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver sees: counted without importing torch

# Keys that may change when a run is resumed: how long it goes on, never what a candidate is measured against.
RESUMABLE = {"search.iterations", "search.max_wall_s", "search.patience", "search.target_accuracy",
             "search.max_llm_errors", "llm.cache", "llm.cache_dir", "search.workers", "search.executor", "ray.address",
             "ray.cpus_per_worker", "ray.gpus_per_worker", "search.report_every", "target.url", "target.token_file",
             "target.timeout_s", "target.retry_s"}


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Config, given: Config) -> dict[str, tuple]:
    """{dotted key: (saved, given)} for every value that differs, other than those a resume may change."""
    old, new = _flat(saved.model_dump(mode="json")), _flat(given.model_dump(mode="json"))
    # an agent may move, but agent and local latencies are not comparable: target.url may not come or go
    fixed = {"target.url"} if (old.get("target.url") is None) != (new.get("target.url") is None) else set()
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if (key not in RESUMABLE or key in fixed) and old.get(key) != new.get(key)}


def resolve(config_file, overrides: list[str], run_dir) -> tuple[Config, Path, bool]:
    """(config, run dir, resuming). A run directory that holds an archive is resumed, with its saved config or with
    the command line that started it: the saved config already holds that line's overrides, so compare the results."""
    if run_dir and Archive.exists(run_dir):
        saved_file = Path(run_dir) / "config.yaml"
        config = load_config(config_file or saved_file, overrides)
        changed = config_changes(load_config(saved_file), config)
        if changed:
            shown = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in list(changed.items())[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"{run_dir} was started with a different config: {shown}{more}; a resume may change "
                              f"only {', '.join(sorted(RESUMABLE))} (use a new --run-dir for a different config)")
        return config, Path(run_dir), True
    if not config_file:
        raise ConfigError("--config is required to start a new search (or pass --run-dir of an existing run to resume)")
    config = load_config(config_file, overrides)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return config, Path(run_dir or f"runs/{config.dataset.name}-{stamp}"), False


def make_proposer(config: Config, task: Task, cache_path: str | None):
    from edgenas.propose import LLMProposer, MutationProposer

    gen, imp = config.llm.generator, config.llm.improver
    if gen.backend == "mutate":
        return MutationProposer(config.search.seed)
    from edgenas.llm import make_chat_model

    generator = make_chat_model(gen, cache_path)
    improver = generator if imp == gen else make_chat_model(imp, cache_path)
    sampling = [Sampling(c.temperature, c.top_p, c.max_tokens) for c in (gen, imp)]
    return LLMProposer(generator, improver, *sampling, task=task, use_improver=config.search.use_improver,
                       use_reference=config.search.use_reference, seed=config.search.seed)


def task_of(config: Config, info: dict) -> Task:
    t = config.train
    proxy = f"{t.epochs:g} epoch(s) of SGD, lr {t.lr:g}, momentum {t.momentum:g}, batch {t.batch_size}"
    target = config.target
    on_target = f"{target.precision}, batch {target.batch}, {target.threads} thread(s)" if target else ""
    return Task(info["dataset"], info["num_classes"], tuple(info["in_shape"]), config.budget, proxy, on_target)


def cache_path(config: Config) -> str | None:
    if not config.llm.cache:
        return None
    from edgenas.data import cache_root

    root = Path(config.llm.cache_dir) if config.llm.cache_dir else cache_root(config.dataset)
    root.mkdir(parents=True, exist_ok=True)
    return str(root / "llm-replies.sqlite")


def placements(workers: int, device: str) -> list[dict]:
    """Where each evaluation slot runs: its own share of this process's cores and, on GPUs, the visible GPUs in
    turn. One slot keeps the whole machine, as the serial loop does."""
    if workers == 1:
        return [{}]
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // workers)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len(os.listdir(NVIDIA_GPUS)) if device != "cpu" and os.path.isdir(NVIDIA_GPUS) else 0
    gpus = ([g for g in visible.split(",") if g.strip()] if visible is not None else list(map(str, range(count))))
    gpus = gpus if count else []
    return [{"cpus": cores[(i * share) % len(cores):][:share], "gpu": gpus[i % len(gpus)] if gpus else None}
            for i in range(workers)]


def write_report(run_dir: Path, live: bool, console) -> None:
    """RUN_DIR/report.html, for a browser left open on it (it reloads itself while `live`). A report that cannot be
    written is a warning: the search goes on."""
    from edgenas import html_report

    try:
        html_report.write([run_dir], run_dir / "report.html", live)
    except Exception as e:  # noqa: BLE001 - the search matters more than its page
        console.print(f"warning: the report was not written ({type(e).__name__}: {redact.scrub(str(e))[:200]})",
                      highlight=False, markup=False)


def parent_chooser(config: Config):
    """search.parent front: each change goes to a program of the accuracy-size front within the budgets."""
    if config.search.parent != "front":
        return None
    from edgenas import pareto

    return lambda archive, draw: pareto.parent_from_front(archive.all(), config.budget, draw)


def start_evaluators(config: Config, stack: contextlib.ExitStack) -> list:
    """search.workers evaluators, launched from this thread (their processes live as long as it does) and loading
    their data side by side, or as Ray actors over a cluster; closed with `stack`."""
    if config.search.executor == "ray":
        from edgenas import ray_executor

        return ray_executor.start(config, stack)
    from edgenas.evaluate import Evaluator

    evaluators = [stack.enter_context(contextlib.closing(Evaluator(config, **where)))
                  for where in placements(config.search.workers, config.eval.device)]
    for evaluator in evaluators:
        evaluator.launch()
    for evaluator in evaluators:
        evaluator.ready()
    return evaluators


@contextlib.contextmanager
def agents(config: Config, run_dir: Path, token: str | None, archive, console):
    """The device agents' side of a session (None without target.url): what an earlier session left waiting is
    queued first; at a normal end what still waits is measured, an interrupted session leaves it for the next."""
    if token is None:
        yield None
        return
    say = lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    for url in config.target.urls:
        problem = target.health(url)
        if problem:
            say(f"warning: the device agent at {url} does not answer ({problem}); the search goes on and its "
                f"candidates' target latency is measured when it does")
    targets = target.Targets(config, run_dir, token)
    waiting = targets.resume(archive)
    if waiting:
        say(f"{waiting} candidate(s) of earlier sessions wait for their target latency: queued")
    try:
        yield targets
    except BaseException:
        targets.close(drain=False)
        raise
    waiting = len(archive.waiting_for_target())
    if waiting:
        say(f"measuring the target latency of {waiting} candidate(s) still waiting")
    left = targets.close(drain=True)
    if left:
        say(f"{left} candidate(s) still wait for their target latency (no agent answered): it is measured in the "
            f"next session, or now with: edgenas targets {run_dir} --measure")


def run_search(config: Config, run_dir: Path, resuming: bool, seed_program: str | None = None, console=None) -> dict:
    """Start the evaluators and the proposer, then open the run directory: a bad data path or model fails before
    anything is written, so no half-made run blocks the corrected command. `search.max_wall_s` counts every session."""
    redact.register([config.llm.generator.api_key_env, config.llm.improver.api_key_env])
    token = target.read_token(config.target) if config.target and config.target.urls else None
    with contextlib.ExitStack() as stack:
        evaluators = start_evaluators(config, stack)
        proposer = make_proposer(config, task_of(config, evaluators[0].info), cache_path(config))
        proposer.check()  # endpoint, model, key: one line now rather than a run of failed iterations
        archive = Archive(run_dir)
        try:
            limit, spent = config.search.max_wall_s, archive.seconds_spent()
            left = None if limit is None else max(limit - spent, 0.0)
            cfg = config.search.model_copy(update={"max_wall_s": left})
            (run_dir / "config.yaml").write_text(redact.scrub(dump_config(config)))
            archive.event("resume" if resuming else "start", iteration=archive.next_iteration(),
                          workers=[e.where for e in evaluators], environment=environment())
            with Display(console, config.search, archive, agents=bool(token)) as display:
                def on_iteration(candidate, archive):
                    display.update(candidate, archive)
                    every = config.search.report_every
                    if every and archive.stats()["iterations"] % every == 0:
                        write_report(run_dir, live=True, console=display.console)

                seed = seed_program if not resuming else None
                try:
                    with agents(config, run_dir, token, archive, display.console) as targets:
                        reason = loop.run(archive, proposer, evaluators, cfg, seed, on_iteration,
                                          parent_chooser(config), targets)
                finally:  # however the session ends, the page stops reloading
                    write_report(run_dir, live=False, console=display.console)
            if limit is not None and spent and reason.startswith("reached the wall-time limit"):
                reason = f"reached the wall-time limit of {limit:g} s ({spent:.0f} s of it in earlier sessions)"
            best = archive.best()
            return {"run_dir": str(run_dir), "reason": reason, **archive.stats(),
                    "best_iteration": best.iteration if best else None,
                    "best_val_accuracy": best.val_accuracy if best else None}
        finally:
            archive.close()


class Display:
    """Live progress: iteration, best accuracy, last outcome, valid rate, tokens, throughput and how busy the LLM
    and the evaluation slots were this session."""

    def __init__(self, console, search, archive, agents: bool = False):
        """`agents`: the run sends graphs to device agents, so the line counts those still waiting."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.search, self.agents = search, agents
        self.done, self.llm_s, self.eval_s = 0, 0.0, 0.0
        self.started = time.monotonic()
        self.progress = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task(self._describe(archive), total=search.iterations,
                                           completed=archive.stats()["iterations"])

    def _describe(self, archive) -> str:
        best, stats = archive.best(), archive.stats()
        best_text = f"best {best.val_accuracy:.2%} (it {best.iteration})" if best else "best -"
        hours = max(time.monotonic() - self.started, 1e-9) / 3600
        pace = (f" | {self.done / hours:.0f} it/h, LLM {self.llm_s / 3600 / hours / self.search.chains:.0%} and "
                f"evaluators {self.eval_s / 3600 / hours / self.search.workers:.0%} busy") if self.done else ""
        n, w = len(archive.pending()), self.search.workers  # measured or waiting for a worker
        measuring = f" | workers {min(n, w)}/{w} busy" + (f", {n - w} waiting" if n > w else "") if w > 1 else ""
        waiting = len(archive.waiting_for_target()) if self.agents else 0  # graphs the agents have not measured
        on_device = f" | {waiting} waiting for the device" if waiting else ""
        return f"{best_text} | valid {stats['valid_rate']:.0%} | tokens {stats['tokens']:,}{pace}{measuring}{on_device}"

    def update(self, candidate, archive) -> None:
        self.done, self.llm_s, self.eval_s = self.done + 1, self.llm_s + candidate.llm_seconds, self.eval_s + candidate.eval_seconds
        last = candidate.outcome.render() if candidate.status == "ok" else f"{candidate.status}: {candidate.outcome.kind}"
        mark = " *new best*" if candidate.is_best else ""
        chain = f" chain {candidate.chain}" if self.search.chains > 1 else ""
        elapsed = time.monotonic() - self.started
        last = redact.scrub(last)[:110]  # scrub first: a clipped secret is still a secret
        self.console.print(f"[{elapsed:7.1f}s] it {candidate.iteration:4d}{chain}  {last}{mark}", highlight=False,
                           markup=False)
        self.progress.update(self.task, completed=archive.stats()["iterations"], description=self._describe(archive))

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
