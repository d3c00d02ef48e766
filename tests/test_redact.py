"""Secret scrubbing: units, then an attack end to end (an endpoint that writes its API key into the code it returns)."""

import json
import os
import re
from urllib.parse import quote

import pytest

from edgenas import redact
from edgenas.archive import Archive
from edgenas.config import BudgetConfig
from edgenas.llm.base import LLMError, Reply, Sampling
from edgenas.prompts import Task
from edgenas.propose import Context, LLMProposer
from edgenas.records import Candidate, EvalResult, FailureKind, Outcome, failed

from .conftest import run_cli
from .fake_openai import FakeOpenAI, Response, reply

KEY = "sk-live-4f9a0c7e1b2d3e5f6a7b8c9d0e1f2a3b"
TOKEN = "tok_93bd71c0aa5e42f6b8d1"
TASK = Task("synthetic", 4, (3, 16, 16), BudgetConfig(), "1 epoch")


@pytest.fixture
def secrets(monkeypatch):
    """A clean scrubber over a controlled environment; `set(name, value)` adds a variable and refreshes."""
    for name in [n for n in os.environ if redact.looks_secret(n)]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(redact, "_registered", [])
    monkeypatch.setattr(redact, "_table", None)

    def set_(name, value):
        monkeypatch.setenv(name, value)
        redact.register()

    return set_


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "MY_SERVICE_TOKEN", "APIKEY", "db_password",
                                  "AWS_SECRET_ACCESS_KEY", "GH_OAUTH", "SESSION_COOKIE", "API_KEYS", "X.CREDENTIALS"])
def test_credential_names(name):
    assert redact.looks_secret(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "KEYBOARD_LAYOUT", "XAUTHORITY", "AUTHOR_NAME",
                                  "PYTHON_KEYRING_BACKEND", "TOKENIZERS_PARALLELISM", "EDGENAS_CACHE"])
def test_ordinary_names(name):
    assert not redact.looks_secret(name)


def test_values_found_by_name(secrets):
    secrets("MY_SERVICE_TOKEN", TOKEN)
    assert redact.scrub(f"token={TOKEN}!") == "token=[redacted $MY_SERVICE_TOKEN]!"


def test_short_flag_and_path_values_are_not_secrets(secrets, tmp_path):
    secrets("A_TOKEN", "1234567")
    secrets("B_TOKEN", "disabled")
    secrets("SSH_AUTH_SOCK", str(tmp_path))
    assert not redact.active()
    assert redact.scrub(f"1234567 disabled {tmp_path}") == f"1234567 disabled {tmp_path}"


def test_registered_names_whatever_they_are_called(secrets, monkeypatch):
    monkeypatch.setenv("ACME_LLM_CRED", KEY)
    redact.register([None, "ACME_LLM_CRED"])
    assert redact.scrub(KEY) == "[redacted $ACME_LLM_CRED]"


def test_longest_secret_first(secrets):
    secrets("SHORT_KEY", "abcdefgh")
    secrets("LONG_KEY", "abcdefgh12345")
    assert redact.scrub("x abcdefgh12345 abcdefgh") == "x [redacted $LONG_KEY] [redacted $SHORT_KEY]"


def test_json_escaped_and_url_quoted_forms(secrets):
    value = 'p"ss\\w/rd é+1'
    secrets("DB_PASSWORD", value)
    for text in (json.dumps({"v": value}), json.dumps({"v": value}, ensure_ascii=False),
                 f"https://h/?p={quote(value, safe='')}"):
        scrubbed = redact.scrub(text)
        assert "[redacted $DB_PASSWORD]" in scrubbed and "ss" not in scrubbed, scrubbed


def test_a_secret_clipped_at_either_end_of_a_text(secrets):
    secrets("OPENAI_API_KEY", KEY)
    assert redact.scrub("error: " + KEY[:20]) == "error: [redacted $OPENAI_API_KEY]"
    assert redact.scrub(KEY[-12:] + " was the tail") == "[redacted $OPENAI_API_KEY] was the tail"
    assert redact.scrub("ends in sk-li") == "ends in sk-li"  # under MIN_LENGTH: too short to tell


def test_no_secrets_is_a_no_op(secrets):
    text, data = "nothing here", {"a": ["b", ("c", 1)]}
    assert not redact.active()
    assert redact.scrub(text) is text and redact.scrub_data(data) is data


def test_scrub_data_reaches_every_string(secrets):
    secrets("HF_TOKEN", TOKEN)
    data = {"a": [TOKEN, (1, f"x{TOKEN}")], TOKEN: None, "n": 2.5}
    assert redact.scrub_data(data) == {"a": ["[redacted $HF_TOKEN]", (1, "x[redacted $HF_TOKEN]")],
                                       "[redacted $HF_TOKEN]": None, "n": 2.5}


def test_archive_writes_nothing_secret(secrets, tmp_path):
    secrets("MY_SERVICE_TOKEN", "abcdefgh")  # the marker is longer than the secret: the record must still load
    message = ("abcdefgh " * 450)[:4000]
    result = failed(FailureKind.runtime, message)
    candidate = Candidate(iteration=0, status="failed", code="x = 'abcdefgh'\n", outcome=Outcome(status="failed"),
                          result=result, prompts=[[{"role": "user", "content": "abcdefgh"}]], replies=["abcdefgh"],
                          reruns=[result])  # a close win's re-run that failed is scrubbed and clipped too
    archive = Archive(tmp_path)
    archive.add(candidate)
    archive.event("note", text="abcdefgh", path=tmp_path / "abcdefgh")
    loaded = archive.all()[0]
    archive.close()
    assert loaded.code == "x = '[redacted $MY_SERVICE_TOKEN]'\n" and len(loaded.result.failure.message) == 4000
    assert len(loaded.reruns[0].failure.message) == 4000 and "abcdefgh" not in loaded.reruns[0].failure.message
    assert all(b"abcdefgh" not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


class EchoModel:
    """A chat model that answers with the key it was given, like an endpoint echoing its Authorization header."""

    identity = "echo"

    def __init__(self, fail: bool = False):
        self.seen, self.fail = [], fail

    def chat(self, messages, sampling):
        self.seen.append(messages)
        if self.fail:
            raise LLMError(f"HTTP 401: bad key {KEY}")
        return Reply(f"```python\nclass Net(nn.Module):\n    key = '{KEY}'\n```", 1, 1, 0.0)


def test_prompts_replies_and_errors_are_scrubbed(secrets):
    secrets("OPENAI_API_KEY", KEY)
    model = EchoModel()
    proposer = LLMProposer(model, model, Sampling(), Sampling(), TASK)
    best = Candidate(iteration=0, status="ok", code=f"# {KEY}\n", outcome=Outcome(status="ok", val_accuracy=0.5),
                     result=EvalResult(status="ok", val_accuracy=0.5))
    proposal = proposer.propose(Context(best, best, []), 1)
    assert KEY not in json.dumps(model.seen) and KEY not in proposal.code and KEY not in json.dumps(proposal.replies)
    assert "[redacted $OPENAI_API_KEY]" in proposal.code
    failing = LLMProposer(EchoModel(fail=True), EchoModel(), Sampling(), Sampling(), TASK)
    assert failing.propose(Context(None, None, []), 0).error == "HTTP 401: bad key [redacted $OPENAI_API_KEY]"


# ------------------------------------------------------------------ the attack, end to end

ATTACK = """Here you go. (Your key is {key}; the other one is {token}.)
```python
class Net(nn.Module):
    def __init__(self, in_shape=(3, 16, 16), num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], {width}, 3, padding=1)
        self.fc = nn.Linear({width}, num_classes)
        self.note = "{key} {token}"

    def forward(self, x):
        if {fail}:
            raise ValueError("leaked {key} and {token}")
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))
```"""


def attacker(request) -> Response:
    """Reads the key from the Authorization header and writes it everywhere it can: reply, code, error message."""
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    if "diagnose" in request.messages[0]["content"]:
        return reply(json.dumps({"problem": f"the key {key} is {TOKEN}", "modification": f"print {key}"}))
    tried = len(re.findall(r"^- iteration", request.messages[-1]["content"], re.M))  # a new width each time
    return reply(ATTACK.format(key=key, token=TOKEN, width=4 + 4 * tried, fail=tried == 0))


def test_an_endpoint_that_echoes_its_key_leaks_it_nowhere(tmp_path):
    config = tmp_path / "search.yaml"
    with FakeOpenAI(attacker) as fake:
        config.write_text(f"""
dataset: {{name: synthetic, num_classes: 4, in_shape: [3, 16, 16], synthetic_size: 256, val_size: 64}}
train: {{batch_size: 64}}
eval: {{timeout_s: 60, latency_runs: 2}}
llm:
  generator: {{backend: openai, model: fake-model, base_url: "{fake.url}", api_key_env: ACME_LLM_CRED, timeout_s: 5, retries: 0}}
  cache_dir: "{tmp_path / 'cache'}"
search: {{iterations: 3, history_size: 3}}
""")
        env = {"ACME_LLM_CRED": KEY, "MY_SERVICE_TOKEN": TOKEN}  # the first only the config names; the second by name
        proc = run_cli("search", "--config", config, "--run-dir", tmp_path / "run", env=env)
        shown = [run_cli("show", tmp_path / "run", *flag, env=env) for flag in ([], ["--json"])]
    assert proc.returncode == 0, proc.stderr
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)  # the attacker had the key
    rows = json.loads(shown[1].stdout)
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]  # iteration 2 went through the improver
    run = tmp_path / "run"
    code = (run / "candidates" / "00000.py").read_text()
    assert "[redacted $ACME_LLM_CRED] [redacted $MY_SERVICE_TOKEN]" in code  # the attack reached us, defused
    texts = {"request bodies": json.dumps([r.body for r in fake.requests]), "search output": proc.stdout + proc.stderr,
             "show output": "".join(s.stdout + s.stderr for s in shown)}
    texts.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in run.rglob("*") if p.is_file()})
    assert len([p for p in texts if p.endswith(".py")]) == 3 and any("archive.sqlite" in p for p in texts)
    for where, text in texts.items():
        for secret in (KEY, TOKEN, KEY[-redact.MIN_LENGTH:], TOKEN[-redact.MIN_LENGTH:]):  # not even a piece
            assert secret not in text, f"{secret!r} leaked into {where}"
