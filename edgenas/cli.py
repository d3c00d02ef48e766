"""The command line: each command parses, calls one library function, prints (secrets scrubbed, see redact)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from edgenas import redact

# The config stack (YAML, pydantic) is imported by the commands that need it: `edgenas bench` runs on a device
# with only click, numpy and onnxruntime installed.
PROFILE_STAGES = ("build", "forward", "profile")


class CommandError(click.ClickException):
    """A failed command: one line on stderr, exit code 1. Messages can quote what a candidate or server said."""

    def __init__(self, message: str):
        super().__init__(redact.scrub(message))


class UsageError(CommandError):
    """Bad usage, config or data: one line on stderr, exit code 2."""

    exit_code = 2


class LLMFailedError(CommandError):
    """The LLM kept failing mid-run (search.max_llm_errors): one line on stderr, exit code 3; the run resumes."""

    exit_code = 3


def _echo(text: str, err: bool = False) -> None:
    click.echo(redact.scrub(text), err=err)


def _config(config_file, overrides):
    from edgenas.config import ConfigError, load_config

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
    from edgenas.sandbox.zygote import SandboxError

    try:
        with Evaluator(config) as evaluator:
            return evaluator.evaluate(code, stages)
    except SandboxError as e:
        raise UsageError(str(e)) from None


def _print_result(result, as_json: bool) -> None:
    if as_json:
        _echo(json.dumps(result.model_dump(mode="json")))
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
    """Evaluate one candidate program: static checks, build, profile, one-epoch proxy training, validation.

    Exits 0 when the candidate is valid, 1 when it failed (the record says why), 2 on bad usage, config or data.
    """
    flags = {"dataset.name": dataset, "dataset.root": data_root, "dataset.train_subset": train_subset,
             "dataset.val_size": val_size, "eval.device": device, "eval.timeout_s": timeout,
             "budget.max_params": max_params, "budget.max_macs": max_macs, "budget.max_memory_mb": max_memory_mb}
    config = _config(config_file, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None)])
    result = _run(config, _read_program(file))
    _print_result(result, as_json)
    if not result.ok:
        sys.exit(1)


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
    from edgenas.config import ConfigError
    from edgenas.llm.base import LLMSetupError
    from edgenas.loop import LLMUnavailable
    from edgenas.sandbox.zygote import SandboxError
    from edgenas.search import resolve, run_search

    extra = [*([f"search.iterations={iterations}"] if iterations is not None else []), *(["llm.cache=false"] if no_cache else [])]
    path = None
    try:
        config, path, resuming = resolve(config_file, [*overrides, *extra], run_dir)
        summary = run_search(config, path, resuming, _read_program(seed_program) if seed_program else None)
    except (ConfigError, SandboxError, ArchiveError, LLMSetupError) as e:
        raise UsageError(str(e)) from None
    except LLMUnavailable as e:
        raise LLMFailedError(f"{e}; once the LLM answers, resume with: edgenas search --run-dir {path}") from None
    except KeyboardInterrupt:
        raise CommandError(interrupted_message(path)) from None
    if as_json:
        _echo(json.dumps(summary))
    else:
        best = summary["best_val_accuracy"]
        best_text = "-" if best is None else f"{best:.2%} (iteration {summary['best_iteration']})"
        _echo(f"{summary['reason']}: {summary['iterations']} iterations, {summary['valid_rate']:.0%} valid, "
                   f"best {best_text}; run: {summary['run_dir']}")


def interrupted_message(run_dir) -> str:
    """The Ctrl-C hint names the real run directory, or says that nothing was written yet."""
    from edgenas.archive import Archive

    if run_dir is None or not Archive.exists(run_dir):
        return "interrupted before the run started; nothing was written (run the same command again)"
    return f"interrupted; resume with: edgenas search --run-dir {shlex.quote(str(run_dir))}"


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="A JSON array, one object per iteration.")
def show(run_dir, as_json):
    """List the candidates of a run."""
    from edgenas.report import candidate_rows, candidates_table

    archive = _open_archive(run_dir)
    rows = candidate_rows(archive.all())
    archive.close()
    if as_json:
        _echo(json.dumps(rows))
    else:
        candidates_table(rows)


def _open_archive(run_dir):
    from edgenas.archive import Archive, ArchiveError

    if not Archive.exists(run_dir):
        raise UsageError(f"{run_dir} holds no search archive (archive.sqlite)")
    try:
        return Archive(run_dir, readonly=True)
    except ArchiveError as e:
        raise UsageError(str(e)) from None


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The valid candidates with their front and crowding.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write accuracy vs params (front highlighted) as PNG.")
def pareto(run_dir, as_json, plot):
    """The Pareto front of a run: accuracy up; params, MACs, memory and latency down; budgets respected."""
    from edgenas import pareto as selector

    archive = _open_archive(run_dir)
    try:
        config = _config(f"{run_dir}/config.yaml", [])
        points = selector.front_of(archive.all(), config.budget)
    finally:
        archive.close()
    if plot:
        selector.plot(points, plot)
    rows = selector.to_rows(points)
    if as_json:
        _echo(json.dumps(rows))
    else:
        from edgenas.report import pareto_table

        pareto_table(rows)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="The HTML file (default: RUN_DIR/report.html for one run, report.html for several).")
def report(run_dirs, output):
    """One self-contained HTML report of a run (progress, failures, Pareto front, lineage, cost, finalized models);
    several runs side by side."""
    from edgenas.config import ConfigError

    for run_dir in run_dirs:
        _open_archive(run_dir).close()
    out = Path(output or (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else "report.html"))
    try:
        from edgenas import html_report

        html_report.write([Path(d) for d in run_dirs], out)
    except (ConfigError, OSError) as e:
        raise UsageError(f"cannot write the report: {e}") from None
    _echo(str(out))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1), help="How many Pareto-chosen candidates.")
@click.option("--candidates", "ids", help="Comma-separated iterations to finalize instead of --top.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds (test accuracy per seed).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override training keys, e.g. train.lr=0.1.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), help="Seconds each seed may take to train and "
              "export (default: a week).")
@click.option("--json", "as_json", is_flag=True, help="Print the model cards as a JSON array.")
def finalize(run_dir, top, ids, epochs, seeds, overrides, timeout_s, as_json):
    """Train the chosen candidates from scratch, test them, export fp32 and INT8 ONNX with model cards."""
    from edgenas.config import ConfigError
    from exporters.finalize import FinalizeError
    from exporters.finalize import finalize as run_finalize

    _open_archive(run_dir).close()
    try:
        id_list = [int(v) for v in ids.split(",")] if ids else None
        seed_list = tuple(int(v) for v in seeds.split(","))
    except ValueError:
        raise UsageError("--candidates and --seeds take comma-separated integers") from None

    def progress(iteration, p):
        _echo(f"candidate {iteration} seed {p['seed']}: epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.4f}", err=True)

    try:
        limit = {"timeout_s": timeout_s} if timeout_s else {}
        cards = run_finalize(run_dir, top, id_list, epochs, seed_list, tuple(overrides), on_progress=progress, **limit)
    except (ConfigError, FinalizeError) as e:
        raise CommandError(str(e)) from None
    if as_json:
        _echo(json.dumps(cards))
        return
    for card in cards:
        acc = card["test_accuracy"]
        _echo(f"candidate {card['candidate']}: test {acc['mean']:.2%} (int8 {acc['onnx_int8']:.2%}), "
                   f"{card['params']:,} params, fp32 {card['file_bytes']['fp32']:,} B, int8 {card['file_bytes']['int8']:,} B "
                   f"-> {run_dir}/final/{card['candidate']:05d}/")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--measure", is_flag=True, help="First send what waits for its target latency to the agents (not "
              "while a search runs on RUN_DIR).")
@click.option("--url", "urls", multiple=True, help="With --measure: the agent(s) to use instead of the run's target.url.")
@click.option("--token-file", help="With --measure: the agent's token file instead of the run's target.token_file.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def targets(run_dir, measure, urls, token_file, as_json):
    """How well MACs, parameters and this machine's latency rank the candidates as the target latency does
    (Spearman): what to trust when no device is attached."""
    from edgenas import history
    from edgenas.config import ConfigError

    _open_archive(run_dir).close()
    config = _config(f"{run_dir}/config.yaml", [])
    if config.target is None:
        raise UsageError(f"{run_dir} was searched without a `target` section: it has no target latency to compare with")
    if measure:
        update = {k: v for k, v in (("url", list(urls) or None), ("token_file", token_file)) if v}
        try:
            config = config.model_copy(update={"target": config.target.model_validate(
                {**config.target.model_dump(), **update})})
            if not config.target.urls:
                raise ConfigError("--measure needs a device agent (the run measured on this machine; give --url)")
            from edgenas.target import measure_waiting

            queued, left = measure_waiting(config, run_dir)
        except (ConfigError, ValueError) as e:
            raise UsageError(str(e).splitlines()[0]) from None
        _echo(f"measured {queued - left} of {queued} waiting candidate(s)" + (
            f"; {left} still wait (no agent answered)" if left else ""), err=True)
    archive = _open_archive(run_dir)
    candidates = archive.all()
    archive.close()
    states = [c.result.target.status for c in candidates if c.result and c.result.target]
    summary = {state: states.count(state) for state in ("measured", "waiting", "failed")}
    rows = history.proxy_agreement(candidates)
    if as_json:
        _echo(json.dumps({"candidates": summary, "agreement": rows}))
        return
    _echo(f"target latency: {summary['measured']} measured, {summary['waiting']} waiting, {summary['failed']} failed")
    for row in rows:
        rho = "-" if row["spearman"] is None else f"{row['spearman']:+.3f}"
        _echo(f"  Spearman {rho}  {row['label']} vs target latency (n={row['n']})")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
def bench(model, threads, runs, warmup, batch, as_json):
    """onnxruntime latency of an ONNX model (no torch needed: on a device, run python -m exporters.bench)."""
    from exporters.bench import bench as run_bench

    try:
        result = run_bench(model, threads=threads, runs=runs, warmup=warmup, batch=batch)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable models
        raise UsageError(f"cannot benchmark {model}: {str(e).splitlines()[0]}") from None
    if as_json:
        _echo(json.dumps(result))
    else:
        _echo(f"{model}: p50 {result['p50_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, mean {result['mean_ms']:.3f} ms, "
                   f"{result['throughput_per_s']:.0f} images/s (batch {batch}, {result['threads']} threads)")


if __name__ == "__main__":
    sys.exit(main())
