"""Everything that needs a GPU, in one short run: the evaluator against the paper's protocol per candidate, the
in-process transformers backend on CUDA in bf16, a search and finalize with mixed precision, ONNX export and
parity. Writes benchmarks/results/device_check_<device>.json (and evaluator_vs_paper_<device>.json); each step records its
outcome, so one failure does not hide the others.

Target: the evaluator >= 3x faster than the paper protocol per candidate on a GPU; every step ok. Budget: under
8 minutes on one GPU (CIFAR-10 JPEG copy at ../shared/data/cifar10-jpeg, decoded once into a fresh cache).

    python benchmarks/device_check.py                 # on the GPU machine
    python benchmarks/device_check.py --device cpu    # the same steps, smaller, to check the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import DEFAULT_DATA_ROOT, REPO, RESULTS_DIR, machine_info

TARGET = 3.0


def step(results: dict, name: str, fn) -> None:
    """Run one check; its numbers or its error go into the results, never past them."""
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - recorded, the next step still runs
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:], "trace": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error'][:300]}", flush=True)


def cli(*args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "edgenas.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"edgenas {args[0]} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return proc


def evaluator_vs_paper(device: str, small: bool) -> dict:
    sizes = ["--train-subset", "2000", "--val-size", "500", "--repeats", "1", "--warmup", "0"] if small else \
        ["--train-subset", "10000", "--val-size", "5000", "--repeats", "2", "--warmup", "1"]
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "evaluator_vs_paper.py"), *sizes, "--set",
                    f"eval.device={device}", "--result-name", f"evaluator_vs_paper_{device}"], check=True, timeout=420)
    found = json.loads((RESULTS_DIR / f"evaluator_vs_paper_{device}.json").read_text())["results"]
    speedup = found["paper"]["process_wall_s"]["median"] / found["evaluator"]["wall_s"]["median"]
    return {"speedup": round(speedup, 2), "target": TARGET, "met": speedup >= TARGET,
            "paper_s": found["paper"]["process_wall_s"]["median"], "evaluator_s": found["evaluator"]["wall_s"]["median"]}


def transformers_backend(device: str, work: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from edgenas.config import LLMConfig
    from edgenas.llm import make_chat_model
    from edgenas.llm.base import Sampling
    from tests.tiny_llm import build_tiny_llama

    path = build_tiny_llama(work / "tiny-llama")
    dtype = "bfloat16" if device == "cuda" else "float32"
    chat = make_chat_model(LLMConfig(backend="transformers", model=path, dtype=dtype, device_map=device, max_tokens=32))
    messages = [{"role": "system", "content": "You design networks."}, {"role": "user", "content": "Write a model."}]
    first = chat.chat(messages, Sampling(temperature=0.7, top_p=0.9, max_tokens=32, seed=1))
    again = chat.chat(messages, Sampling(temperature=0.7, top_p=0.9, max_tokens=32, seed=1))
    return {"identity": chat.identity, "tokens_out": first.tokens_out, "seconds": round(first.seconds, 3),
            "reproducible": first.text == again.text}


def search_and_finalize(device: str, data_root: Path, work: Path, small: bool) -> dict:
    config = work / "search.yaml"
    config.write_text(f"""
dataset: {{name: folder, root: "{data_root}", train_subset: {2000 if small else 10000}, val_size: 1000}}
train: {{lr: 0.05}}
eval: {{device: {device}, timeout_s: 300}}
llm: {{generator: {{backend: mutate}}}}
search: {{iterations: 2}}
""")
    run = work / "run"
    cli("search", "--config", config, "--run-dir", run, "--seed-program", REPO / "tests" / "programs" / "good_cnn.py")
    proc = cli("finalize", run, "--candidates", "0", "--epochs", "2" if small else "5", "--json", timeout=900)
    (card,) = json.loads(proc.stdout)
    return {"test_accuracy": card["test_accuracy"], "parity": card["parity"], "isolation": card["training"]["isolation"],
            "amp": device == "cuda", "file_bytes": card["file_bytes"],
            "latency_ms": {k: v["p50_ms"] for k, v in card["latency_ms"].items() if isinstance(v, dict) and "p50_ms" in v}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    args = p.parse_args()
    small = args.device == "cpu"
    import torch

    results = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cuda": torch.version.cuda, "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="edgenas-device-") as tmp:
        work = Path(tmp)
        os.environ["EDGENAS_CACHE"] = str(work / "cache")
        step(results, "evaluator_vs_paper", lambda: evaluator_vs_paper(args.device, small))
        step(results, "transformers_backend", lambda: transformers_backend(args.device, work))
        step(results, "search_and_finalize", lambda: search_and_finalize(args.device, Path(args.data_root), work, small))
    results["all_ok"] = all(v["ok"] for v in results.values() if isinstance(v, dict) and "ok" in v)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"device_check_{args.device}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote benchmarks/results/device_check_{args.device}.json; all ok: {results['all_ok']}")


if __name__ == "__main__":
    main()
