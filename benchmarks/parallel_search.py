"""Iterations per hour of the search for several (chains, workers), against the ideal rate.

A local OpenAI-compatible server answers after a set time (by default 2 s for the improver and 6 s for the
generator, about what a 7B model takes on a consumer GPU) and serves requests side by side, as vLLM does; each
generated program is a new reference CNN, evaluated for real on a CIFAR-10 subset on this machine's CPU. The ideal
rate of a configuration is min(chains / (LLM time + evaluation time), workers / evaluation time), with the mean
times measured in that same run. Targets: at least 3x the serial rate at 4 chains when the LLM dominates, and at
least 0.8 of the ideal in every configuration.

    python benchmarks/parallel_search.py          # (1,1) (2,1) (4,2) (8,2): about 6 minutes on 2 cores
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, finish, machine_info, make_config, parser, reference_cnn, table

sys.path.insert(0, str(REPO))
from edgenas.archive import Archive  # noqa: E402
from edgenas.search import run_search  # noqa: E402
from tests.fake_openai import FakeOpenAI, reply  # noqa: E402

# chains, workers; each runs --rounds iterations per chain, so that the start (the other chains wait for the first
# candidate) and the end (the last measurements, with no LLM call left to overlap) weigh little
CONFIGS = ((1, 1), (2, 1), (4, 2), (8, 2))


def responder(improver_s: float, generator_s: float):
    calls = itertools.count()
    lock = threading.Lock()

    def answer(request):
        if "diagnose" in request.messages[0]["content"]:
            time.sleep(improver_s)
            return reply(json.dumps({"problem": "p", "modification": "widen the network"}), usage=(900, 40))
        time.sleep(generator_s)
        with lock:
            n = next(calls)
        w = 16 + n % 8  # the same cost in every configuration; `self.n` makes each program new to the archive
        code = reference_cnn((w, 2 * w, 4 * w)).replace("super().__init__()", f"super().__init__()\n        self.n = {n}")
        return reply(f"```python\n{code}```", usage=(1200, 400))

    return answer


def measure(config, chains: int, workers: int, iterations: int, url: str) -> dict:
    config = config.model_copy(deep=True)
    config.search = config.search.model_copy(update={"chains": chains, "workers": workers, "iterations": iterations})
    with tempfile.TemporaryDirectory() as tmp:
        run_search(config, Path(tmp) / "run", resuming=False)
        archive = Archive(Path(tmp) / "run")
        rows = archive.all()
        archive.close()
        events = [json.loads(line) for line in (Path(tmp) / "run" / "events.jsonl").read_text().splitlines()]
    start = next(e["time"] for e in events if e["event"] == "start")
    wall = next(e["time"] for e in events if e["event"] == "stop") - start
    llm = sum(c.llm_seconds for c in rows) / len(rows)
    evaluation = sum(c.eval_seconds for c in rows) / len(rows)
    ideal = min(chains / (llm + evaluation), workers / evaluation)
    return {"chains": chains, "workers": workers, "iterations": len(rows), "valid": sum(c.status == "ok" for c in rows),
            "wall_s": wall, "per_hour": 3600 * len(rows) / wall, "llm_s": llm, "eval_s": evaluation,
            "ideal_per_hour": 3600 * ideal, "of_ideal": len(rows) / wall / ideal}


def main() -> None:
    p = parser(__doc__, train_subset=1000, val_size=500, repeats=1, warmup=0)
    p.add_argument("--improver-s", type=float, default=2.0)
    p.add_argument("--generator-s", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=6, help="iterations per chain in each configuration")
    args = p.parse_args()
    machine = machine_info()
    config = make_config(args)
    rows = []
    with FakeOpenAI(responder(args.improver_s, args.generator_s)) as fake:
        config.llm.generator = config.llm.generator.model_copy(update={"backend": "openai", "model": "fake-model",
                                                                         "base_url": fake.url})
        config.llm.improver = config.llm.generator
        config.llm.cache = False
        config.search.confirm_margin = None  # every candidate measured once: the rate is the loop's
        for chains, workers in CONFIGS:
            rows.append(measure(config, chains, workers, chains * args.rounds, fake.url))
            print(f"C={chains} W={workers}: {rows[-1]['per_hour']:.0f} it/h ({rows[-1]['of_ideal']:.0%} of ideal)", flush=True)
    serial = rows[0]["per_hour"]
    four = next(r for r in rows if r["chains"] == 4)
    passed = four["per_hour"] >= 3 * serial and all(r["of_ideal"] >= 0.8 for r in rows)
    tables = [table(f"search throughput: LLM {args.improver_s:g} s + {args.generator_s:g} s per iteration, evaluation on "
                    f"{args.train_subset:,} CIFAR-10 images",
                    ["chains x workers", "iterations", "wall", "it/h", "x serial", "LLM s/it", "eval s/it", "ideal it/h",
                     "of ideal"],
                    [[f"{r['chains']} x {r['workers']}", r["iterations"], f"{r['wall_s']:.0f} s", f"{r['per_hour']:.0f}",
                      f"{r['per_hour'] / serial:.2f}x", f"{r['llm_s']:.1f}", f"{r['eval_s']:.1f}",
                      f"{r['ideal_per_hour']:.0f}", f"{r['of_ideal']:.0%}"] for r in rows])]
    finish("parallel_search", claim="chains and evaluation slots raise the search's throughput towards the ideal",
           target=">= 3x the serial rate at 4 chains, >= 0.8 of the ideal in every configuration", passed=passed,
           args=args, config=config, machine=machine, results={"configs": rows}, tables=tables)


if __name__ == "__main__":
    main()
