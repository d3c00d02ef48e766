"""Replies cut off at the token limit are recorded as `truncated`, never trimmed into another program and evaluated,
and the next prompt tells the LLM its reply was cut off."""

from edgenas.archive import Archive

from .conftest import run_cli
from .fake_openai import FakeOpenAI, reply
from .test_search_openai import TEMPLATE, config, responder

WHOLE = TEMPLATE.format(width=8).split("```python\n")[1].split("```")[0]
HEAD = WHOLE.split("    def forward")[0]  # parses on its own: a Net with no forward


def test_cut_off_replies_are_truncated_and_the_llm_is_told(tmp_path):
    by_length = f"Here it is:\n```python\n{HEAD}"  # the server says finish_reason=length
    by_syntax = f"```python\n{HEAD}    def forward(self, x):\n        return self.fc(F.relu(self.conv(x)).mean((2,"
    with FakeOpenAI(responder) as fake:
        fake.script([reply(by_length, finish_reason="length"), reply(by_syntax)])
        cfg = config(tmp_path, fake.url, tmp_path / "cache")
        proc = run_cli("search", "--config", cfg, "--run-dir", tmp_path / "run", "--set", "search.iterations=3")
        prompts = [r.messages[-1]["content"] for r in fake.requests]
    assert proc.returncode == 0, proc.stderr
    archive = Archive(tmp_path / "run")
    first, second, third = archive.all()
    archive.close()
    assert [c.status for c in (first, second, third)] == ["truncated", "truncated", "ok"]
    for candidate, came in ((first, HEAD), (second, by_syntax.removeprefix("```python\n"))):
        assert candidate.outcome.kind == "truncated"
        assert "cut off at the token limit (2048" in candidate.outcome.diagnostic
        assert candidate.result is None and candidate.code == came.rstrip() + "\n"  # kept as it came, not evaluated
    assert "cut off" not in prompts[0] and "FAILED (truncated): your reply was cut off" in prompts[1]
    assert prompts[2].count("FAILED (truncated)") == 2
