"""Full training of the chosen candidates, then export, parity, INT8, latency and a model card.

Generated code still runs only in the sandbox: training, the test-set score and the ONNX export happen
in a limited child that may write nothing but this candidate's `final/<iteration>/` folder. The host
then works on ONNX files only (quantization, onnxruntime accuracy and latency, the card).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgenas.config import load_config
from edgenas.records import FailureKind
from edgenas.sandbox import Limits, Sandbox
from edgenas.stages import Worker

FULL_TRAINING = ["train.schedule=cosine", "train.nesterov=true", "train.label_smoothing=0.1", "train.lr=0.05",
                 "train.amp=true"]  # the proxy's settings are for ranking; these are for a final model


class FinalizeError(RuntimeError):
    pass


class FinalizeWorker(Worker):
    """Trains one candidate from scratch with checkpoints, scores it on the test split, exports it."""

    with_test = True

    def prepare(self, job: dict) -> None:
        import torch

        super().prepare(job)
        self.train_split = _concat(self.train_split, self.val_split)  # selection is over: train on all of train
        self.test_split = self.data.test.to(self.torch_device)
        self.out_dir = Path(job["out_dir"])
        checkpoint = self.out_dir / f"seed{job['seed']}.ckpt"
        self.resume = torch.load(checkpoint, weights_only=True) if checkpoint.is_file() else None

    def run(self, job: dict, report, isolation: list[str]) -> dict:
        try:
            return {"status": "ok", **self._finalize(job, report)}
        except BaseException as exc:  # noqa: BLE001 - the host reports it and moves on
            from edgenas.stages import classify

            kind, message = classify(exc, "train")
            return {"status": "failed", "kind": kind.value, "message": message}

    def _finalize(self, job: dict, report) -> dict:
        import math

        import torch

        from edgenas import profile
        from edgenas.train import build_optimizer, evaluate, steps_per_epoch, train_epoch

        self.config.train.seed = job["seed"]
        out: dict = {}
        self._build(job, out)
        self._training_step_memory()  # settles the memory layout (channels_last or not)
        cfg, model = self.config.train, self.model.to(self.torch_device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        epochs = math.ceil(cfg.epochs)
        optimizer, scheduler = build_optimizer(model, cfg, epochs * steps_per_epoch(len(self.train_split), cfg.batch_size))
        generator = torch.Generator().manual_seed(job["seed"])
        start_epoch, history = 0, []
        if self.resume is not None:
            model.load_state_dict(self.resume["model"])
            optimizer.load_state_dict(self.resume["optimizer"])
            scheduler.load_state_dict(self.resume["scheduler"])
            generator.set_state(self.resume["generator"])
            start_epoch, history = self.resume["epoch"], self.resume["history"]
        for epoch in range(start_epoch, epochs):
            stats = train_epoch(model, optimizer, scheduler, self.train_split, self.normalize, cfg, generator)
            history.append({"epoch": epoch + 1, "loss": stats.loss_mean, "seconds": stats.seconds})
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "generator": generator.get_state(), "epoch": epoch + 1, "history": history},
                       self.out_dir / f"seed{job['seed']}.ckpt")
            report({"progress": {"seed": job["seed"], "epoch": epoch + 1, "epochs": epochs, "loss": stats.loss_mean}})
        accuracy, loss = evaluate(model, self.test_split, self.normalize, cfg.eval_batch_size, cfg.amp)
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()
        torch.save(model.state_dict(), self.out_dir / f"model-seed{job['seed']}.pt")
        out.update(seed=job["seed"], test_accuracy=accuracy, test_loss=loss, history=history,
                   params=profile.count_params(model), train_images=len(self.train_split))
        if job["export"]:
            out.update(self._export(model))
        return out

    def _export(self, model) -> dict:
        import shutil

        import torch

        from edgenas import profile
        from edgenas.data import Normalize
        from exporters.bench import available_cores
        from exporters.onnx_export import check_parity, export_onnx, parity

        shutil.copy(self.out_dir / f"model-seed{self.config.train.seed}.pt", self.out_dir / "model.pt")
        path = export_onnx(model, self.data.in_shape, self.out_dir / "model.onnx")
        images = Normalize(self.data.mean, self.data.std, "cpu")(self.data.test.images[:2000])
        report = parity(model, path, images)
        check_parity(report)  # fails loudly: a model that disagrees with PyTorch is not shipped
        example = images[:1]
        latency = {}
        for threads in sorted({1, available_cores()}):
            torch.set_num_threads(threads)
            latency[f"threads_{threads}"] = profile.latency_ms(model, example, runs=100, warmup=10)
        return {"parity": report, "torch_latency_ms": latency}


def _concat(a, b):
    import torch

    from edgenas.data import Split

    return Split(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))


# ---------------------------------------------------------------- host side


def choose(archive, budget, top: int, ids: list[int] | None) -> list:
    from edgenas import pareto

    candidates = {c.iteration: c for c in archive.all()}
    if ids:
        missing = [i for i in ids if i not in candidates or candidates[i].status != "ok"]
        if missing:
            raise FinalizeError(f"no valid candidate with iteration {missing[0]} in {archive.dir}")
        return [candidates[i] for i in ids]
    points = pareto.choose(list(candidates.values()), budget, top)
    if not points:
        raise FinalizeError(f"{archive.dir} has no valid candidate to finalize")
    return [candidates[p.iteration] for p in points]


def finalize(run_dir, top: int = 3, ids: list[int] | None = None, epochs: int = 30, seeds: tuple[int, ...] = (0,),
             overrides: tuple[str, ...] = (), timeout_s: float = 7 * 24 * 3600, on_progress=None) -> list[dict]:
    """Train, score, export, quantize and measure each chosen candidate; returns one card per model."""
    from edgenas.archive import Archive

    run_dir = Path(run_dir).resolve()  # the sandboxed child runs in its own directory
    config = load_config(run_dir / "config.yaml", [*FULL_TRAINING, f"train.epochs={epochs}", *overrides])
    archive = Archive(run_dir)
    try:
        chosen = choose(archive, config.budget, top, ids)
    finally:
        archive.close()
    reference = _reference_images(config)
    cards = []
    with Sandbox("exporters.finalize:FinalizeWorker", {"config": config.model_dump(mode="json")}) as sandbox:
        info = sandbox.start()
        for candidate in chosen:
            out_dir = run_dir / "final" / f"{candidate.iteration:05d}"
            out_dir.mkdir(parents=True, exist_ok=True)
            limits = Limits(timeout_s=timeout_s, memory_limit_mb=config.eval.memory_limit_mb,
                            network_isolation=config.eval.network_isolation, writable_dir=str(out_dir),
                            cap_address_space=info["device"] == "cpu")
            seed_results = [_train_seed(sandbox, candidate, seed, seed == seeds[0], out_dir, limits, on_progress) for seed in seeds]
            cards.append(_measure_and_card(candidate, seed_results, out_dir, config, info, reference))
    return cards


def _train_seed(sandbox, candidate, seed, export, out_dir, limits, on_progress) -> dict:
    done = out_dir / f"seed{seed}.json"
    if done.is_file():  # finished in an earlier, interrupted finalize
        return json.loads(done.read_text())
    job = {"code": candidate.code, "seed": seed, "out_dir": str(out_dir), "export": export}
    reply = sandbox.run(job, limits, lambda p: on_progress and on_progress(candidate.iteration, p))
    result = reply.get("result")
    if not isinstance(result, dict) or result.get("status") != "ok":
        why = result.get("message") if isinstance(result, dict) else reply.get("error") or ("timed out" if reply.get("timed_out") else "the process died")
        kind = result.get("kind") if isinstance(result, dict) else FailureKind.crashed.value
        raise FinalizeError(f"candidate {candidate.iteration}, seed {seed}: {kind}: {str(why).strip().splitlines()[-1] if why else ''}")
    done.write_text(json.dumps(result))
    return result


def _reference_images(config) -> dict:
    """Calibration and test images for the host's ONNX work, normalised once for every candidate."""
    import torch

    from edgenas.data import Normalize, load_data

    data = load_data(config.dataset, with_test=True)
    normalize = Normalize(data.mean, data.std, "cpu")
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:256]
    return {"calibration": normalize(data.train.images[pick]), "test_images": normalize(data.test.images),
            "test_labels": data.test.labels.numpy()}


def _onnx_accuracy(path: Path, reference: dict) -> float:
    from exporters.onnx_export import onnx_logits

    return float((onnx_logits(path, reference["test_images"]).argmax(1) == reference["test_labels"]).mean())


def _measure_and_card(candidate, seed_results, out_dir: Path, config, info, reference: dict) -> dict:
    import numpy as np

    from exporters.bench import available_cores, bench
    from exporters.card import environment, write_card
    from exporters.quantize import quantize_int8

    fp32, int8 = out_dir / "model.onnx", out_dir / "model.int8.onnx"
    quantize_int8(fp32, int8, reference["calibration"].numpy())
    threads = sorted({1, available_cores()})
    first = seed_results[0]
    accuracies = [r["test_accuracy"] for r in seed_results]
    card = {
        "name": f"{info['dataset']}-candidate-{candidate.iteration:05d}", "candidate": candidate.iteration,
        "dataset": info["dataset"], "in_shape": "x".join(map(str, info["in_shape"])),
        "params": first["params"], "macs": candidate.result.macs, "val_accuracy_proxy": candidate.val_accuracy,
        "training": {"epochs": config.train.epochs, "schedule": config.train.schedule, "lr": config.train.lr,
                     "label_smoothing": config.train.label_smoothing, "train_images": first["train_images"],
                     "device": info["device"]},
        "test_accuracy": {"per_seed": {str(r["seed"]): r["test_accuracy"] for r in seed_results},
                          "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                          "onnx_fp32": _onnx_accuracy(fp32, reference),
                          "onnx_int8": _onnx_accuracy(int8, reference)},
        "file_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        "parity": first["parity"],
        "latency_ms": {
            "torch_eager": first["torch_latency_ms"],
            **{f"onnxruntime_{kind}_threads_{t}": bench(str(path), threads=t, runs=200, warmup=20)
               for kind, path in (("fp32", fp32), ("int8", int8)) for t in threads},
        },
        "environment": environment(),
        "artifacts": {"model.pt": "model.pt", "model.onnx": fp32.name, "model.int8.onnx": int8.name},
    }
    write_card(out_dir, card)
    return card

