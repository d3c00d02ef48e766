"""How far MACs stand in for latency across a search archive, and how finalized models run on onnxruntime.

1. Over every valid candidate of RUN_DIR: Spearman rank correlation of MACs (and of params) with the
   batch-1 latency the evaluator measured (onnxruntime, eval.latency_threads). A high value means MACs are a fair
   budget proxy on this CPU.
2. For every finalized model (RUN_DIR/final/*/card.json): onnxruntime fp32 and INT8 batch-1 latency as
   ratios to torch eager in the same finalize run, file-size ratio and accuracy lost to INT8.
   Targets: fp32 <= 0.3x eager; INT8 <= 0.8x fp32; file >= 3.5x smaller; <= 1 point lost.

    python benchmarks/archive_latency.py RUN_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS_DIR, machine_info, table

from edgenas.archive import Archive
from edgenas.history import spearman


def finalized_rows(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("final/*/card.json")):
        card = json.loads(path.read_text())
        lat, acc = card["latency_ms"], card["test_accuracy"]
        threads = sorted(int(k.rsplit("_", 1)[1]) for k in lat if k.startswith("torch_eager_threads_"))
        for t in threads:
            eager = lat[f"torch_eager_threads_{t}"]["p50_ms"]
            fp32, int8 = lat[f"onnxruntime_fp32_threads_{t}"]["p50_ms"], lat[f"onnxruntime_int8_threads_{t}"]["p50_ms"]
            rows.append({"candidate": card["candidate"], "threads": t, "eager_ms": eager, "fp32_ms": fp32, "int8_ms": int8,
                         "fp32_vs_eager": fp32 / eager, "int8_vs_fp32": int8 / fp32,
                         "size_ratio": card["file_bytes"]["fp32"] / card["file_bytes"]["int8"],
                         "int8_points_lost": 100 * (acc["onnx_fp32"] - acc["onnx_int8"])})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run_dir", type=Path)
    args = p.parse_args()
    archive = Archive(args.run_dir, readonly=True)
    valid = [c.result for c in archive.all() if c.status == "ok" and c.result.latency_ms]
    archive.close()
    macs, params, latency = ([getattr(r, f) for r in valid] for f in ("macs", "params", "latency_ms"))
    corr = {"n": len(valid), "spearman_macs_latency": spearman(macs, latency) if len(valid) > 2 else None,
            "spearman_params_latency": spearman(params, latency) if len(valid) > 2 else None}
    print(table(f"MACs vs batch-1 onnxruntime latency over {len(valid)} valid candidates", ["measure", "Spearman rho"],
                [["MACs", f"{corr['spearman_macs_latency']:.3f}" if corr["n"] > 2 else "-"],
                 ["params", f"{corr['spearman_params_latency']:.3f}" if corr["n"] > 2 else "-"]]))
    rows = finalized_rows(args.run_dir)
    if rows:
        print(table("finalized models, batch 1 (p50 ms)", ["cand", "thr", "eager", "ort fp32", "ort int8", "fp32/eager",
                                                            "int8/fp32", "size x", "pts lost"],
                    [[r["candidate"], r["threads"], f"{r['eager_ms']:.3f}", f"{r['fp32_ms']:.3f}", f"{r['int8_ms']:.3f}",
                      f"{r['fp32_vs_eager']:.2f}", f"{r['int8_vs_fp32']:.2f}", f"{r['size_ratio']:.2f}",
                      f"{r['int8_points_lost']:.2f}"] for r in rows]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "archive_latency.json"
    out.write_text(json.dumps({"script": "archive_latency", "run_dir": str(args.run_dir), "machine": machine_info(),
                               "correlation": corr, "finalized": rows,
                               "candidates": [{"macs": m, "params": q, "latency_ms": t} for m, q, t in zip(macs, params, latency, strict=True)]},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
