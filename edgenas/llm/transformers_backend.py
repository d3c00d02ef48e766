"""An instruction-tuned causal LM run in this process with transformers: no server to start, one GPU is enough.

The weights load on the first call, not on construction, so a run answered entirely from the reply cache never
loads them; and they load once per process for every role that names the same model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import LLMConfig
from .base import LLMSetupError, Message, Reply, Sampling

_loaded: dict[tuple, tuple] = {}
_batchers: dict[int, _Batcher] = {}  # one per loaded model
_load_lock = threading.Lock()
# transformers 5 renamed from_pretrained's torch_dtype to dtype
_DTYPE_ARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on CPU, where half precision is slow or unsupported."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _where(model: str) -> str:
    """Which of the two places from_pretrained looks in failed, said plainly (offline hub ids are the usual case)."""
    path = Path(model).expanduser()
    if path.exists():
        return "a local directory"
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        return "no such directory"
    return "no such local directory; as a hub id it is not in the cache and could not be downloaded"


def _load(cfg: LLMConfig) -> tuple:
    dtype = resolve_dtype(cfg.dtype)
    kwargs = {_DTYPE_ARG: dtype}
    if torch.cuda.is_available():  # device_map needs accelerate, which a CPU-only install may lack
        kwargs["device_map"] = cfg.device_map
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise LLMSetupError("llm.load_in_4bit needs a CUDA GPU; none is available")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LLMSetupError("llm.load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        detail = " ".join(str(e).split())[:300]
        raise LLMSetupError(f"cannot load {cfg.model} ({_where(cfg.model)}): {detail}") from None
    if not tokenizer.chat_template:
        raise LLMSetupError(f"{cfg.model} has no chat template: use an instruction-tuned model")
    if tokenizer.pad_token is None:  # Llama and Mistral tokenizers have none; batches are padded (left) with EOS
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return tokenizer, model


def load_shared(cfg: LLMConfig) -> tuple:
    """(tokenizer, model), loaded once per process for each (model, dtype, device_map, load_in_4bit)."""
    key = (cfg.model, cfg.dtype, cfg.device_map, cfg.load_in_4bit)
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = _load(cfg)
        return _loaded[key]


class TransformersChat:
    """Chat with a local or hub model through its own chat template."""

    def __init__(self, cfg: LLMConfig):
        if not cfg.model:
            raise LLMSetupError("llm.model: the transformers backend needs a hub id or a local path")
        self.cfg = cfg
        # the dtype changes the replies, so the cache must tell them apart
        self.identity = f"transformers:{cfg.model}:{str(resolve_dtype(cfg.dtype)).removeprefix('torch.')}"
        if cfg.load_in_4bit:
            self.identity += ":4bit"

    def check(self) -> None:
        """Load the weights now: a path or hub id that cannot load is one line before the first iteration."""
        load_shared(self.cfg)

    def chat(self, messages: list[Message], sampling: Sampling) -> Reply:
        tokenizer, model = load_shared(self.cfg)
        start = time.perf_counter()  # after loading: seconds measure this reply, not the one-off load
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = _Request(prompt, sampling)
        _batcher(tokenizer, model).serve(request)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        generated = request.generated
        end = next((i + 1 for i, token in enumerate(generated) if token in eos), len(generated))
        return Reply(
            text=tokenizer.decode(generated[:end], skip_special_tokens=True),
            tokens_in=request.tokens_in,
            tokens_out=end,
            seconds=time.perf_counter() - start,
            truncated=end >= sampling.max_tokens and generated[end - 1] not in eos,
        )


@dataclasses.dataclass(eq=False)
class _Request:
    prompt: str
    sampling: Sampling
    generated: list[int] | None = None
    tokens_in: int = 0
    error: BaseException | None = None


class _Batcher:
    """One generate() at a time per model; whoever runs it takes along every waiting request with the same sampling
    settings (search.chains asks side by side), in one left-padded batch. A lone request is generated alone with its
    own seed, so the serial loop stays reproducible call for call; a batch is seeded by its first request (the reply
    cache then reproduces the run)."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model
        self.waiting: list[_Request] = []
        self.queue_lock, self.generate_lock = threading.Lock(), threading.Lock()

    def serve(self, request: _Request) -> None:
        with self.queue_lock:
            self.waiting.append(request)
        with self.generate_lock:
            if request.generated is None and request.error is None:
                with self.queue_lock:
                    batch = [r for r in self.waiting if _same_settings(r.sampling, request.sampling)]
                    self.waiting = [r for r in self.waiting if r not in batch]
                try:
                    self._generate(batch)
                except BaseException as e:  # every request of the batch learns of it, not only the one that ran it
                    for r in batch:
                        r.error = e
        if request.error is not None:
            raise request.error

    def _generate(self, batch: list[_Request]) -> None:
        tokenizer, model, sampling = self.tokenizer, self.model, batch[0].sampling
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        else:  # clear the model's own sampling defaults so greedy decoding raises no warnings
            options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        pad = tokenizer.pad_token_id
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        inputs = tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(model.device)
        torch.manual_seed(sampling.seed)
        output = model.generate(**inputs, max_new_tokens=sampling.max_tokens, pad_token_id=pad, **options)
        width = inputs["input_ids"].shape[1]
        for i, request in enumerate(batch):
            request.tokens_in = int(inputs["attention_mask"][i].sum())
            request.generated = output[i, width:].tolist()


def _same_settings(a: Sampling, b: Sampling) -> bool:
    return (a.temperature, a.top_p, a.max_tokens) == (b.temperature, b.top_p, b.max_tokens)


def _batcher(tokenizer, model) -> _Batcher:
    with _load_lock:
        return _batchers.setdefault(id(model), _Batcher(tokenizer, model))
