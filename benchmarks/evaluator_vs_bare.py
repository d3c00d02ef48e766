"""Evaluator vs a bare hand-written training loop, one epoch of the same model on the same data.

Claim: the sandboxed, staged evaluator adds next to nothing to training. Its one-epoch training time
(EvalResult.train_seconds) and its whole evaluate() wall time are compared with a plain in-memory
PyTorch loop in a fresh process: the same uint8 tensors from edgenas.data.load_data, the same batch
size, SGD settings, memory format (channels_last or not) and per-batch crop/flip augmentation.
Target: evaluator <= 1.10x the bare loop (train time and total time).

"Total" for the bare loop is the work a candidate needs once the process is warm: build the model,
train one epoch, validate. It is timed after the interpreter start, the imports, the data load and an
untimed warm-up on a throwaway model (all reported apart): the evaluator pays the same once, in
Evaluator.start(), so neither side is charged for a cold process. The evaluator's total also holds its
extra stages (forward check, profile with a memory-probe step, latency); a row without them is shown.

    python benchmarks/evaluator_vs_bare.py                      # 10,000 training images, 3 timed rounds
    python benchmarks/evaluator_vs_bare.py --train-subset 2000 --repeats 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import os
import statistics
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

TARGET = 1.10
CLAIM = "evaluator one-epoch training and evaluate() wall time <= 1.10x a bare in-memory PyTorch loop"

# Runs in a fresh interpreter; argv[1] is a JSON dict of parameters. Written independently of edgenas.train.
BARE_LOOP = r'''
import json
import os
import sys
import time

t_start = time.perf_counter()
import torch
import torch.nn.functional as F

from edgenas.config import DatasetConfig
from edgenas.data import load_data

p = json.loads(sys.argv[1])
torch.set_num_threads(p["threads"])
t_imported = time.perf_counter()

data = load_data(DatasetConfig.model_validate(p["dataset"]))
train_x, train_y = data.train.images.clone(), data.train.labels.clone()  # plain in-memory tensors
val_x, val_y = data.val.images.clone(), data.val.labels.clone()
t_loaded = time.perf_counter()

layout = torch.channels_last if p["channels_last"] else torch.contiguous_format
mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
std = torch.tensor(data.std).view(1, -1, 1, 1) * 255


def to_input(x):
    return ((x.float() - mean) / std).contiguous(memory_format=layout)


def augment(x, g):
    n, c, h, w = x.shape
    pad = p["crop_padding"]
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=g)
        left = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=g)
        rows = (top + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (left + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
        x = x.gather(3, cols)
    if p["flip"]:
        mirror = torch.rand(n, generator=g) < 0.5
        x = torch.where(mirror.view(n, 1, 1, 1), x.flip(3), x)
    return x


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"],
                           nesterov=p["nesterov"] and p["momentum"] > 0)


def step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def build():
    namespace = {"torch": torch, "nn": torch.nn, "F": F}
    exec(compile(p["code"], "candidate.py", "exec"), namespace)
    net = namespace["Net"](in_shape=tuple(train_x.shape[1:]), num_classes=len(data.classes))
    return net.to(memory_format=torch.channels_last) if p["channels_last"] else net


# warm-up, not timed: one throwaway model pays the process's lazy initialisation (module imports, kernel
# selection, allocator growth), as the evaluator's worker does once at start and its profile stage per candidate
spare = build().train()
spare_opt = sgd(spare)
for _ in range(p["warmup_steps"]):
    step(spare, spare_opt, to_input(augment(train_x[: p["batch_size"]], torch.Generator())), train_y[: p["batch_size"]])
with torch.inference_mode():
    spare.eval()(to_input(val_x[: p["eval_batch_size"]]))
del spare, spare_opt
t_warm = time.perf_counter()

t0 = time.perf_counter()
torch.manual_seed(p["seed"])
model = build()
optimizer = sgd(model)
t_built = time.perf_counter()

g = torch.Generator().manual_seed(p["seed"])
model.train()
losses = []
order = torch.randperm(len(train_y), generator=g)
for s in range(0, len(order), p["batch_size"]):
    idx = order[s : s + p["batch_size"]]
    losses.append(step(model, optimizer, to_input(augment(train_x[idx], g)), train_y[idx]))
last = float(torch.stack(losses[-max(1, len(losses) // 10):]).mean())
t_trained = time.perf_counter()

model.eval()
correct = 0
with torch.inference_mode():
    for s in range(0, len(val_y), p["eval_batch_size"]):
        logits = model(to_input(val_x[s : s + p["eval_batch_size"]]))
        correct += int((logits.argmax(1) == val_y[s : s + p["eval_batch_size"]]).sum())
t_validated = time.perf_counter()

print(json.dumps({
    "import_s": t_imported - t_start, "load_s": t_loaded - t_imported, "warmup_s": t_warm - t_loaded,
    "build_s": t_built - t0, "train_s": t_trained - t_built, "validate_s": t_validated - t_trained,
    "work_s": t_validated - t0, "train_images": len(train_y), "val_images": len(val_y), "steps": len(losses),
    "train_loss_last": last, "val_accuracy": correct / len(val_y), "threads": torch.get_num_threads(),
    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")},
}))
'''


def bare_params(config, code: str) -> dict:
    """The bare loop's settings, all taken from the evaluator's config so both sides train alike."""
    t = config.train
    unsupported = {"epochs": t.epochs != 1, "schedule": t.schedule != "constant", "amp": t.amp,
                   "label_smoothing": t.label_smoothing != 0}
    if any(unsupported.values()):
        raise SystemExit(f"the bare loop implements one epoch of constant-lr SGD only; unset "
                         f"{', '.join(k for k, v in unsupported.items() if v)}")

    return {"dataset": config.dataset.model_dump(mode="json"), "code": code, "seed": t.seed,
            "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size, "lr": t.lr, "momentum": t.momentum,
            "weight_decay": t.weight_decay, "nesterov": t.nesterov, "channels_last": t.channels_last,
            "crop_padding": t.augment.crop_padding, "flip": t.augment.flip,
            "threads": config.eval.threads or os.cpu_count() or 1, "warmup_steps": 2}


def main() -> None:
    args = parser(__doc__, train_subset=10000, val_size=5000, repeats=3).parse_args()
    config = make_config(args)
    machine = machine_info()
    from edgenas.evaluate import Evaluator

    params = bare_params(config, REFERENCE_CNN)
    evaluator = Evaluator(config)
    print(f"starting the evaluator ({args.train_subset} training images, {args.val_size} validation images)",
          flush=True)
    start = time.perf_counter()
    info = evaluator.start()
    start_s = time.perf_counter() - start
    ev_runs, bare_runs = [], []
    try:
        for i, timed in rounds(args.warmup, args.repeats):
            pair = {}
            for side in (("bare", "evaluator") if i % 2 == 0 else ("evaluator", "bare")):  # alternate: no order bias
                pair[side] = run_python(BARE_LOOP, params) if side == "bare" else evaluate_timed(evaluator, REFERENCE_CNN)
            print(f"  bare train {pair['bare']['train_s']:.2f} s, work {pair['bare']['work_s']:.2f} s | evaluator "
                  f"train {pair['evaluator']['train_s']:.2f} s, wall {pair['evaluator']['wall_s']:.2f} s", flush=True)
            pair["bare"]["load1"] = pair["evaluator"]["load1"] = os.getloadavg()[0]
            if timed:
                bare_runs.append(pair["bare"])
                ev_runs.append(pair["evaluator"])
    finally:
        evaluator.close()

    ev = {k: summary([r[k] for r in ev_runs]) for k in ("train_s", "wall_s")}
    ev["extra_stages_s"] = summary([sum(r["stage_seconds"].get(s, 0) for s in ("forward", "profile", "latency"))
                                    for r in ev_runs])
    ev["like_for_like_s"] = summary([r["wall_s"] - e for r, e in zip(ev_runs, ev["extra_stages_s"]["values"], strict=True)])
    bare = {k: summary([r[k] for r in bare_runs]) for k in ("train_s", "work_s", "process_wall_s", "import_s",
                                                            "load_s", "warmup_s", "build_s", "validate_s")}
    paired = {name: summary([a[ka] / b[kb] for a, b in zip(ev_runs, bare_runs, strict=True)])
              for name, ka, kb in (("train", "train_s", "train_s"), ("total", "wall_s", "work_s"))}
    ratios = {"train": ratio(ev["train_s"], bare["train_s"]), "total": ratio(ev["wall_s"], bare["work_s"]),
              "total_vs_bare_process": ratio(ev["wall_s"], bare["process_wall_s"]),
              "like_for_like": ratio(ev["like_for_like_s"], bare["work_s"])}
    passed = ratios["train"] <= TARGET and ratios["total"] <= TARGET

    images = ev_runs[0]["train_images"]
    verdict = {True: "ok", False: "OVER"}
    rows = [
        ["train, one epoch", fmt(ev["train_s"]), fmt(bare["train_s"]), f"{ratios['train']:.3f}x",
         fmt(paired["train"], "x", 3), verdict[ratios["train"] <= TARGET]],
        ["total per candidate", fmt(ev["wall_s"]), fmt(bare["work_s"]), f"{ratios['total']:.3f}x",
         fmt(paired["total"], "x", 3), verdict[ratios["total"] <= TARGET]],
        ["total minus forward/profile/latency", fmt(ev["like_for_like_s"]), fmt(bare["work_s"]),
         f"{ratios['like_for_like']:.3f}x", "", "(info)"],
        ["total vs bare fresh-process wall", fmt(ev["wall_s"]), fmt(bare["process_wall_s"]),
         f"{ratios['total_vs_bare_process']:.3f}x", "", "(info)"],
    ]
    main_table = table(
        f"evaluator vs bare loop: {images} train images, {info['val_images']} val images, batch {config.train.batch_size}, "
        f"channels_last={config.train.channels_last}, {args.repeats} timed rounds after {args.warmup} warm-up",
        ["measure", "evaluator median [min-max]", "bare median [min-max]", "ratio of medians", "paired ratios",
         f"<= {TARGET}x"], rows)
    parts = table("where the time goes (medians)", ["part", "seconds"], [
        ["evaluator: Evaluator.start(), once", f"{start_s:.2f}"],
        ["evaluator: forward+profile+latency stages", f"{ev['extra_stages_s']['median']:.2f}"],
        *[[f"evaluator stage: {s}", f"{statistics.median(r['stage_seconds'].get(s, 0) for r in ev_runs):.3f}"]
          for s in ev_runs[0]["stage_seconds"]],
        ["bare: interpreter + imports", f"{bare['import_s']['median']:.2f}"],
        ["bare: load_data", f"{bare['load_s']['median']:.2f}"],
        ["bare: untimed warm-up (throwaway model)", f"{bare['warmup_s']['median']:.3f}"],
        ["bare: build", f"{bare['build_s']['median']:.3f}"],
        ["bare: validate", f"{bare['validate_s']['median']:.3f}"],
        ["val accuracy evaluator / bare", f"{statistics.median(r['val_accuracy'] for r in ev_runs):.4f} / "
                                          f"{statistics.median(r['val_accuracy'] for r in bare_runs):.4f}"],
    ])
    finish("evaluator_vs_bare", claim=CLAIM, target=f"train and total ratio <= {TARGET}x", passed=passed, args=args,
           config=config, machine=machine, tables=[main_table, parts],
           results={"evaluator": ev, "bare": bare, "ratios": ratios, "paired_ratios": paired,
                    "evaluator_runs": ev_runs, "bare_runs": bare_runs, "bare_params": {**params, "code": "REFERENCE_CNN"},
                    "reference_cnn": REFERENCE_CNN, "worker_info": info,
                    "evaluator_start_s": start_s},
           notes=["bare 'total' = build + one epoch + validation in its own process, timed after imports, data "
                  "load and an untimed warm-up on a throwaway model; evaluator 'total' = the whole evaluate() call on the warm worker"])


if __name__ == "__main__":
    main()
