"""Full training of the chosen candidates, then export, INT8, test accuracy, latency and a model card.

Generated code runs only in the jail: a job trains one seed on the training and validation images (selection is
over) and hands back, through its pipe, a checkpoint after every epoch, the trained weights and the ONNX graph.
It never has the test split. This process (trusted) scores every seed's graph on the test images with
onnxruntime, quantizes, measures latency and writes every file of final/<iteration>/ itself, from a private
staging file moved into place; the jail writes nothing there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from edgenas import referee
from edgenas.config import load_config
from edgenas.records import FailureKind
from edgenas.sandbox import messages
from edgenas.sandbox.inside import ProxyJob, check_forward, classify, load_module_checked
from edgenas.sandbox.zygote import JailClient, Limits

FULL_TRAINING = ["train.schedule=cosine", "train.nesterov=true", "train.label_smoothing=0.1", "train.lr=0.05",
                 "train.amp=true"]  # the proxy's settings are for ranking; these are for a final model
MAX_CHECKPOINT_BYTES = 1 << 30


class FinalizeError(RuntimeError):
    pass


class FinalizeJob(ProxyJob):
    """Jail side: trains one candidate from scratch (resuming from a checkpoint it is handed), exports it."""

    parts = ("train", "val")

    def setup(self) -> None:
        super().setup()
        import torch

        from edgenas.data import Split

        val = self.data.val.to(self.torch_device)
        self.train_split = Split(torch.cat([self.train_split.images, val.images]),
                                 torch.cat([self.train_split.labels, val.labels]))

    def run(self, job: dict, payload: bytes, send) -> None:
        self.job = job
        self.setup()
        stage = "build"
        try:
            send({"kind": "stage", "stage": "build"})
            self.model, constructor = self._construct()
            stage = "train"
            send({"kind": "stage", "stage": "train"})
            model, info = self._train_full(payload, send)
            stage = "export"
            send({"kind": "stage", "stage": "export"})
            info.update(self._export(model, send))
        except BaseException as exc:  # noqa: BLE001 - the host reports it and moves on
            kind, message = classify(exc, stage)
            send({"kind": "result", "status": "failed", "stage": stage, "failure": {"kind": kind.value, "message": message}})
            return
        send({"kind": "result", "status": "ok", "stage": stage, "constructor": constructor, **info})

    def _construct(self):
        import torch

        from edgenas.candidate import construct

        torch.manual_seed(self.job["seed"])
        namespace = load_module_checked(self.job["code"])
        model, constructor = construct(namespace["Net"], self.data.in_shape, self.data.num_classes)
        check_forward(model, self.data.in_shape, self.data.num_classes)
        return model, constructor

    def _train_full(self, checkpoint: bytes, send):
        import math

        import torch

        from edgenas.data import Normalize
        from edgenas.train import build_optimizer, steps_per_epoch, train_epoch

        cfg = self.config.train.model_copy(update={"seed": self.job["seed"]})
        channels_last = cfg.channels_last and self._channels_last_works()
        model = self.model.to(self.torch_device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        normalize = Normalize(self.data.mean, self.data.std, self.torch_device, channels_last)
        epochs = math.ceil(cfg.epochs)
        optimizer, scheduler = build_optimizer(model, cfg, epochs * steps_per_epoch(len(self.train_split), cfg.batch_size))
        generator = torch.Generator().manual_seed(cfg.seed)
        start_epoch, history = 0, []
        if checkpoint:
            state = torch.load(io.BytesIO(checkpoint), weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            start_epoch, history = state["epoch"], state["history"]
        for epoch in range(start_epoch, epochs):
            stats = train_epoch(model, optimizer, scheduler, self.train_split, normalize, cfg, generator)
            history.append({"epoch": epoch + 1, "loss": stats.loss_mean, "seconds": stats.seconds})
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "epoch": epoch + 1, "history": history}
            send({"kind": "checkpoint", "epoch": epoch + 1}, _to_bytes(state))
            send({"kind": "progress", "epoch": epoch + 1, "epochs": epochs, "loss": stats.loss_mean})
        model = model.cpu().to(memory_format=torch.contiguous_format).eval()
        return model, {"train_images": len(self.train_split), "train_loss_last": history[-1]["loss"] if history else None}

    def _export(self, model, send) -> dict:
        """Weights and the graph go back through the pipe; parity against PyTorch on training images is this job's
        own check that the export is faithful (the test score is the host's, on the graph)."""
        import numpy as np
        import torch

        from edgenas.data import Normalize
        from exporters.onnx_export import check_parity, export_onnx, parity

        send({"kind": "weights"}, _to_bytes(model.state_dict()))
        path = export_onnx(model, self.data.in_shape, Path(tempfile.mkdtemp()) / "model.onnx")
        images = Normalize(self.data.mean, self.data.std, "cpu")(self.data.train.images[:1000])
        report = check_parity(parity(model, path, images))
        send({"kind": "graph", "trained": True}, path.read_bytes())
        latency = {}  # flat keys: the Result schema holds a dict of floats
        for threads in sorted({1, len(os.sched_getaffinity(0))}):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for _ in range(10):
                    model(images[:1])
                times = []
                for _ in range(100):
                    start = time.perf_counter()
                    model(images[:1])
                    times.append((time.perf_counter() - start) * 1000)
            p50, p90 = np.percentile(times, [50, 90])
            latency |= {f"threads_{threads}_p50": float(p50), f"threads_{threads}_p90": float(p90)}
        return {"parity": report, "torch_latency_ms": latency}


def _to_bytes(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- host side


def publish(path: Path, data: bytes) -> None:
    """Write a file of final/ atomically: a private staging file in the same folder, then a rename over the name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_regular(path: Path, max_bytes: int) -> bytes | None:
    """A file's bytes if it is a regular file (never through a link) of at most `max_bytes`, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not (info.st_mode & 0o170000 == 0o100000) or info.st_size > max_bytes:
            return None
        return f.read(max_bytes + 1)[:max_bytes]


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

    run_dir = Path(run_dir).resolve()
    config = load_config(run_dir / "config.yaml", [*FULL_TRAINING, f"train.epochs={epochs}", *overrides])
    archive = Archive(run_dir, readonly=True)
    try:
        chosen = choose(archive, config.budget, top, ids)
    finally:
        archive.close()
    reference = _reference_images(config)
    ev = config.eval
    limits = Limits(timeout_s=timeout_s, memory_limit_mb=ev.memory_limit_mb, output_limit_bytes=ev.output_limit_bytes,
                    disk_limit_mb=ev.disk_limit_mb, max_files=ev.max_files, max_payload_bytes=MAX_CHECKPOINT_BYTES,
                    allow_unconfined=ev.allow_unconfined)
    cards = []
    train = config.train.model_dump(mode="json", exclude={"seed"})
    with JailClient("exporters.finalize:FinalizeJob", {"config": config.model_dump(mode="json")}, limits) as jail:
        if jail.info["device"] != "cpu":
            jail.limits = Limits(**{**limits.__dict__, "memory_limit_mb": None})
        for candidate in chosen:
            out_dir = run_dir / "final" / f"{candidate.iteration:05d}"
            out_dir.mkdir(parents=True, exist_ok=True)
            settings = _fingerprint(train, config.dataset.model_dump(mode="json"), epochs, candidate.code)
            seed_results = [_train_seed(jail, candidate, seed, epochs, settings, out_dir, reference, on_progress)
                            for seed in seeds]
            cards.append(_measure_and_card(candidate, seed_results, out_dir, config, jail.info))
    return cards


def _fingerprint(train: dict, dataset: dict, epochs: int, code: str) -> str:
    """What a seed's result depends on: a finished seed or a checkpoint is reused only when this matches."""
    settings = {"train": train, "dataset": dataset, "epochs": epochs,
                "code": hashlib.sha256(code.encode()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    """A JSON object this process wrote earlier; {} when it is missing, a link, damaged or not an object."""
    try:
        value = json.loads(read_regular(path, 1 << 20) or b"null")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _train_seed(jail, candidate, seed: int, epochs: int, settings: str, out_dir: Path, reference: dict,
                on_progress) -> dict:
    done = _read_json(out_dir / f"seed{seed}.json")
    if done.get("settings") == settings:  # finished in an earlier, interrupted finalize with the same settings
        return done
    checkpoint_path, side_path = out_dir / f"seed{seed}.ckpt", out_dir / f"seed{seed}.ckpt.json"
    resume = b""
    if _read_json(side_path).get("settings") == settings:
        resume = read_regular(checkpoint_path, MAX_CHECKPOINT_BYTES) or b""
    else:  # trained with other settings (or its side file never written): start over
        checkpoint_path.unlink(missing_ok=True)
        side_path.unlink(missing_ok=True)
    got: dict = {"graph": b"", "weights": b"", "result": None, "bad": None, "seen": set(), "epoch": 0}

    def on_message(header: dict, payload: bytes):
        if got["bad"]:
            return "cancel"  # the first broken message is the one reported
        try:
            message = messages.parse(header)
            once = isinstance(message, messages.Graph | messages.Weights | messages.Result) and type(message)
            if once and once in got["seen"]:
                raise ValueError(f"the job sent a second '{message.kind}' message")
            if isinstance(message, messages.Checkpoint) and not got["epoch"] < message.epoch <= epochs:
                raise ValueError(f"the job sent a checkpoint for epoch {message.epoch} after {got['epoch']} of {epochs}")
        except ValueError as e:
            got["bad"] = str(e)
            return "cancel"
        got["seen"].add(once)
        if isinstance(message, messages.Checkpoint):
            got["epoch"] = message.epoch
            publish(checkpoint_path, payload)  # then its side file: a checkpoint without one is never resumed
            publish(side_path, json.dumps({"settings": settings, "epoch": message.epoch}).encode())
        elif isinstance(message, messages.Progress) and on_progress:
            on_progress(candidate.iteration, {"seed": seed, "epoch": message.epoch, "epochs": message.epochs,
                                              "loss": message.loss})
        elif isinstance(message, messages.Graph):
            got["graph"] = payload
        elif isinstance(message, messages.Weights):
            got["weights"] = payload
        elif isinstance(message, messages.Result | messages.Error):
            got["result"] = message
        return None

    report = jail.run({"code": candidate.code, "seed": seed}, on_message, resume)
    result = got["result"]
    where = f"candidate {candidate.iteration}, seed {seed}"
    if got["bad"]:
        raise FinalizeError(f"{where}: crashed: {got['bad']}")
    if isinstance(result, messages.Result) and result.status == "failed":
        raise FinalizeError(f"{where}: {result.failure.kind.value}: {result.failure.message.strip().splitlines()[-1]}")
    if report.get("timed_out") and not isinstance(result, messages.Result):
        raise FinalizeError(f"{where}: {FailureKind.timeout.value}: not trained and exported within the "
                            f"{jail.limits.timeout_s:g} s limit (finalize --timeout); {got['epoch']} epochs were saved")
    if not isinstance(result, messages.Result) or not got["graph"]:
        from edgenas.worker import exit_failure

        kind, why = exit_failure(report, "training", jail.limits.timeout_s)
        if isinstance(result, messages.Error):
            why = result.message.strip().splitlines()[-1]
        tail = report.get("output_tail", "").strip().splitlines()[-3:]
        raise FinalizeError(f"{where}: {kind.value}: {why} (exit code {report.get('exit_code')}, signal "
                            f"{report.get('signal')}){'; output: ' + ' | '.join(tail) if tail else ''}")
    if result.parity is None or result.train_images is None:
        raise FinalizeError(f"{where}: crashed: the job's result lacks its parity check or its count of training images")
    try:
        graph = referee.load(got["graph"], tuple(jail.info["in_shape"]), jail.info["num_classes"])
        accuracy, loss = _onnx_accuracy(got["graph"], reference)
    except referee.GraphError as e:
        raise FinalizeError(f"{where}: {FailureKind.export.value}: {e}") from None
    int8 = _quantize(got["graph"], reference)
    summary = {"seed": seed, "settings": settings, "test_accuracy": accuracy, "test_loss": loss,
               "test_accuracy_int8": _onnx_accuracy(int8, reference)[0], "train_images": result.train_images,
               "params": referee.inspect(graph, reference["probe"]).params, "parity": result.parity,
               "torch_latency_ms": result.torch_latency_ms, "isolation": report.get("isolation", [])}
    publish(out_dir / f"model-seed{seed}.onnx", got["graph"])
    publish(out_dir / f"model-seed{seed}.int8.onnx", int8)
    publish(out_dir / f"model-seed{seed}.pt", got["weights"])
    publish(out_dir / f"seed{seed}.json", json.dumps(summary).encode())
    checkpoint_path.unlink(missing_ok=True)
    side_path.unlink(missing_ok=True)
    return summary


def _quantize(graph: bytes, reference: dict) -> bytes:
    """The static INT8 copy of a checked graph, calibrated on training images."""
    from exporters.quantize import quantize_int8

    with tempfile.TemporaryDirectory(prefix="edgenas-int8-") as staging:
        fp32 = Path(staging) / "model.onnx"
        fp32.write_bytes(graph)
        return quantize_int8(fp32, Path(staging) / "model.int8.onnx", reference["calibration"]).read_bytes()


def _reference_images(config) -> dict:
    """Calibration (training images) and test images for the host's ONNX work, loaded once for every candidate."""
    import torch

    from edgenas.data import load_data

    data = load_data(config.dataset, ("train", "test"))
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:256]
    calibration = referee.normalize(data.train.images[pick].numpy(), data.mean, data.std)
    return {"calibration": calibration, "probe": calibration[:1], "test_images": data.test.images.numpy(),
            "test_labels": data.test.labels.numpy(), "mean": data.mean, "std": data.std}


def _onnx_accuracy(graph: bytes, reference: dict) -> tuple[float, float]:
    session = referee.session(graph, len(os.sched_getaffinity(0)))
    return referee.score(session, reference["test_images"], reference["test_labels"], reference["mean"],
                         reference["std"], batch_size=256)


def _measure_and_card(candidate, seed_results, out_dir: Path, config, info) -> dict:
    import numpy as np

    from exporters.bench import available_cores, bench
    from exporters.card import environment, write_card

    first = seed_results[0]
    fp32, int8 = out_dir / "model.onnx", out_dir / "model.int8.onnx"
    for name in ("model.onnx", "model.int8.onnx", "model.pt"):  # the first seed's model is the one shipped
        publish(out_dir / name, (out_dir / name.replace("model", f"model-seed{first['seed']}", 1)).read_bytes())
    threads = sorted({1, available_cores()})
    accuracies = [r["test_accuracy"] for r in seed_results]
    int8_accuracies = [r["test_accuracy_int8"] for r in seed_results]
    card = {
        "name": f"{info['dataset']}-candidate-{candidate.iteration:05d}", "candidate": candidate.iteration,
        "shipped_seed": first["seed"],
        "dataset": info["dataset"], "in_shape": "x".join(map(str, info["in_shape"])),
        "params": first["params"], "macs": candidate.result.macs, "val_accuracy_proxy": candidate.val_accuracy,
        "training": {"epochs": config.train.epochs, "schedule": config.train.schedule, "lr": config.train.lr,
                     "label_smoothing": config.train.label_smoothing, "train_images": first["train_images"],
                     "device": info["device"], "isolation": first["isolation"]},
        "test_accuracy": {"per_seed": {str(r["seed"]): r["test_accuracy"] for r in seed_results},
                          "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                          "int8_per_seed": {str(r["seed"]): r["test_accuracy_int8"] for r in seed_results},
                          "int8_mean": float(np.mean(int8_accuracies)), "int8_std": float(np.std(int8_accuracies)),
                          "onnx_fp32": first["test_accuracy"], "onnx_int8": first["test_accuracy_int8"]},
        "file_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        "parity": first["parity"],
        "latency_ms": {
            **{f"torch_eager_threads_{t}": {"p50_ms": first["torch_latency_ms"][f"threads_{t}_p50"],
                                            "p90_ms": first["torch_latency_ms"][f"threads_{t}_p90"]}
               for t in sorted({int(k.split("_")[1]) for k in first["torch_latency_ms"]})},
            **{f"onnxruntime_{kind}_threads_{t}": bench(str(path), threads=t, runs=200, warmup=20)
               for kind, path in (("fp32", fp32), ("int8", int8)) for t in threads},
        },
        "environment": environment(),
        "artifacts": {"model.pt": "model.pt", "model.onnx": fp32.name, "model.int8.onnx": int8.name},
    }
    write_card(out_dir, card, publish)
    return card
