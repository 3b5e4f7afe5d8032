"""Counting output tokens of a stream that reported no usage, with a given tokenizer
(`--tokenizer PATH`: a Hugging Face `tokenizer.json`, read by the `tokenizers` package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenCounter:
    """The number of tokens a text encodes to, without special tokens (what a server
    generated is text tokens only)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | None) -> TokenCounter | None:
        if path is None:
            return None
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ValueError("--tokenizer needs the `tokenizers` package "
                             "(pip install tokenizers)") from exc
        if not Path(path).is_file():
            raise ValueError(f"--tokenizer: no file {path}")
        try:
            return cls(Tokenizer.from_file(path))
        except Exception as exc:  # the library raises a bare Exception for a bad file
            raise ValueError(f"--tokenizer: cannot read {path}: {exc}") from exc

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
