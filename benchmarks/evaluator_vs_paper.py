"""Evaluator vs the paper's protocol: per-candidate wall time, end to end, on CPU.

The paper's protocol runs each candidate in a fresh Python process that imports torch and
torchvision, reads the JPEG folder through torchvision.datasets.ImageFolder (restricted with
torch.utils.data.Subset to the same number of training images), decodes and augments every image
with PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a
DataLoader (batch 128, shuffle, num_workers=2), trains one epoch with the same SGD settings and then
validates on a held-out set of the same size as the evaluator's. The evaluator starts once (worker,
imports, decoded uint8 data cache) and then costs one evaluate() call per candidate.

Claim: the evaluator is faster per candidate. Target: >= 1.5x faster per candidate on CPU (the one-time
Evaluator.start() is reported apart, with the speed-up it leaves when amortised over the timed rounds).

    python benchmarks/evaluator_vs_paper.py                     # 10,000 training images, 3 timed rounds
    python benchmarks/evaluator_vs_paper.py --train-subset 2000 --val-size 1000 --repeats 1 --warmup 0
"""

from __future__ import annotations

import os
import time

from common import (
    REFERENCE_CNN,
    evaluate_timed,
    finish,
    fmt,
    machine_info,
    make_config,
    parser,
    ratio,
    rounds,
    run_python,
    summary,
    table,
)

TARGET = 1.5
CLAIM = "the evaluator is >= 1.5x faster per candidate than a fresh process per candidate with ImageFolder + DataLoader"

# Runs in a fresh interpreter; argv[1] is a JSON dict of parameters. Uses no edgenas code at all.
PAPER_SCRIPT = r'''
import json
import sys
import time

t_start = time.perf_counter()
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

p = json.loads(sys.argv[1])
t_imported = time.perf_counter()

mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the usual CIFAR-10 constants
train_tf = transforms.Compose([transforms.RandomCrop(32, padding=p["crop_padding"]),
                               transforms.RandomHorizontalFlip(0.5 if p["flip"] else 0.0),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])
val_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
train_folder = datasets.ImageFolder(p["train_dir"], transform=train_tf)
val_folder = datasets.ImageFolder(p["train_dir"], transform=val_tf)
# the evaluator's split: a seeded permutation of the training folder, validation images first
order = torch.randperm(len(train_folder), generator=torch.Generator().manual_seed(p["split_seed"])).tolist()
val_idx, train_idx = order[: p["val_size"]], order[p["val_size"] :][: p["train_subset"]]
train_loader = DataLoader(Subset(train_folder, train_idx), batch_size=p["batch_size"], shuffle=True,
                          num_workers=p["num_workers"])
val_loader = DataLoader(Subset(val_folder, val_idx), batch_size=p["eval_batch_size"], shuffle=False,
                        num_workers=p["num_workers"])

torch.manual_seed(p["seed"])
namespace = {"torch": torch, "nn": nn, "F": F}
exec(compile(p["code"], "candidate.py", "exec"), namespace)
device = torch.device(p["device"])
model = namespace["Net"](in_shape=(3, 32, 32), num_classes=len(train_folder.classes)).to(device)
if p["channels_last"]:
    model = model.to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"],
                            nesterov=p["nesterov"] and p["momentum"] > 0)
t_setup = time.perf_counter()

model.train()
images = 0
for x, y in train_loader:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if p["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    images += len(y)
if device.type == "cuda":
    torch.cuda.synchronize()
t_trained = time.perf_counter()

model.eval()
correct = 0
with torch.no_grad():
    for x, y in val_loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
if device.type == "cuda":
    torch.cuda.synchronize()
t_validated = time.perf_counter()

print(json.dumps({"import_s": t_imported - t_start, "setup_s": t_setup - t_imported, "train_s": t_trained - t_setup,
                  "validate_s": t_validated - t_trained, "train_images": images, "val_images": len(val_idx),
                  "val_accuracy": correct / len(val_idx), "threads": torch.get_num_threads()}))
'''


def paper_params(config, args, code: str) -> dict:
    t, d = config.train, config.dataset
    if t.epochs != 1:
        raise SystemExit("the paper protocol here trains exactly one epoch; unset train.epochs")
    return {"train_dir": os.path.join(args.data_root, d.train_split), "code": code, "split_seed": d.split_seed,
            "val_size": d.val_size, "train_subset": d.train_subset, "seed": t.seed, "batch_size": t.batch_size,
            "eval_batch_size": t.eval_batch_size, "lr": t.lr, "momentum": t.momentum,
            "weight_decay": t.weight_decay, "nesterov": t.nesterov, "crop_padding": t.augment.crop_padding,
            "flip": t.augment.flip, "num_workers": args.num_workers, "channels_last": args.paper_channels_last,
            "device": "cuda" if config.eval.device == "cuda" else "cpu"}


def main() -> None:
    p = parser(__doc__, train_subset=10000, val_size=5000, repeats=3)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers in the paper protocol")
    p.add_argument("--paper-channels-last", action="store_true",
                   help="let the paper protocol use channels_last too (it uses the default NCHW otherwise)")
    args = p.parse_args()
    config = make_config(args)
    machine = machine_info()
    from edgenas.evaluate import Evaluator

    params = paper_params(config, args, REFERENCE_CNN)
    evaluator = Evaluator(config)
    print(f"starting the evaluator ({args.train_subset} training images, {args.val_size} validation images)",
          flush=True)
    start = time.perf_counter()
    info = evaluator.start()
    start_s = time.perf_counter() - start
    ev_runs, paper_runs = [], []
    try:
        for i, timed in rounds(args.warmup, args.repeats):
            pair = {}
            for side in (("paper", "evaluator") if i % 2 == 0 else ("evaluator", "paper")):
                pair[side] = run_python(PAPER_SCRIPT, params) if side == "paper" else evaluate_timed(evaluator, REFERENCE_CNN)
            pair["paper"]["load1"] = pair["evaluator"]["load1"] = os.getloadavg()[0]
            print(f"  paper {pair['paper']['process_wall_s']:.2f} s (train {pair['paper']['train_s']:.2f} s) | "
                  f"evaluator {pair['evaluator']['wall_s']:.2f} s (train {pair['evaluator']['train_s']:.2f} s)", flush=True)
            if timed:
                paper_runs.append(pair["paper"])
                ev_runs.append(pair["evaluator"])
    finally:
        evaluator.close()
    if paper_runs[0]["train_images"] != ev_runs[0]["train_images"]:
        raise SystemExit(f"the two sides trained on different numbers of images: {paper_runs[0]['train_images']} "
                         f"vs {ev_runs[0]['train_images']}")

    ev = {k: summary([r[k] for r in ev_runs]) for k in ("wall_s", "train_s")}
    ev["validate_s"] = summary([r["stage_seconds"]["validate"] for r in ev_runs])
    paper = {k: summary([r[k] for r in paper_runs]) for k in ("process_wall_s", "import_s", "setup_s", "train_s",
                                                               "validate_s")}
    paper["rest_s"] = summary([r["process_wall_s"] - sum(r[k] for k in ("import_s", "setup_s", "train_s", "validate_s"))
                               for r in paper_runs])
    speedup = ratio(paper["process_wall_s"], ev["wall_s"])
    paired = summary([a["process_wall_s"] / b["wall_s"] for a, b in zip(paper_runs, ev_runs, strict=True)])
    k = args.repeats
    amortised = paper["process_wall_s"]["median"] / (ev["wall_s"]["median"] + start_s / k)
    passed = speedup >= TARGET

    rows = [
        ["per candidate, end to end", fmt(paper["process_wall_s"]), fmt(ev["wall_s"]), f"{speedup:.2f}x",
         fmt(paired, "x"), "ok" if passed else "UNDER"],
        ["  train (paper: incl. JPEG decode + PIL)", fmt(paper["train_s"]), fmt(ev["train_s"]),
         f"{ratio(paper['train_s'], ev['train_s']):.2f}x", "", "(info)"],
        ["  validate", fmt(paper["validate_s"]), fmt(ev["validate_s"]),
         f"{ratio(paper['validate_s'], ev['validate_s']):.2f}x", "", "(info)"],
        ["  paper: interpreter + imports", fmt(paper["import_s"]), "-", "", "", ""],
        ["  paper: ImageFolder listing + model", fmt(paper["setup_s"]), "-", "", "", ""],
        ["  paper: interpreter start, exit, rest", fmt(paper["rest_s"]), "-", "", "", ""],
        ["evaluator start, once", "-", f"{start_s:.2f} s", "", "", ""],
        [f"per candidate incl. start / {k}", fmt(paper["process_wall_s"]),
         f"{ev['wall_s']['median'] + start_s / k:.2f} s", f"{amortised:.2f}x", "", "(info)"],
    ]
    main_table = table(
        f"evaluator vs paper protocol: {ev_runs[0]['train_images']} train images, {info['val_images']} val images, "
        f"batch {config.train.batch_size}, {args.num_workers} DataLoader workers, {args.repeats} timed rounds after "
        f"{args.warmup} warm-up", ["measure", "paper median [min-max]", "evaluator median [min-max]", "speed-up",
                                  "paired speed-ups", f">= {TARGET}x"], rows)
    acc = table("sanity: validation accuracy after one epoch (medians)", ["side", "val accuracy"],
                [["paper", f"{summary([r['val_accuracy'] for r in paper_runs])['median']:.4f}"],
                 ["evaluator", f"{summary([r['val_accuracy'] for r in ev_runs])['median']:.4f}"]])
    finish("evaluator_vs_paper", claim=CLAIM, target=f"speed-up per candidate >= {TARGET}x", passed=passed, args=args,
           config=config, machine=machine, tables=[main_table, acc],
           results={"evaluator": ev, "paper": paper, "speedup": speedup, "paired_speedups": paired,
                    "evaluator_start_s": start_s, "speedup_amortised_over_repeats": amortised,
                    "evaluator_runs": ev_runs, "paper_runs": paper_runs,
                    "paper_params": {**params, "code": "REFERENCE_CNN"}, "reference_cnn": REFERENCE_CNN,
                    "worker_info": info},
           notes=[f"paper side: NCHW unless --paper-channels-last (now {args.paper_channels_last}); evaluator: "
                  f"train.channels_last={config.train.channels_last}",
                  "paper wall = the whole fresh process seen from outside (interpreter start to exit)"])


if __name__ == "__main__":
    main()
