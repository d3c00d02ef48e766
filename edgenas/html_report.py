"""`edgenas report`: one self-contained HTML file (plotly.js inside: works offline, from disk or mailed) that shows
how a search went and what it found; several runs side by side when given several run directories.

Rewritten atomically every few iterations during a search (search.report_every) with a reload tag, so a browser
left open on it follows the run.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import yaml
from plotly.offline import get_plotlyjs

from edgenas import history, pareto, redact
from edgenas.archive import Archive
from edgenas.config import Config, load_config
from edgenas.records import Candidate

AXES = {"target_latency_ms": ("max_target_latency_ms", "target latency (ms, p50)"),
        "params": ("max_params", "parameters"), "macs": ("max_macs", "MACs per image"),
        "peak_memory_bytes": ("max_memory_mb", "train-step memory (bytes)"), "latency_ms": (None, "latency (ms, batch 1)")}
RELOAD_S = 30


@dataclass
class Run:
    label: str
    dir: Path
    config: Config
    candidates: list[Candidate]
    events: list[dict]
    cards: list[dict]


def load_run(run_dir: Path) -> Run:
    archive = Archive(run_dir, readonly=True)
    try:
        candidates = archive.all()
    finally:
        archive.close()
    events = []
    for line in (run_dir / "events.jsonl").read_text().splitlines() if (run_dir / "events.jsonl").is_file() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a killed session's torn last line
    cards = [json.loads(p.read_text()) for p in sorted(run_dir.glob("final/*/card.json"))]
    return Run(run_dir.name, run_dir, load_config(run_dir / "config.yaml"), candidates, events, cards)


def label_runs(runs: list[Run]) -> None:
    """Name each run by the config keys in which the runs differ (the paper's ablations: K, improver, model...)."""
    from edgenas.search import _flat

    flat = [_flat(r.config.model_dump(mode="json")) for r in runs]
    differ = [k for k in sorted(set().union(*flat)) if len({json.dumps(f.get(k)) for f in flat}) > 1]
    differ = [k for k in differ if not k.startswith(("dataset.root", "dataset.cache_dir", "llm.cache_dir"))]
    for i, (run, f) in enumerate(zip(runs, flat, strict=True)):
        shown = ", ".join(f"{k.split('.', 1)[1]}={f.get(k)}" for k in differ[:3])
        run.label = f"{run.dir.name}: {shown}" if shown else run.dir.name
        if any(other.label == run.label for other in runs[:i]):  # labels key each run's code: keep them apart
            run.label += f" ({i + 1})"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _hover(c: Candidate, label: str) -> str:
    r = c.result
    parts = [f"{label} iteration {c.iteration} (chain {c.chain})", f"accuracy {_pct(c.val_accuracy)}"]
    if r is not None:
        parts += [f"{r.params:,} params" if r.params else "", f"{r.macs / 1e6:.1f}M MACs" if r.macs else "",
                  f"{r.peak_memory_bytes / 2**20:.0f} MiB" if r.peak_memory_bytes else "",
                  f"{r.latency_ms:.3f} ms" if r.latency_ms else "", r.target.render() or "" if r.target else ""]
    parts.append(html.escape(c.modification[:120], quote=False))  # plotly decodes no &quot;
    return "<br>".join(p for p in parts if p)


def progress_figures(runs: list[Run]) -> list[go.Figure]:
    by_iteration, by_time, rate = go.Figure(), go.Figure(), go.Figure()
    for run in runs:
        rows = history.progress(run.candidates)
        by_chain = sorted({r["chain"] for r in rows})
        valid = {c.iteration: c for c in run.candidates if c.val_accuracy is not None}
        for chain in by_chain:
            mine = [r for r in rows if r["chain"] == chain and r["val_accuracy"] is not None]
            name = run.label + (f" chain {chain}" if len(by_chain) > 1 else "")
            for fig, x in ((by_iteration, "iteration"), (by_time, "minutes")):
                fig.add_scatter(x=[r[x] for r in mine], y=[100 * r["val_accuracy"] for r in mine], mode="markers",
                                name=name, customdata=[[run.label, r["iteration"]] for r in mine],
                                hovertext=[_hover(valid[r["iteration"]], run.label) for r in mine], hoverinfo="text")
        best = [r for r in rows if r["best"] is not None]
        for fig, x in ((by_iteration, "iteration"), (by_time, "minutes")):
            fig.add_scatter(x=[r[x] for r in best], y=[100 * r["best"] for r in best], mode="lines",
                            line_shape="hv", name=f"{run.label} best")
        windows = history.valid_rate(run.candidates)
        rate.add_scatter(x=[w["iteration"] for w in windows], y=[100 * w["valid_rate"] for w in windows],
                         mode="lines", name=run.label)
    by_iteration.update_layout(title="Validation accuracy by iteration", xaxis_title="iteration",
                               yaxis_title="validation accuracy (%)")
    by_time.update_layout(title="Validation accuracy by wall time", xaxis_title="minutes since the first iteration",
                          yaxis_title="validation accuracy (%)")
    rate.update_layout(title="Valid candidates over the last 20 iterations", xaxis_title="iteration",
                       yaxis_title="valid (%)", yaxis_range=[0, 100])
    return [by_iteration, by_time, rate]


def failures_figure(run: Run) -> go.Figure:
    data = history.failures_over_time(run.candidates)
    fig = go.Figure()
    for kind, counts in data["counts"].items():
        fig.add_bar(x=data["edges"], y=counts, name=kind)
    fig.update_layout(barmode="stack", title=f"Failures by kind ({run.label})",
                      xaxis_title="iteration (start of each span)", yaxis_title="failed candidates")
    return fig


def pareto_figure(runs: list[Run]) -> go.Figure:
    """Accuracy against one cost at a time (buttons switch it), the feasible front drawn, the budget as a line."""
    fig, axes = go.Figure(), [a for a in AXES if any(c.result and pareto.cost(c, a) for r in runs for c in r.candidates)]
    axes = axes or ["params"]
    traces = []  # (field values per axis) per trace
    for run in runs:
        points = {p.iteration: p for p in pareto.front_of(run.candidates, run.config.budget)}
        valid = [c for c in run.candidates if c.iteration in points]
        for on_front in (False, True):
            chosen = [c for c in valid if (points[c.iteration].front == 0 and points[c.iteration].feasible) == on_front]
            chosen.sort(key=lambda c: pareto.cost(c, axes[0]) or 0)
            traces.append({a: [pareto.cost(c, a) for c in chosen] for a in axes})
            fig.add_scatter(x=traces[-1][axes[0]], y=[100 * c.val_accuracy for c in chosen],
                            mode="lines+markers" if on_front else "markers", marker_size=9 if on_front else 6,
                            name=f"{run.label} {'front' if on_front else 'valid'}",
                            customdata=[[run.label, c.iteration] for c in chosen],
                            hovertext=[_hover(c, run.label) for c in chosen], hoverinfo="text")

    def budget_lines(axis: str) -> list[dict]:
        key = AXES[axis][0]
        limits = {getattr(r.config.budget, key) for r in runs} - {None} if key else set()
        scale = 2**20 if axis == "peak_memory_bytes" else 1
        return [{"type": "line", "xref": "x", "yref": "paper", "x0": v * scale, "x1": v * scale, "y0": 0, "y1": 1,
                 "line": {"dash": "dash", "color": "firebrick"}} for v in limits]

    buttons = [{"label": AXES[a][1], "method": "update",
                "args": [{"x": [t[a] for t in traces]}, {"xaxis.title.text": AXES[a][1], "shapes": budget_lines(a)}]}
               for a in axes]
    fig.update_layout(title="Accuracy against cost (the budget dashed; click a point for its code)",
                      xaxis_title=AXES[axes[0]][1], xaxis_type="log", yaxis_title="validation accuracy (%)",
                      shapes=budget_lines(axes[0]), updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15}])
    return fig


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def run_sections(run: Run) -> str:
    e = html.escape
    steps = history.lineage(run.candidates)
    lineage = _table(["iteration", "chain", "problem", "modification", "accuracy", "change", "params", "diff"], [
        [s["iteration"], s["chain"], e(s["problem"]), e(s["modification"]), _pct(s["val_accuracy"]),
         "-" if s["delta"] is None else f"{100 * s['delta']:+.2f} pt", f"{s['params']:,}" if s["params"] else "-",
         f"<details><summary>diff</summary><pre>{e(s['diff'])}</pre></details>" if s["diff"] else ""] for s in steps])
    cost = history.cost(run.candidates)
    cost_rows = [[e(k.replace("_", " ")), "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"]
                 for k, v in cost.items()]
    diagnostics = _table(["kind", "diagnostic (numbers and names blanked)", "count"],
                         [[e(d["kind"]), e(d["diagnostic"]), d["count"]] for d in history.top_diagnostics(run.candidates)])
    cards = _table(["model", "params", "test fp32", "test INT8", "fp32 file", "INT8 file", "INT8 p50 ms, 1 thread"], [
        [e(c["name"]), f"{c['params']:,}", _pct(c["test_accuracy"]["mean"]), _pct(c["test_accuracy"]["int8_mean"]),
         f"{c['file_bytes']['fp32']:,} B", f"{c['file_bytes']['int8']:,} B",
         f"{c['latency_ms'].get('onnxruntime_int8_threads_1', {}).get('p50_ms', float('nan')):.3f}"] for c in run.cards])
    targets = [c.result.target for c in run.candidates if c.result and c.result.target]
    devices = sorted({t.device for t in targets if t.device})
    agreement = _table(["cost measured without the device", "Spearman with the target latency", "candidates"], [
        [e(a["label"]), "-" if a["spearman"] is None else f"{a['spearman']:+.3f}", a["n"]]
        for a in history.proxy_agreement(run.candidates)])
    target = (f"<p>{sum(t.status == 'measured' for t in targets)} measured, {sum(t.status == 'waiting' for t in targets)} "
              f"waiting, {sum(t.status == 'failed' for t in targets)} failed; on {e('; '.join(devices) or '-')}</p>"
              + agreement) if targets else ""
    machine = next((ev.get("environment") for ev in run.events if ev.get("event") == "start"), None)
    return "".join([
        f"<h2>{e(run.label)}</h2>",
        "<h3>Lineage of the best</h3>", lineage if steps else "<p>no valid candidate yet</p>",
        "<h3>Most frequent failures</h3>", diagnostics,
        "<h3>Cost</h3>", _table(["", "value"], cost_rows),
        *(["<h3>Target latency</h3>", target] if target else []),
        "<h3>Finalized models</h3>", cards if run.cards else "<p>none yet (edgenas finalize)</p>",
        f"<details><summary>Config as run</summary><pre>{e(yaml.safe_dump(run.config.model_dump(mode='json'), sort_keys=False))}</pre></details>",
        f"<details><summary>Machine and versions</summary><pre>{e(json.dumps(machine, indent=1)) if machine else 'not recorded'}</pre></details>",
    ])


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}#code{max-height:30em}.grid{display:grid;grid-template-columns:1fr 1fr}"""

CLICK = """for (const plot of document.querySelectorAll('.js-plotly-plot')) {
  plot.on('plotly_click', (event) => {
    const [run, iteration] = event.points[0].customdata || [];
    if (iteration === undefined) return;
    document.getElementById('code-title').textContent = run + ', iteration ' + iteration;
    document.getElementById('code').textContent = CODE[run][iteration] || '(no code)';
  });
}"""


def render(runs: list[Run], live: bool = False) -> str:
    figures = [*progress_figures(runs), pareto_figure(runs), *(failures_figure(r) for r in runs)]
    divs = [f.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot{i}", config={"responsive": True})
            for i, f in enumerate(figures)]
    code = {r.label: {c.iteration: c.code for c in r.candidates if c.code} for r in runs}
    stats = " | ".join(f"{r.label}: {len(history.finished(r.candidates))} iterations" for r in runs)
    reload = f'<meta http-equiv="refresh" content="{RELOAD_S}">' if live else ""
    follows = f" (live: reloads every {RELOAD_S} s)" if live else ""
    title = "edgenas report: " + ", ".join(r.label for r in runs)
    code_json = json.dumps(code).replace("<", "\\u003c")  # no "</script>" or "<!--" can end or bend the script
    page = "".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>{reload}<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style><script>PLOTLYJS</script></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(stats)}{follows}</p>",
        "<div class='grid'>", *divs[:2], "</div>", divs[2], divs[3],
        "<h3 id='code-title'>Click a point to see its code</h3><pre id='code'></pre>", *divs[4:],
        *(run_sections(r) for r in runs),
        f"<script>const CODE = {code_json};\n{CLICK}</script></body></html>",
    ])
    # secrets scrubbed from what the run holds; plotly.js (5 MB of library) goes in afterwards, as it is
    return redact.scrub(page).replace("<script>PLOTLYJS</script>", f"<script>{get_plotlyjs()}</script>", 1)


def write(run_dirs: list[Path], out: Path, live: bool = False) -> Path:
    """Render the runs and replace `out` in one rename: a browser never reads half a file."""
    runs = [load_run(Path(d)) for d in run_dirs]
    if len(runs) > 1:
        label_runs(runs)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs, live))
    os.replace(tmp, out)
    return out
