"""A random-weight Llama in a Hugging Face cache, for `transformers serve` offline.

Nothing can be downloaded on the GPU machine, so the batching engine's model is made
there: a `LlamaConfig` of the same shape as the GGUF model llama-server runs, seeded
random weights saved in bf16, and a word-level tokenizer (one whitespace-separated word
is one token, unknown words map to `[UNK]`, so a prompt of N words is N tokens) with a
chat template. No end-of-sequence token is defined, so every request runs to its
`max_tokens`. The files are placed as a snapshot of a repository in an offline hub cache
(`HF_HOME/hub/models--ORG--NAME/snapshots/REV`, `refs/main` naming REV): `transformers
serve` then lists the model by its repository id in `/v1/models` (given a plain path it
answered 500 `CacheNotFound`, see shared/reference/gpu.md).

    python -m benchmarks.gpu.hf_model HF_HOME [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ID = "sluiceway/random-llama"
REVISION = "0" * 40  # a commit hash in form: the cache is keyed by it
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} \n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@dataclass(frozen=True)
class HfShape:
    """The GGUF model's shape (benchmarks/gpu/run.py), in `LlamaConfig` terms."""

    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 8192
    vocab: int = 32000
    context: int = 4096
    seed: int = 20261203


TINY = HfShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2000)


def snapshot_dir(hf_home: Path, repo_id: str = REPO_ID) -> Path:
    org, name = repo_id.split("/")
    return hf_home / "hub" / f"models--{org}--{name}" / "snapshots" / REVISION


def write(hf_home: Path, shape: HfShape = HfShape(), repo_id: str = REPO_ID) -> str:
    """Write the model unless it is there already; return the repository id to serve."""
    snapshot = snapshot_dir(hf_home, repo_id)
    done = snapshot / ".complete"
    if done.is_file() and json.loads(done.read_text()) == shape.__dict__:
        return repo_id
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    snapshot.mkdir(parents=True, exist_ok=True)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(REVISION)

    words = {"[UNK]": 0, "[PAD]": 1}
    words.update({f"w{i}": i for i in range(2, shape.vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                        pad_token="[PAD]")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(snapshot)

    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate, vocab_size=shape.vocab,
        max_position_embeddings=shape.context, bos_token_id=None, eos_token_id=None,
        pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(shape.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 1
    model.save_pretrained(snapshot)
    done.write_text(json.dumps(shape.__dict__))
    return repo_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_home", type=Path)
    parser.add_argument("--tiny", action="store_true", help="a toy shape for CPU dry runs")
    args = parser.parse_args(argv)
    print(write(args.hf_home, TINY if args.tiny else HfShape()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
