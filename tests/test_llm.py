import json
import time

import pytest

from edgenas.config import LLMConfig, LLMRoles
from edgenas.llm import LLMError, LLMSetupError, Reply, Sampling, make_chat_model
from edgenas.llm.cache import CachedChat
from edgenas.llm.openai_backend import OpenAIChat
from tests.fake_openai import delayed, error, fake_openai, garbage, no_choices, reply, untidy  # noqa: F401 (fixture)
from tests.tiny_llm import build_tiny_llama

MESSAGES = [{"role": "system", "content": "You design networks."}, {"role": "user", "content": "Write a model."}]
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=3)


def openai_chat(fake, **cfg) -> OpenAIChat:
    return OpenAIChat(LLMConfig(**{"backend": "openai", "model": "fake-model", "base_url": fake.url, **cfg}),
                      backoff_s=0.01)


# --- openai backend against the fake server ---

def test_openai_good_reply_sends_sampling_and_counts_tokens(fake_openai):  # noqa: F811
    fake_openai.script([reply("x = 1", usage=(30, 4))])
    out = openai_chat(fake_openai).chat(MESSAGES, SAMPLING)
    assert (out.text, out.tokens_in, out.tokens_out, out.cached, out.truncated) == ("x = 1", 30, 4, False, False)
    assert out.seconds > 0
    (request,) = fake_openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.messages == MESSAGES
    body = request.body
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == \
        ("fake-model", 0.7, 0.9, 64, 3)
    assert request.headers["authorization"] == "Bearer EMPTY"


def test_openai_key_from_env_var(fake_openai, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EDGENAS_TEST_KEY", "sk-secret")
    openai_chat(fake_openai, api_key_env="EDGENAS_TEST_KEY").chat(MESSAGES, SAMPLING)
    assert fake_openai.requests[0].headers["authorization"] == "Bearer sk-secret"
    monkeypatch.delenv("EDGENAS_TEST_KEY")
    with pytest.raises(LLMSetupError, match="EDGENAS_TEST_KEY.*not set"):
        openai_chat(fake_openai, api_key_env="EDGENAS_TEST_KEY")


@pytest.mark.parametrize("failure", [error(500), error(503), error(429), garbage(), garbage(content_type="text/html"),
                                     no_choices()], ids=["500", "503", "429", "garbage", "html", "no-choices"])
def test_openai_retries_then_succeeds(fake_openai, failure):  # noqa: F811
    fake_openai.script([failure, failure, reply("fine")])
    assert openai_chat(fake_openai, retries=2).chat(MESSAGES, SAMPLING).text == "fine"
    assert len(fake_openai.requests) == 3


def test_openai_gives_up_with_one_line_error(fake_openai):  # noqa: F811
    fake_openai.responder = lambda request: garbage("not\njson")
    with pytest.raises(LLMError) as caught:
        openai_chat(fake_openai, retries=2).chat(MESSAGES, SAMPLING)
    assert "3 tries" in str(caught.value) and "not JSON" in str(caught.value) and "\n" not in str(caught.value)
    assert len(fake_openai.requests) == 3


def test_openai_client_error_is_not_retried(fake_openai):  # noqa: F811
    fake_openai.script([error(400, "bad\nrequest")])
    with pytest.raises(LLMError, match="HTTP 400: bad request"):
        openai_chat(fake_openai, retries=3).chat(MESSAGES, SAMPLING)
    assert len(fake_openai.requests) == 1


def test_openai_timeouts_end_in_error_without_hanging(fake_openai):  # noqa: F811
    fake_openai.responder = lambda request: delayed(30)
    start = time.perf_counter()
    with pytest.raises(LLMError, match="no reply within 0.3 s"):
        openai_chat(fake_openai, timeout_s=0.3, retries=1).chat(MESSAGES, SAMPLING)
    assert time.perf_counter() - start < 5
    assert len(fake_openai.requests) == 2


def test_openai_slow_reply_within_timeout(fake_openai):  # noqa: F811
    fake_openai.script([delayed(0.2, reply("late"))])
    assert openai_chat(fake_openai, timeout_s=5).chat(MESSAGES, SAMPLING).text == "late"


def test_openai_unreachable_server():
    cfg = LLMConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", retries=1)
    with pytest.raises(LLMError, match="cannot connect"):
        OpenAIChat(cfg, backoff_s=0.01).chat(MESSAGES, SAMPLING)


def test_openai_truncated_and_untidy_replies(fake_openai):  # noqa: F811
    fake_openai.script([reply("partial", finish_reason="length"), untidy("a" * 40), untidy(None)])
    chat = openai_chat(fake_openai)
    assert chat.chat(MESSAGES, SAMPLING).truncated
    sloppy = chat.chat(MESSAGES, SAMPLING)
    assert (sloppy.text, sloppy.tokens_out, sloppy.truncated) == ("a" * 40, 10, False)
    assert sloppy.tokens_in == len("".join(m["content"] for m in MESSAGES)) // 4
    assert chat.chat(MESSAGES, SAMPLING).text == ""


# --- the reply cache and the factory ---

def test_cache_hit_keeps_reply_and_seed_misses(fake_openai, tmp_path):  # noqa: F811
    fake_openai.responder = lambda request: reply(f"seed {request.body['seed']}", usage=(5, 2))
    path = tmp_path / "cache" / "replies.sqlite"
    chat = CachedChat(openai_chat(fake_openai), path)
    first = chat.chat(MESSAGES, SAMPLING)
    again = chat.chat(MESSAGES, SAMPLING)
    assert not first.cached and again.cached
    assert again == Reply(first.text, 5, 2, first.seconds, cached=True, truncated=False)
    assert len(fake_openai.requests) == 1
    other = chat.chat(MESSAGES, Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=4))
    assert (other.text, other.cached) == ("seed 4", False)
    assert CachedChat(openai_chat(fake_openai), path).chat(MESSAGES, SAMPLING).cached  # persists across instances
    assert len(fake_openai.requests) == 2


def test_cache_does_not_store_failures(fake_openai, tmp_path):  # noqa: F811
    fake_openai.script([error(400)])
    chat = CachedChat(openai_chat(fake_openai), tmp_path / "c.sqlite")
    with pytest.raises(LLMError):
        chat.chat(MESSAGES, SAMPLING)
    assert chat.chat(MESSAGES, SAMPLING).text == "ok"


class Echo:
    """A stand-in ChatModel that answers with its seed."""

    identity = "echo"

    def check(self):
        pass

    def chat(self, messages, sampling):
        return Reply(f"seed {sampling.seed}", 1, 1, 0.01)


def test_cache_shared_by_concurrent_writers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "shared.sqlite"

    def work(seed):  # each worker its own CachedChat, as separate processes would have
        return CachedChat(Echo(), path).chat(MESSAGES, Sampling(seed=seed % 5)).text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(40))) == [f"seed {i % 5}" for i in range(40)]
    assert all(CachedChat(Echo(), path).chat(MESSAGES, Sampling(seed=i)).cached for i in range(5))


def test_make_chat_model(fake_openai, tmp_path):  # noqa: F811
    cfg = LLMConfig(backend="openai", model="fake-model", base_url=fake_openai.url)
    assert isinstance(make_chat_model(cfg), OpenAIChat)
    cached = make_chat_model(cfg, cache_path=str(tmp_path / "c.sqlite"))
    assert isinstance(cached, CachedChat) and cached.identity == "openai:fake-model"
    with pytest.raises(ValueError, match="mutate"):
        make_chat_model(LLMConfig(backend="mutate"))


# --- the in-process transformers backend on a tiny random model ---

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_transformers_chat(tiny_model):
    from transformers import AutoTokenizer

    chat = make_chat_model(LLMConfig(backend="transformers", model=tiny_model, max_tokens=16))
    assert chat.identity == f"transformers:{tiny_model}:float32"
    sampling = Sampling(temperature=0.7, top_p=0.9, max_tokens=16, seed=1)
    out = chat.chat(MESSAGES, sampling)
    assert isinstance(out.text, str) and out.seconds > 0 and not out.cached
    prompt = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(MESSAGES, tokenize=False,
                                                                           add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    assert out.tokens_in == len(AutoTokenizer.from_pretrained(tiny_model)(prompt, add_special_tokens=False).input_ids)
    assert 1 <= out.tokens_out <= 16
    assert not out.truncated or out.tokens_out == 16
    assert chat.chat(MESSAGES, sampling).text == out.text  # same seed, same reply
    greedy = Sampling(temperature=0.0, max_tokens=4, seed=1)
    assert chat.chat(MESSAGES, greedy).text == chat.chat(MESSAGES, Sampling(temperature=0.0, max_tokens=4, seed=9)).text


def test_transformers_loaded_once_for_both_roles(tiny_model):
    from edgenas.llm.transformers_backend import load_shared

    roles = LLMRoles(generator={"backend": "transformers", "model": tiny_model}, improver={"temperature": 0.2})
    assert roles.improver.model == tiny_model
    assert load_shared(roles.generator) is load_shared(roles.improver)
    tokenizer, model = load_shared(roles.generator)
    assert tokenizer.chat_template and model.config.num_hidden_layers == 2


def test_transformers_batches_requests_that_arrive_together(tiny_model, monkeypatch):
    """Chains ask side by side: what waits while one generate() runs goes into the next as one left-padded batch,
    and each row's greedy reply is what it would have been alone."""
    import threading

    from edgenas.llm.transformers_backend import load_shared

    chat = make_chat_model(LLMConfig(backend="transformers", model=tiny_model))
    greedy = Sampling(temperature=0.0, max_tokens=12, seed=1)
    prompts = [[{"role": "user", "content": "Write a model with conv layers" + " and batch norm" * i}] for i in range(4)]
    alone = [chat.chat(m, greedy) for m in prompts]
    model = load_shared(chat.cfg)[1]
    sizes, generate, gate = [], model.generate, threading.Event()

    def recording(**kw):
        sizes.append(kw["input_ids"].shape[0])
        gate.wait(10)  # the first call holds the model until the others queue behind it
        return generate(**kw)

    monkeypatch.setattr(model, "generate", recording)
    replies = [None] * 4

    def ask(i):
        replies[i] = chat.chat(prompts[i], greedy)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    threads[0].start()
    while not sizes:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join()
    assert sizes == [1, 3]
    assert [(r.text, r.tokens_in, r.tokens_out) for r in replies] == [(r.text, r.tokens_in, r.tokens_out) for r in alone]


def test_transformers_tokenizer_without_a_pad_token(tiny_model, tmp_path):
    """Llama and Mistral tokenizers have no pad token: batches are padded with EOS instead of failing."""
    import shutil

    copy = tmp_path / "no-pad"
    shutil.copytree(tiny_model, copy)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = copy / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("pad_token", None)
            path.write_text(json.dumps(data))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(copy).pad_token is None
    chat = make_chat_model(LLMConfig(backend="transformers", model=str(copy)))
    reply = chat.chat(MESSAGES, Sampling(temperature=0.0, max_tokens=6, seed=1))
    assert 1 <= reply.tokens_out <= 6


def test_transformers_missing_model_is_one_setup_line(tmp_path):
    chat = make_chat_model(LLMConfig(backend="transformers", model=str(tmp_path / "nowhere")))
    with pytest.raises(LLMSetupError, match=r"cannot load .*nowhere \(no such directory\)") as caught:
        chat.check()
    assert "\n" not in str(caught.value)
    with pytest.raises(LLMSetupError, match="cannot load"):
        chat.chat(MESSAGES, SAMPLING)


def test_transformers_4bit_needs_cuda(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    chat = make_chat_model(LLMConfig(backend="transformers", model=tiny_model, load_in_4bit=True))
    with pytest.raises(LLMSetupError, match="CUDA"):
        chat.chat(MESSAGES, SAMPLING)


def test_search_loop_driven_by_the_in_process_model(tiny_model, tmp_path):
    """The whole improver -> generator -> evaluator loop on the in-process backend: a random-weight model writes
    no usable code, and every such reply becomes a recorded outcome instead of stopping the loop."""
    from edgenas import loop
    from edgenas.archive import Archive
    from edgenas.config import BudgetConfig, LLMConfig, SearchConfig
    from edgenas.llm import make_chat_model
    from edgenas.prompts import Task
    from edgenas.propose import LLMProposer
    from edgenas.records import EvalResult, Status

    class Evaluator:
        last_graph = b""

        def evaluate(self, code):
            return EvalResult(status=Status.ok, val_accuracy=0.5, params=10, macs=10, peak_memory_bytes=10)

    chat = make_chat_model(LLMConfig(backend="transformers", model=str(tiny_model), max_tokens=24), str(tmp_path / "cache.sqlite"))
    task = Task("synthetic", 4, (3, 16, 16), BudgetConfig(), "1 epoch")
    archive = Archive(tmp_path / "run")
    loop.run(archive, LLMProposer(chat, chat, Sampling(max_tokens=24), Sampling(max_tokens=24), task), [Evaluator()],
             SearchConfig(iterations=3))
    rows = archive.all()
    assert [r.iteration for r in rows] == [0, 1, 2]
    assert all(r.status in ("no_code", "truncated", "ok", "failed", "duplicate") for r in rows)
    assert all(r.tokens_out > 0 and r.llm_calls and r.replies for r in rows)
