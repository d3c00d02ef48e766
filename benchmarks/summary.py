"""One line per result in benchmarks/results: the commit it ran on, whether the tree was clean, its target and
verdict, so the README's results table can be checked against the files.

    python benchmarks/summary.py
"""

from __future__ import annotations

import json

from common import RESULTS_DIR, table


def main() -> None:
    rows = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        machine = data.get("machine", {})
        dirty = machine.get("git_dirty")
        verdict = {True: "met", False: "MISSED", None: "n/a"}.get(data.get("passed"), "n/a")
        rows.append([path.stem, (machine.get("git_commit") or "?")[:10], "?" if dirty is None else "clean" if not dirty else "DIRTY",
                     (data.get("target") or "-")[:70], verdict])
    print(table("benchmark results", ["result", "commit", "tree", "target", "verdict"], rows))


if __name__ == "__main__":
    main()
