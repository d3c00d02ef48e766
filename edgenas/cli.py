"""The command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgenas.config import ConfigError, load_config

PROFILE_STAGES = ("build", "forward", "profile")


class UsageError(click.ClickException):
    """Bad usage, config or data: one line on stderr, exit code 2."""

    exit_code = 2


def _config(config_file, overrides):
    try:
        return load_config(config_file, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _read_program(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _run(config, code: str, stages=None):
    from edgenas.evaluate import Evaluator
    from edgenas.sandbox import SandboxError

    try:
        with Evaluator(config) as evaluator:
            return evaluator.evaluate(code, stages)
    except SandboxError as e:
        raise UsageError(str(e)) from None


def _print_result(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.model_dump(mode="json")))
        return
    from edgenas.report import result_table

    result_table(result)


@click.group()
@click.version_option(package_name="edgenas")
def main():
    """edgenas: LLM-driven architecture search for small image classifiers on edge devices."""


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "imagenette", "folder", "synthetic"]), help="Dataset to train and validate on.")
@click.option("--data-root", type=click.Path(), help="Where the dataset lives (folder datasets: <root>/<split>/<class>/<image>).")
@click.option("--train-subset", type=int, help="Train on only N images (the validation split stays the same).")
@click.option("--val-size", type=int, help="Images held out from train for validation (default 5000).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--timeout", type=float, help="Wall-clock limit for the candidate, seconds.")
@click.option("--max-params", type=int)
@click.option("--max-macs", type=int)
@click.option("--max-memory-mb", type=float)
@click.option("--config", "config_file", type=click.Path(), help="YAML config; flags override it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. train.lr=0.05.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def evaluate(file, dataset, data_root, train_subset, val_size, device, timeout, max_params, max_macs, max_memory_mb,
             config_file, overrides, as_json):
    """Evaluate one candidate program: static checks, build, profile, one-epoch proxy training, validation."""
    flags = {"dataset.name": dataset, "dataset.root": data_root, "dataset.train_subset": train_subset,
             "dataset.val_size": val_size, "eval.device": device, "eval.timeout_s": timeout,
             "budget.max_params": max_params, "budget.max_macs": max_macs, "budget.max_memory_mb": max_memory_mb}
    config = _config(config_file, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)])
    _print_result(_run(config, _read_program(file)), as_json)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--in-shape", default="3,32,32", show_default=True, help="C,H,W of one input image.")
@click.option("--num-classes", default=10, show_default=True, type=click.IntRange(min=2))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1), help="Batch of the measured training step.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def profile(file, in_shape, num_classes, batch_size, device, as_json):
    """Parameters, MACs and training-step memory of a candidate: no data, no training."""
    try:
        shape = [int(v) for v in in_shape.split(",")]
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise UsageError(f"--in-shape expects C,H,W such as 3,32,32, got {in_shape!r}") from None
    config = _config(None, [
        "dataset.name=synthetic", f"dataset.in_shape={shape}", f"dataset.num_classes={num_classes}",
        f"dataset.synthetic_size={batch_size + 1}", "dataset.val_size=1", f"train.batch_size={batch_size}",
        f"eval.device={device}",
    ])
    _print_result(_run(config, _read_program(file), PROFILE_STAGES), as_json)


@main.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML config (configs/*.yaml); not needed to resume.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where the run lives; an existing run is resumed.")
@click.option("--iterations", type=click.IntRange(min=0), help="Total iterations of the run (search.iterations).")
@click.option("--seed-program", type=click.Path(exists=True, dir_okay=False), help="Evaluate this program first instead of asking the generator.")
@click.option("--no-cache", is_flag=True, help="Do not reuse cached LLM replies.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def search(config_file, overrides, run_dir, iterations, seed_program, no_cache, as_json):
    """Run (or resume) the closed-loop LLM architecture search."""
    from edgenas.archive import ArchiveError
    from edgenas.sandbox import SandboxError
    from edgenas.search import resolve, run_search

    extra = [*([f"search.iterations={iterations}"] if iterations is not None else []), *(["llm.cache=false"] if no_cache else [])]
    try:
        config, path, resuming = resolve(config_file, [*overrides, *extra], run_dir)
        summary = run_search(config, path, resuming, _read_program(seed_program) if seed_program else None)
    except (ConfigError, SandboxError, ArchiveError) as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; resume with: edgenas search --run-dir {path}") from None
    if as_json:
        click.echo(json.dumps(summary))
    else:
        best = summary["best_val_accuracy"]
        best_text = "-" if best is None else f"{best:.2%} (iteration {summary['best_iteration']})"
        click.echo(f"{summary['reason']}: {summary['iterations']} iterations, {summary['valid_rate']:.0%} valid, "
                   f"best {best_text}; run: {summary['run_dir']}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="A JSON array, one object per iteration.")
def show(run_dir, as_json):
    """List the candidates of a run."""
    from edgenas.archive import Archive, ArchiveError
    from edgenas.report import candidate_rows, candidates_table

    if not Archive.exists(run_dir):
        raise UsageError(f"{run_dir} holds no search archive (archive.sqlite)")
    try:
        archive = Archive(run_dir)
    except ArchiveError as e:
        raise UsageError(str(e)) from None
    rows = candidate_rows(archive.all())
    archive.close()
    if as_json:
        click.echo(json.dumps(rows))
    else:
        candidates_table(rows)


if __name__ == "__main__":
    sys.exit(main())
