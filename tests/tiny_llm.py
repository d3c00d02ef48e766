"""A tiny random-weight chat model saved as a local transformers model: a real model file, no hub, no weights
downloaded. Used by the tests and by benchmarks/device_check.py (which loads it on CUDA in bf16)."""

from __future__ import annotations

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_llama(path) -> str:
    """A byte-level BPE tokenizer trained on a few lines and a 2-layer random Llama, saved under `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = ["import torch.nn as nn", "class Net(nn.Module):", "def forward(self, x): return self.fc(x)",
             "You design networks.", "Write a model with conv layers and batch norm."] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<pad>",
                                        chat_template=TEMPLATE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
