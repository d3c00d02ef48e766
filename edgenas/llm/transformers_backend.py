"""An instruction-tuned causal LM run in this process with transformers: no server to start, one GPU is enough.

The weights load on the first call, not on construction, so a run answered entirely from the reply cache never
loads them; and they load once per process for every role that names the same model.
"""

from __future__ import annotations

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
_load_lock = threading.Lock()
_generate_lock = threading.Lock()  # the seed is global torch state: one generation at a time
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
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        else:  # clear the model's own sampling defaults so greedy decoding raises no warnings
            options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with _generate_lock:
            torch.manual_seed(sampling.seed)
            output = model.generate(**inputs, max_new_tokens=sampling.max_tokens, pad_token_id=pad, **options)
        n_in = inputs["input_ids"].shape[1]
        generated = output[0, n_in:].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        return Reply(
            text=tokenizer.decode(generated, skip_special_tokens=True),
            tokens_in=n_in,
            tokens_out=len(generated),
            seconds=time.perf_counter() - start,
            truncated=len(generated) >= sampling.max_tokens and generated[-1] not in eos,
        )
