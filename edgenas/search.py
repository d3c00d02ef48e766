"""A search session: run directory (new or resumed), evaluator, proposer, then the loop with a live display."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from edgenas import loop, redact
from edgenas.archive import Archive
from edgenas.config import Config, ConfigError, dump_config, load_config
from edgenas.llm.base import Sampling
from edgenas.prompts import Task


def resolve(config_file, overrides: list[str], run_dir) -> tuple[Config, Path, bool]:
    """(config, run dir, resuming). A run directory that holds an archive is resumed with its saved config."""
    if run_dir and Archive.exists(run_dir):
        saved = Path(run_dir) / "config.yaml"
        config = load_config(saved, overrides)
        if config_file and load_config(config_file).model_dump(exclude={"search"}) != config.model_dump(exclude={"search"}):
            raise ConfigError(f"{run_dir} was started with a different config; drop --config to resume it as it was")
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
    return Task(info["dataset"], info["num_classes"], tuple(info["in_shape"]), config.budget, proxy)


def cache_path(config: Config) -> str | None:
    if not config.llm.cache:
        return None
    from edgenas.data import cache_root

    root = Path(config.llm.cache_dir) if config.llm.cache_dir else cache_root(config.dataset)
    root.mkdir(parents=True, exist_ok=True)
    return str(root / "llm-replies.sqlite")


def run_search(config: Config, run_dir: Path, resuming: bool, seed_program: str | None = None, console=None) -> dict:
    from edgenas.evaluate import Evaluator

    redact.register([config.llm.generator.api_key_env, config.llm.improver.api_key_env])
    archive = Archive(run_dir)
    (run_dir / "config.yaml").write_text(redact.scrub(dump_config(config)))
    archive.event("resume" if resuming else "start", iteration=archive.next_iteration())
    display = Display(console, config.search.iterations, archive)
    try:
        with Evaluator(config) as evaluator:
            proposer = make_proposer(config, task_of(config, evaluator.info), cache_path(config))
            with display:
                reason = loop.run(archive, proposer, evaluator, config.search,
                                  seed_program if not resuming else None, display.update)
        best = archive.best()
        return {"run_dir": str(run_dir), "reason": reason, **archive.stats(),
                "best_iteration": best.iteration if best else None, "best_val_accuracy": best.val_accuracy if best else None}
    finally:
        archive.close()


class Display:
    """Live progress: iteration, best accuracy, last outcome, valid rate, tokens, elapsed."""

    def __init__(self, console, total: int, archive):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task(self._describe(archive), total=total, completed=archive.next_iteration())
        self.started = time.monotonic()

    @staticmethod
    def _describe(archive) -> str:
        best, stats = archive.best(), archive.stats()
        best_text = f"best {best.val_accuracy:.2%} (it {best.iteration})" if best else "best -"
        return f"{best_text} | valid {stats['valid_rate']:.0%} | tokens {stats['tokens']:,}"

    def update(self, candidate, archive) -> None:
        last = candidate.outcome.render() if candidate.status == "ok" else f"{candidate.status}: {candidate.outcome.kind}"
        mark = " *new best*" if candidate.is_best else ""
        elapsed = time.monotonic() - self.started
        last = redact.scrub(last)[:110]  # scrub first: a clipped secret is still a secret
        self.console.print(f"[{elapsed:7.1f}s] it {candidate.iteration:4d}  {last}{mark}", highlight=False, markup=False)
        self.progress.update(self.task, completed=candidate.iteration + 1, description=self._describe(archive))

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
