"""Model cards: the numbers behind a shipped model, as card.json for tools and card.md for people.

The markdown is rendered from whatever the card holds, so a caller adds a section by adding a key:
top-level scalars form a summary table, a dict becomes a section (a table of its scalars, a table with
one row per entry when its values are dicts, sub-sections otherwise), a list of dicts becomes a table.
"""

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


def _scalar(value) -> bool:
    return not isinstance(value, dict | list)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(_fmt, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _title(key: str) -> str:
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(map(_fmt, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(_fmt, row)) + " |" for row in rows]


def _rows_table(entries: dict | list) -> list[str]:
    """One row per entry of a dict of dicts (first column the key) or of a list of dicts."""
    items = list(entries.items()) if isinstance(entries, dict) else [(None, e) for e in entries]
    columns = list(dict.fromkeys(k for _, row in items for k in row))
    lead = [""] if isinstance(entries, dict) else []
    return _table(lead + [_title(c) for c in columns],
                  [([key] if isinstance(entries, dict) else []) + [row.get(c) for c in columns] for key, row in items])


def _section(key: str, value, depth: int) -> list[str]:
    lines = ["", "#" * depth + " " + _title(key), ""]
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and all(map(_scalar, v.values())) for v in value):
            return lines + _rows_table(value)
        return lines + [f"- {_fmt(v) if _scalar(v) else json.dumps(v)}" for v in value]
    scalars = {k: v for k, v in value.items() if _scalar(v)}
    nested = {k: v for k, v in value.items() if not _scalar(v)}
    if nested and not scalars and all(isinstance(v, dict) and all(map(_scalar, v.values())) for v in nested.values()):
        return lines + _rows_table(nested)
    if scalars:
        lines += _table(["", "value"], [[_title(k), v] for k, v in scalars.items()])
    for k, v in nested.items():
        lines += _section(k, v, min(depth + 1, 6))
    return lines


def render_markdown(card: dict) -> str:
    """The card as markdown; section order is the card's key order."""
    name = card.get("name") or card.get("candidate") or "model"
    lines = [f"# Model card: {name}"]
    summary = {k: v for k, v in card.items() if _scalar(v) and k != "name"}
    if summary:
        lines += ["", *_table(["", "value"], [[_title(k), v] for k, v in summary.items()])]
    for key, value in card.items():
        if not _scalar(value):
            lines += _section(key, value, 2)
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
