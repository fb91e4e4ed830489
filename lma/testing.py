"""A tiny random chat LLM saved like a real checkpoint, for tests and the CPU demo (and the tokenizer
bench/lma_scaling.py saves beside a random 7B-shaped LLM).

No weights or tokenizers can be downloaded in CI, so a byte-level BPE is trained here on a few
sentences, given a ChatML template (Qwen's format), and saved with a 2-layer random Qwen2; both
load back through the same `from_pretrained(dir)` path a real LLM takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("what colour is the square in the video", "the square is red", "the square is blue",
          "the video shows a moving square", "describe the video", "how many squares are there", "one square")


def make_tokenizer(directory: str | Path, corpus: Sequence[str] = CORPUS):
    """A byte-level BPE trained on `corpus` with a ChatML template, saved in `directory` (any text
    still tokenises, byte by byte); returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_llm(directory: str | Path, corpus: Sequence[str] = CORPUS, *, hidden_size: int = 64,
                  num_layers: int = 2, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    directory = Path(directory)
    tokenizer = make_tokenizer(directory, corpus)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.1)   # std 0.02 gives near-uniform logits a few steps cannot move
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def make_tiny_student(directory: str | Path, seed: int = 0) -> Path:
    """Save a random `tiny`-preset LiteFrame student to `directory` (save_pretrained) and return it."""
    from student import LiteFrameModel, preset_config

    torch.manual_seed(seed)
    LiteFrameModel(preset_config("tiny")).save_pretrained(directory)
    return Path(directory)
