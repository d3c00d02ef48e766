"""The loop driven by an OpenAI-compatible endpoint, end to end through the CLI: faults never stop it,
and the reply cache reproduces a run without the server."""

import json
import re

from .conftest import run_cli
from .fake_openai import FakeOpenAI, Response, delayed, error, garbage, reply

TEMPLATE = """Sure! Here is the improved model.
```python
class Net(nn.Module):
    def __init__(self, in_shape=(3, 16, 16), num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], {width}, 3, padding=1)
        self.fc = nn.Linear({width}, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))
```
This should train well."""


def responder(request) -> Response:
    system = request.messages[0]["content"]
    if "diagnose" in system:
        n = len(re.findall(r"^- iteration", request.messages[-1]["content"], re.M))
        return reply(json.dumps({"problem": "too narrow", "modification": f"widen to {8 + 4 * n} channels"}))
    widths = re.findall(r"Modification to apply: widen to (\d+)", request.messages[-1]["content"])
    return reply(TEMPLATE.format(width=widths[-1] if widths else 8), usage=(100, 50))


def config(tmp_path, url, cache_dir) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(f"""
dataset: {{name: synthetic, num_classes: 4, in_shape: [3, 16, 16], synthetic_size: 256, val_size: 64}}
train: {{batch_size: 64}}
eval: {{timeout_s: 60, latency_runs: 2}}
llm:
  generator: {{backend: openai, model: fake-model, base_url: "{url}", timeout_s: 1, retries: 1}}
  cache_dir: "{cache_dir}"
search: {{iterations: 4, history_size: 3}}
""")
    return str(path)


def test_endpoint_faults_never_stop_the_loop(tmp_path):
    with FakeOpenAI(responder) as fake:
        fake.script([error(500), garbage(), delayed(3.0)])  # iteration 0 fails for good; 1 times out once, then recovers
        proc = run_cli("search", "--config", config(tmp_path, fake.url, tmp_path / "cache"), "--run-dir", tmp_path / "run",
                       "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(run_cli("show", tmp_path / "run", "--json").stdout)
    assert [r["status"] for r in rows] == ["llm_error", "ok", "ok", "ok"]
    assert rows[2]["modification"].startswith("widen to") and rows[1]["tokens_in"] == 100
    assert rows[0]["failure_kind"] == "llm_error"
    assert any(r.body and r.body.get("seed") is not None for r in fake.requests)


def test_cached_replies_reproduce_a_run_without_the_server(tmp_path):
    with FakeOpenAI(responder) as fake:
        cfg = config(tmp_path, fake.url, tmp_path / "cache")
        first = run_cli("search", "--config", cfg, "--run-dir", tmp_path / "a", "--json")
        served = len(fake.requests)
    assert first.returncode == 0, first.stderr  # the server is gone now: every reply must come from the cache
    second = run_cli("search", "--config", cfg, "--run-dir", tmp_path / "b", "--json")
    assert second.returncode == 0, second.stderr
    a, b = (json.loads(run_cli("show", tmp_path / d, "--json").stdout) for d in ("a", "b"))
    assert served >= 7 and [r["status"] for r in b] == ["ok"] * 4
    assert [(r["code_hash"], r["val_accuracy"]) for r in a] == [(r["code_hash"], r["val_accuracy"]) for r in b]
