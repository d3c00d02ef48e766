"""search.executor ray on a two-node cluster on this machine (Ray's own cluster utilities): workers on both nodes,
one node killed mid-run, and the search still records every iteration exactly once."""

import json
import subprocess
import sys
import time

import pytest

from edgenas.archive import Archive

from .conftest import PROGRAMS
from .test_loop import search_config

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


def test_a_search_on_two_nodes_survives_losing_one(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker_node = cluster.add_node(num_cpus=1)
    try:
        config = search_config(tmp_path, llm={"generator": {"backend": "mutate"}},
                               search={"iterations": 10, "chains": 2, "workers": 2, "executor": "ray"},
                               ray={"address": cluster.address})
        run = tmp_path / "run"
        proc = subprocess.Popen([sys.executable, "-m", "edgenas.cli", "search", "--config", config, "--run-dir", str(run),
                                 "--seed-program", str(PROGRAMS / "good_cnn.py"), "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if Archive.exists(run) and len(Archive(run, readonly=True).recent(3)) >= 3:
                break
        assert proc.poll() is None, proc.communicate()
        started = json.loads((run / "events.jsonl").read_text().splitlines()[0])
        assert len({w["node"] for w in started["workers"]}) == 2  # one worker on each node
        cluster.remove_node(worker_node, allow_graceful=False)  # the node dies, whatever it was measuring
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        rows = Archive(run, readonly=True).all()
        assert [r.iteration for r in rows] == list(range(10)) and all(r.status != "pending" for r in rows)
        assert "crashed" not in {r.outcome.kind for r in rows}, [(r.iteration, r.outcome.diagnostic) for r in rows]
        assert json.loads(out)["iterations"] == 10
    finally:
        cluster.shutdown()
