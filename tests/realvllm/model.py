"""Write a tiny random-weight Llama in Hugging Face format, for the real-vLLM tests.

Run with the vLLM venv's python (it has torch, transformers and tokenizers):

    python tests/realvllm/model.py OUT_DIR [--agent]

Nothing can be downloaded here, so everything is made: a byte-level BPE tokenizer
(2,048 tokens) trained on text this script generates from a fixed seed, Llama-3-style
special tokens and a chat template, and a 2-layer Llama (hidden 128, 2 heads of 64, one
KV head, tied embeddings, float32) with seeded random weights. The same files come out on
every machine, byte for byte. Its text is noise; what the tests need is real tokenization,
prefill, decode, batching, prefix caching and metrics.

`--agent` makes the variant the coding-agent tests run: a 64k-token context (the agents
send 10-15k tokens of this vocabulary), and replies that end by themselves, as a real
model's do (Claude Code treats a reply cut at max_tokens as an error). Its embeddings are
set so that every context favours "." a little (about one token in ten) and "." is
followed by end-of-text: a reply is a few noise tokens and a full stop.
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


def make_tokenizer(out: Path, context: int = 4096) -> object:
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
                                   model_max_length=context)
    fast.save_pretrained(str(out))
    return fast


def make_model(out: Path, vocab_size: int, bos: int, eos: int, stop: int | None = None,
               context: int = 4096) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=bos,
        eos_token_id=eos, torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    if stop is not None:
        with torch.no_grad():
            # The residual stream carries the current token's embedding almost unchanged
            # (the random layers add ~0.03 per dimension), and the logits are its
            # RMS-normed dot product with the same (tied) embeddings. Dimension 0 is 1 in
            # every embedding: a common offset, after normalisation ~11 on every logit;
            # the stop token gets 0.5 more there (e^5.4: about one token in ten), and a
            # marker in dimension 1 that end-of-text answers with 3 (after the stop
            # token, EOS outscores everything by ~12: the reply ends).
            embed = model.model.embed_tokens.weight
            embed[:, 0] = 1.0
            embed[:, 1] = 0.0
            embed[stop, 0] = 1.5
            embed[stop, 1] = 1.0
            embed[eos, 1] = 3.0
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(str(out))


def main() -> int:
    out = Path(sys.argv[1])
    agent = "--agent" in sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    fast = make_tokenizer(out, 65536 if agent else 4096)
    vocab_size = len(fast)  # type: ignore[arg-type]
    ids = fast.convert_tokens_to_ids  # type: ignore[attr-defined]
    make_model(out, vocab_size, ids(BOS), ids(EOS), stop=ids(".") if agent else None,
               context=65536 if agent else 4096)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
