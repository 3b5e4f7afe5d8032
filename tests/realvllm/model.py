"""Write a tiny random-weight Llama in Hugging Face format, for the real-vLLM tests.

Run with the vLLM venv's python (it has torch, transformers and tokenizers):

    python tests/realvllm/model.py OUT_DIR

Nothing can be downloaded here, so everything is made: a byte-level BPE tokenizer
(2,048 tokens) trained on text this script generates from a fixed seed, Llama-3-style
special tokens and a chat template, and a 2-layer Llama (hidden 128, 2 heads of 64, one
KV head, tied embeddings, float32) with seeded random weights. The same files come out on
every machine, byte for byte. Its text is noise; what the tests need is real tokenization,
prefill, decode, batching, prefix caching and metrics.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIALS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
_WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem",
    "hand", "part", "place", "case", "week", "company", "system", "program", "question",
    "work", "number", "night", "point", "home", "water", "room", "mother", "area",
    "money", "story", "def", "class", "return", "import", "self", "print", "if", "else",
    "for", "while", "in", "not", "and", "or", "None", "True", "False", "value", "key",
    "list", "dict", "string", "count", "route", "backend", "request", "stream", "token",
    "model", "server", "client", "proxy",
)


def corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        punct = rng.choice([".", ",", ":", "()", " = 1", "?", "!", ";", " {}", " []"])
        out.append(" ".join(words) + punct)
    return out


def make_tokenizer(out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, chat_template=CHAT_TEMPLATE,
                                   model_max_length=4096)
    fast.save_pretrained(str(out))
    return fast


def make_model(out: Path, vocab_size: int, bos: int, eos: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=bos,
        eos_token_id=eos, torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(str(out))


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    fast = make_tokenizer(out)
    vocab_size = len(fast)  # type: ignore[arg-type]
    make_model(out, vocab_size, fast.convert_tokens_to_ids(BOS),  # type: ignore[attr-defined]
               fast.convert_tokens_to_ids(EOS))  # type: ignore[attr-defined]
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
