"""LLM faults that cannot pass end a search with one line: a wrong URL, model or key before the first iteration
(exit 2), an endpoint that keeps failing after search.max_llm_errors iterations (exit 3). Cached replies still
replay without the server."""

import json
import socket

import pytest

from edgenas.config import LLMConfig
from edgenas.llm import LLMSetupError, Sampling
from edgenas.llm.cache import CachedChat
from edgenas.llm.openai_backend import OpenAIChat

from .conftest import run_cli
from .fake_openai import FakeOpenAI, error, fake_openai  # noqa: F401 (fixture)
from .test_search_openai import config, responder

MESSAGES = [{"role": "user", "content": "Write a model."}]


def dead_url() -> str:
    """A local port with nothing listening: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def chat(url, **cfg) -> OpenAIChat:
    return OpenAIChat(LLMConfig(**{"backend": "openai", "model": "fake-model", "base_url": url, **cfg}), backoff_s=0.01)


def test_check_passes_a_good_endpoint(fake_openai):  # noqa: F811
    chat(fake_openai.url).check()
    assert [r.method for r in fake_openai.requests] == []  # GET /models only: no completion was spent


@pytest.mark.parametrize(("make", "message"), [
    (lambda fake: chat(fake.url, model="no-such-model", api_key_env="EDGENAS_RIGHT_KEY"),
     r"model 'no-such-model' is not served at .*; it serves: fake-model"),
    (lambda fake: chat(fake.url, api_key_env="EDGENAS_TEST_KEY"),
     r"the key in \$EDGENAS_TEST_KEY was rejected .*HTTP 401"),
    (lambda fake: chat(fake.url), r"wants a key \(HTTP 401\): .*llm.api_key_env"),
    (lambda fake: chat(dead_url()), r"cannot reach the LLM endpoint http://127\.0\.0\.1:\d+/v1 \(.*\)"),
])
def test_check_says_what_is_wrong_in_one_line(monkeypatch, make, message):
    monkeypatch.setenv("EDGENAS_TEST_KEY", "sk-wrong")
    monkeypatch.setenv("EDGENAS_RIGHT_KEY", "sk-right")
    with FakeOpenAI(api_key="sk-right") as fake:
        with pytest.raises(LLMSetupError, match=message) as caught:
            make(fake).check()
    assert "\n" not in str(caught.value)


def test_cache_checks_the_server_only_before_the_first_miss(fake_openai, tmp_path):  # noqa: F811
    cached = CachedChat(chat(fake_openai.url), tmp_path / "c.sqlite")
    cached.chat(MESSAGES, Sampling())
    replay = CachedChat(chat(dead_url()), tmp_path / "c.sqlite")
    replay.check()
    assert replay.chat(MESSAGES, Sampling()).cached  # no server needed for what the cache holds
    with pytest.raises(LLMSetupError, match="cannot reach"):
        replay.chat(MESSAGES, Sampling(seed=1))


def search(tmp_path, url, *args, env=None):
    return run_cli("search", "--config", config(tmp_path, url, tmp_path / "cache"), "--run-dir", tmp_path / "run",
                   *args, env=env)


def one_line_error(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(("setting", "env", "message"), [
    ([], {}, "cannot reach the LLM endpoint {dead}"),  # cache on: the check waits for the first miss
    (["--no-cache", "--set", "llm.generator.model=no-such-model"], {},
     "model 'no-such-model' is not served at {url}; it serves: fake-model"),
    (["--set", "llm.generator.api_key_env=EDGENAS_TEST_KEY"], {"EDGENAS_TEST_KEY": "sk-wrong"},
     "the key in $EDGENAS_TEST_KEY was rejected by {url} (HTTP 401)"),
    (["--set", "llm.generator.api_key_env=EDGENAS_UNSET_KEY"], {}, "environment variable EDGENAS_UNSET_KEY"),
])
def test_search_that_cannot_reach_the_llm_exits_2_in_one_line(tmp_path, setting, env, message):
    dead = dead_url()
    with FakeOpenAI(responder, api_key="sk-right" if env else None) as fake:
        url = dead if "{dead}" in message else fake.url
        proc = search(tmp_path, url, *setting, env=env)
        asked = len(fake.requests)
    assert proc.returncode == 2 and message.format(dead=dead, url=url) in one_line_error(proc)
    assert asked == 0  # no iteration ran


def test_search_stops_after_consecutive_llm_errors(tmp_path):
    with FakeOpenAI(lambda request: error(500, "upstream overloaded")) as fake:
        proc = search(tmp_path, fake.url, "--set", "search.max_llm_errors=2", "--json")
        asked = len(fake.requests)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "stopped after 2 LLM errors in a row" in last and "HTTP 500: upstream overloaded" in last
    assert "resume with: edgenas search --run-dir" in last and proc.stdout == ""
    rows = json.loads(run_cli("show", tmp_path / "run", "--json").stdout)
    assert [r["status"] for r in rows] == ["llm_error", "llm_error"] and asked == 2 * 2  # retries: 1, so 2 tries each
