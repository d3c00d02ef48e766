"""Model cards: the numbers behind a shipped model, as card.json for tools and card.md for people."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from exporters.bench import available_cores, cpu_model

PACKAGES = ("edgenas", "torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "numpy")


def environment() -> dict:
    """Versions, CPU and date, read without importing torch (installed package metadata only)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {**versions, "python": platform.python_version(), "cpu": cpu_model(), "cores": available_cores(),
            "platform": platform.platform(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _plain(value):
    """JSON fallback for numpy scalars and arrays, paths and anything else printable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value) if isinstance(value, os.PathLike) else repr(value)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def render_markdown(card: dict) -> str:
    """card.md: what the model is, how good and how fast it is, how it was made, and what the numbers do not say."""
    acc, train, env, files = card["test_accuracy"], card["training"], card["environment"], card["file_bytes"]
    seeds = sorted(acc["per_seed"], key=int)
    lines = [
        f"# {card['name']}", "",
        f"An image classifier for {card['dataset']} (input {card['in_shape']}) with {card['params']:,} parameters and "
        f"{card['macs'] / 1e6:.1f}M multiply-adds per image: candidate {card['candidate']} of an edgenas search, "
        f"trained from scratch for {train['epochs']:g} epochs with {len(seeds)} seed(s). Test accuracy "
        f"{_pct(acc['mean'])} in fp32 and {_pct(acc['int8_mean'])} in INT8 (mean over seeds); the shipped files are "
        f"seed {card['shipped_seed']}'s.", "",
        "## Files", "",
        *_table(["file", "what", "size"], [
            ["`model.onnx`", "ONNX fp32, batch axis dynamic, checked against PyTorch", _size(files["fp32"])],
            ["`model.int8.onnx`", "ONNX static INT8 (QDQ, per-channel weights, calibrated on training images)",
             _size(files["int8"])],
            ["`model.pt`", "PyTorch state dict, for fine-tuning", ""],
            ["`model-seed<S>.*`", "the same for every seed", ""],
            ["`card.json`", "everything on this card, for tools", ""]]),
        "", "## Accuracy on the test split", "",
        *_table(["seed", "fp32", "INT8"], [[s, _pct(acc["per_seed"][s]), _pct(acc["int8_per_seed"][s])] for s in seeds]
                + [["mean (std)", f"{_pct(acc['mean'])} ({100 * acc['std']:.2f})",
                    f"{_pct(acc['int8_mean'])} ({100 * acc['int8_std']:.2f})"]]),
        "", f"In the search, its proxy accuracy on a validation split held out from the training images was "
        f"{_pct(card['val_accuracy_proxy'])}.",
        "", f"## Latency, batch 1, on this machine ({env['cpu']}, {env['cores']} cores)", "",
        *_table(["runtime", "threads", "p50 ms", "p90 ms"],
                [[name.rsplit("_threads_", 1)[0].replace("_", " "), name.rsplit("_", 1)[1], f"{v['p50_ms']:.3f}",
                  f"{v['p90_ms']:.3f}"] for name, v in card["latency_ms"].items()]),
        "", "## How it was trained", "",
        f"{train['epochs']:g} epochs over {train['train_images']:,} training images on {train['device']}: SGD, "
        f"lr {train['lr']:g}, {train['schedule']} schedule, label smoothing {train['label_smoothing']:g}. The "
        f"candidate's code ran in the edgenas jail ({', '.join(train['isolation']) or 'no isolation recorded'}); "
        f"the test split never entered it. Export parity against PyTorch on {int(card['parity']['n']):,} images: max "
        f"|logit difference| {card['parity']['max_abs_diff']:.2g}, top-1 agreement "
        f"{card['parity']['top1_agreement']:.2%}.",
        "", "## Limits of these numbers", "",
        "- Test accuracy is measured once, after the search chose this model on a validation split held out from "
        "the training images; the test split played no part in the choice.",
        "- Latency is this machine's, not your device's: measure it there with "
        "`python -m exporters.bench model.int8.onnx --threads N`.",
        "- INT8 accuracy depends on the calibration images (256 from the training split).",
        "", "## Environment", "",
        *_table(["", "version"], [[k, v or "-"] for k, v in env.items()]),
    ]
    return "\n".join(lines) + "\n"


def write_card(directory: str | Path, card: dict, write=None) -> tuple[Path, Path]:
    """Write card.json and card.md into `directory` (created if missing); both say the same thing.

    `write(path, bytes)` does the writing (finalize's atomic publish); plain writes by default.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write = write or (lambda path, data: path.write_bytes(data))
    text = json.dumps(card, indent=2, default=_plain)
    json_path, md_path = directory / "card.json", directory / "card.md"
    write(json_path, (text + "\n").encode())
    write(md_path, render_markdown(json.loads(text)).encode())
    return json_path, md_path
