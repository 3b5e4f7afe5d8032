"""Write a small random-weight llama-architecture GGUF for the real-server tests.

No weights can be downloaded here, so the model is made: the tokenizer is copied
from the SentencePiece vocabulary GGUF that the llama.cpp source ships
(``models/ggml-vocab-llama-spm.gguf``, 32,000 tokens) and every tensor is
seeded random F16 (norms F32). The text it writes is noise, which is all the
tests need: real tokenization, real prefill and decode, real slots, KV cache,
prompt cache, metrics and timings.

The end-of-sequence token's output row is zero, so its logit is 0 while about
half of the vocabulary scores above it: generations run to ``max_tokens``
instead of stopping at random, which keeps test timings predictable.

    python -m tests.realllama.model VOCAB.gguf OUT.gguf
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFWriter

# A chat template the server renders with its Jinja engine; the markers are
# plain text to this vocabulary, which is fine for noise.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """Hyperparameters; the defaults decode at tens of tokens/s on one thread."""

    n_embd: int = 768
    n_layer: int = 10
    n_head: int = 12
    n_head_kv: int = 4
    n_ff: int = 2048
    n_ctx_train: int = 4096
    seed: int = 20261122


def _field(reader: GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def write_model(vocab_path: Path, out: Path, shape: Shape | None = None) -> Path:
    """Write the model to ``out`` (atomically) and return it."""
    shape = shape or Shape()
    vocab = GGUFReader(vocab_path)
    tokens = list(_field(vocab, "tokenizer.ggml.tokens"))
    scores = list(_field(vocab, "tokenizer.ggml.scores"))
    types = list(_field(vocab, "tokenizer.ggml.token_type"))
    bos = int(_field(vocab, "tokenizer.ggml.bos_token_id"))
    eos = int(_field(vocab, "tokenizer.ggml.eos_token_id"))
    unk = int(_field(vocab, "tokenizer.ggml.unknown_token_id"))
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    n_embd_kv = head_dim * shape.n_head_kv

    partial = out.with_suffix(".partial")
    writer = GGUFWriter(partial, "llama")
    writer.add_name("sluiceway-test-random-llama")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(1)  # mostly F16
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(shape.seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        scale = 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # numpy shapes are (rows, cols) = ggml's ne reversed.
    writer.add_tensor("token_embd.weight", matrix(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{block}.attn_q.weight", matrix(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{block}.attn_k.weight", matrix(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{block}.attn_v.weight", matrix(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{block}.attn_output.weight", matrix(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{block}.ffn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", ones(shape.n_embd))
    output = matrix(n_vocab, shape.n_embd)
    output[eos, :] = 0  # never end early: see the module docstring
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.realllama.model VOCAB.gguf OUT.gguf", file=sys.stderr)
        return 2
    path = write_model(Path(argv[0]), Path(argv[1]))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
