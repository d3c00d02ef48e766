"""What measuring each candidate's latency on a device agent adds to a search's iteration time, and how well the
costs known without the device rank candidates as the device does.

The agent (python -m exporters.agent) runs on its own core, as a second device would; the search on another one.
Every arm runs the same serial search over the same programs (an OpenAI-compatible stand-in that answers at once
with reference CNNs, so the iteration is all evaluation: the hardest case for an overhead), on a CIFAR-10 subset:

    none        no target section (the baseline)
    agent fp32  target.url: each valid candidate's graph sent to the agent while the next one trains
    agent int8  the same, the graph quantised first (in series, in the trusted worker)
    local int8  no url: measured in the worker, in series (for comparison)

Target: agent arms within 5% of the baseline's time per iteration. Then a mutate search (the quickstart config,
--spearman-iterations) against the agent in int8 gives the Spearman numbers of `edgenas targets`.

    python benchmarks/target_overhead.py       # about 15 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, finish, fmt, machine_info, make_config, parser, summary, table
from parallel_search import responder

sys.path.insert(0, str(REPO))
from edgenas import history  # noqa: E402
from edgenas.archive import Archive  # noqa: E402
from edgenas.config import Config, load_config  # noqa: E402
from edgenas.search import run_search  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

ARMS = {"none": None, "agent fp32": ("agent", "fp32"), "agent int8": ("agent", "int8"), "local int8": ("local", "int8")}


def start_agent(token_file: Path, core: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "exporters.agent", "--port", str(port), "--token-file",
                             str(token_file)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    proc.stdout.readline()
    return proc, f"http://127.0.0.1:{port}"


def targeted(config, arm, url: str, token_file: Path):
    config = config.model_copy(deep=True)
    if arm is not None:
        where, precision = arm
        target = {"precision": precision, **({"url": url, "token_file": str(token_file)} if where == "agent" else {})}
        config = Config.model_validate({**config.model_dump(mode="json"), "target": target})
    return config


def search(config, run: Path) -> dict:
    """Seconds per iteration from the session's start event (evaluators ready) to the end of run_search (the last
    graphs measured), and the run's candidates."""
    run_search(config, run, resuming=False)
    end = time.time()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    start = next(e["time"] for e in events if e["event"] == "start")
    written = {e["iteration"]: e["time"] for e in events if e["event"] == "candidate"}
    arrived = [e["time"] - written[e["iteration"]] for e in events if e["event"] == "target" and e["status"] == "measured"]
    archive = Archive(run)
    candidates = archive.all()
    archive.close()
    quantize = [c.result.stage_seconds["quantize"] for c in candidates if c.result and "quantize" in c.result.stage_seconds]
    return {"per_iteration_s": (end - start) / len(candidates), "candidates": candidates, "arrived_s": arrived,
            "quantize_s": quantize}


def main() -> None:
    p = parser(__doc__, train_subset=4000, val_size=1000, repeats=3, warmup=0)
    p.add_argument("--iterations", type=int, default=16, help="iterations per arm and round")
    p.add_argument("--spearman-iterations", type=int, default=30, help="iterations of the mutate run (0: skip)")
    args = p.parse_args()
    machine = machine_info()
    cores = sorted(os.sched_getaffinity(0))
    search_core, agent_core = cores[0], cores[-1]
    os.sched_setaffinity(0, {search_core})  # the evaluators inherit it
    config = make_config(args)
    times = {arm: [] for arm in ARMS}
    measured = {arm: [] for arm in ARMS}
    arrived = {arm: [] for arm in ARMS}  # seconds from a row's writing to its target latency's
    quantize = {arm: [] for arm in ARMS}  # seconds of INT8 quantisation per candidate, in series in the worker
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(responder(0.0, 0.0)) as fake:
        token_file = Path(tmp) / "token"
        token_file.write_text(secrets.token_hex())
        agent, url = start_agent(token_file, agent_core)
        try:
            config.llm.generator = config.llm.generator.model_copy(update={"backend": "openai", "model": "fake-model",
                                                                             "base_url": fake.url})
            config.llm.improver, config.llm.cache = config.llm.generator, False
            config.search = config.search.model_copy(update={"iterations": args.iterations, "confirm_margin": None,
                                                             "report_every": None})
            for round_ in range(args.repeats):
                for arm, setting in ARMS.items():
                    fake.responder = responder(0.0, 0.0)  # the same programs, in the same order, in every arm
                    out = search(targeted(config, setting, url, token_file), Path(tmp) / f"{arm}-{round_}")
                    times[arm].append(out["per_iteration_s"])
                    arrived[arm] += out["arrived_s"]
                    quantize[arm] += out["quantize_s"]
                    measured[arm].append(sum(1 for c in out["candidates"] if c.result and c.result.target
                                             and c.result.target.status == "measured"))
                    print(f"round {round_} {arm}: {out['per_iteration_s']:.2f} s per iteration", flush=True)
            spearman = None
            if args.spearman_iterations:
                mutate = load_config(REPO / "configs" / "quickstart.yaml", [
                    "dataset.name=folder", f"dataset.root={args.data_root}", f"search.iterations={args.spearman_iterations}",
                    "search.report_every=null"])
                out = search(targeted(mutate, ("agent", "int8"), url, token_file), Path(tmp) / "mutate")
                spearman = {"agreement": history.proxy_agreement(out["candidates"]),
                            "valid": sum(c.status == "ok" for c in out["candidates"]),
                            "iterations": len(out["candidates"])}
        finally:
            agent.kill()
    base = summary(times["none"])["median"]
    rows = {arm: {**summary(values), "ratio": summary(values)["median"] / base, "target_measured": measured[arm],
                  "arrived_s": summary(arrived[arm]), "quantize_s": summary(quantize[arm])}
            for arm, values in times.items()}
    passed = all(rows[arm]["ratio"] <= 1.05 for arm in ("agent fp32", "agent int8"))
    tables = [table(f"seconds per iteration, {args.iterations} iterations x {args.repeats} rounds per arm, training on "
                    f"{args.train_subset:,} CIFAR-10 images (search on core {search_core}, agent on core {agent_core})",
                    ["arm", "median s/it", "min", "max", "x baseline", "measured", "latency in after", "int8 s"],
                    [[arm, f"{r['median']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}", f"{r['ratio']:.3f}",
                      "/".join(map(str, r["target_measured"])), fmt(r["arrived_s"]), fmt(r["quantize_s"], digits=3)]
                     for arm, r in rows.items()])]
    if spearman:
        tables.append(table(f"Spearman with the agent's int8 latency over {spearman['valid']} valid candidates of a "
                            f"{spearman['iterations']}-iteration mutate search",
                            ["cost measured without the device", "Spearman", "n"],
                            [[a["label"], "-" if a["spearman"] is None else f"{a['spearman']:+.3f}", a["n"]]
                             for a in spearman["agreement"]]))
    finish("target_overhead", claim="measuring every valid candidate on a device agent overlaps training",
           target="agent arms <= 1.05x the baseline's seconds per iteration", passed=passed, args=args, config=config,
           machine=machine, results={"arms": rows, "spearman": spearman},
           tables=tables, notes=["the agent runs on this machine, on its own core: its latencies stand in for a "
                                 "device's; the Spearman numbers say how this CPU's int8 latency ranks against MACs, "
                                 "params and fp32 latency, not how a phone's would"])


if __name__ == "__main__":
    main()
