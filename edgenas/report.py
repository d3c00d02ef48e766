"""Human-readable tables for the terminal (the --json forms are for programs).

Text that came from a candidate or an LLM is scrubbed of secrets and printed as plain Text, never as rich markup:
a '[redacted $KEY]' marker or an 'x[i]' in a diagnostic would otherwise be read as a style tag.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgenas import redact
from edgenas.records import EvalResult


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".strip()


def result_table(result: EvalResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(show_header=False, box=None)
    status = "[green]ok[/]" if result.ok else f"[red]failed ({result.failure.kind.value})[/] at {result.stage}"
    rows = [
        ("status", status),
        ("params", f"{result.params:,}" if result.params is not None else "-"),
        ("MACs", _si(result.macs)),
        ("weights", _si(result.weight_bytes, "B")),
        ("peak memory (train step)", _si(result.peak_memory_bytes, "B")),
        ("val accuracy", f"{result.val_accuracy:.2%}" if result.val_accuracy is not None else "-"),
        ("val loss", f"{result.val_loss:.4f}" if result.val_loss is not None else "-"),
        ("train", f"{result.train_images} images in {result.train_seconds:.1f} s" if result.train_seconds else "-"),
        ("latency (onnxruntime, batch 1)", f"{result.latency_ms:.3f} ms" if result.latency_ms is not None else "-"),
        ("device / dataset", f"{result.device} / {result.dataset}"),
        ("stages (s)", "  ".join(f"{k} {v:.2f}" for k, v in result.stage_seconds.items())),
    ]
    if result.target:
        rows.append(("target latency", Text(redact.scrub(result.target.render() or f"waiting: {result.target.reason}"))))
    if result.macs_uncounted_ops:
        rows.append(("ops not in MACs", ", ".join(sorted(result.macs_uncounted_ops))))
    if result.failure:
        rows.append(("diagnostic", Text(redact.scrub(result.failure.message))))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


def candidate_rows(candidates) -> list[dict]:
    """One plain object per iteration: what `edgenas show --json` prints."""
    rows = []
    for c in candidates:
        r = c.result
        t = r.target if r else None
        rows.append({
            "iteration": c.iteration, "chain": c.chain, "status": c.status,
            "failure_kind": None if c.status in ("ok", "pending") else c.outcome.kind,
            "failure_reason": None if c.status in ("ok", "pending") else c.outcome.diagnostic,
            "note": c.outcome.diagnostic if c.status == "ok" else None,  # e.g. why a close win was not promoted
            "val_accuracy": c.val_accuracy, "seed_accuracies": c.outcome.runs, "params": r.params if r else None, "macs": r.macs if r else None,
            "peak_memory_bytes": r.peak_memory_bytes if r else None, "latency_ms": r.latency_ms if r else None,
            # the deployment target (a `target` section): p50 and p90, or why they are missing
            "target_latency_ms": t.p50_ms if t else None, "target_p90_ms": t.p90_ms if t else None,
            "target_status": t.status if t else None, "target_reason": t.reason if t else None,
            "target_device": t.device if t else None,
            "problem": c.problem, "modification": c.modification, "is_best": c.is_best, "parent": c.parent,
            "tokens_in": c.tokens_in, "tokens_out": c.tokens_out, "llm_seconds": round(c.llm_seconds, 3),
            "eval_seconds": round(c.eval_seconds, 3), "code_hash": c.code_hash,
        })
    return redact.scrub_data(rows)


def _mib(value: int | None) -> str:
    """Train-step memory in MiB, the unit of the search log and of the feedback memory."""
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def candidates_table(rows: list[dict], console: Console | None = None) -> None:
    """Failed rows carry their reason, so nobody has to open the JSON to learn why a candidate failed."""
    console = console or Console()
    target = any(row["target_status"] for row in rows)
    table = Table("it", "status", "val acc", "params", "MACs", "memory", *(["target"] if target else []),
                  "modification", "failure reason / note")
    for row in rows:
        status = row["status"] if row["status"] in ("ok", "pending") else f"[red]{row['status']}:{row['failure_kind']}[/]"
        acc = "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.2%}" + (" *" if row["is_best"] else "")
        if len(row["seed_accuracies"]) > 1:
            acc += f" ({len(row['seed_accuracies'])} seeds)"
        reason = Text(redact.scrub(row["failure_reason"] or row["note"] or "")[:200])
        on_target = ([_ms(row["target_latency_ms"]) if row["target_status"] == "measured" else row["target_status"] or "-"]
                     if target else [])
        table.add_row(str(row["iteration"]), status, acc, _si(row["params"]), _si(row["macs"]),
                      _mib(row["peak_memory_bytes"]), *on_target, Text(redact.scrub(row["modification"])[:70]), reason)
    console.print(table)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def pareto_table(rows: list[dict], console: Console | None = None) -> None:
    """The latency column is the target's when the run measured one."""
    console = console or Console()
    target = any(row["target_latency_ms"] is not None for row in rows)
    table = Table("it", "front", "feasible", "val acc", "params", "MACs", "memory",
                  "target latency (p50)" if target else "latency")
    for row in rows:
        table.add_row(str(row["iteration"]), str(row["front"]), "yes" if row["feasible"] else "[red]no[/]",
                      f"{row['val_accuracy']:.2%}", _si(row["params"]), _si(row["macs"]),
                      _si(row["peak_memory_bytes"], "B"), _ms(row["target_latency_ms" if target else "latency_ms"]))
    console.print(table)
