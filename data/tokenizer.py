"""Offline tokenizers bundled with the repository, for counting tokens of real text (ShareGPT prompts/responses).

Only the ``tokenizers`` package (the ``text`` extra) is needed, never ``transformers`` or the network:

- ``"llama2"``: ``data/tokenizers/llama2/tokenizer.json`` (Llama-2's 32k SentencePiece-BPE vocab; the paper's
  length traces were counted with it).
- ``"qwen2"``: ``data/tokenizers/qwen2_compatible_qwen3/tokenizer.json.gz``, the Qwen2 byte-level BPE. It is stored
  gzipped because the plain file (11 MB) is over the repository's 5 MB limit; it is decompressed in memory.

Counting convention (as vLLM's server counts ``usage``): prompt tokens *with* the special tokens the tokenizer adds
(the BOS ``<s>`` for Llama-2, nothing for Qwen2), response tokens *without* them.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers"
TOKENIZER_FILES: dict[str, Path] = {
    "llama2": TOKENIZER_DIR / "llama2" / "tokenizer.json",
    "qwen2": TOKENIZER_DIR / "qwen2_compatible_qwen3" / "tokenizer.json.gz",
}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # the package is optional: only the text dataset needs it
        raise ImportError(
            "counting tokens of text needs the 'tokenizers' package: pip install tokenizers "
            "(or pip install 'block-repro[text]')"
        ) from e
    return tokenizers


def tokenizer_file(name: str) -> Path:
    """The file behind a tokenizer name ("llama2", "qwen2") or a path to a tokenizer.json[.gz]."""
    if name in TOKENIZER_FILES:
        return TOKENIZER_FILES[name]
    p = Path(name).expanduser()
    if p.is_file():
        return p
    raise ValueError(f"unknown tokenizer {name!r}: use one of {sorted(TOKENIZER_FILES)} or a path to a tokenizer.json")


@lru_cache(maxsize=4)
def load_tokenizer(name: str = "llama2") -> Tokenizer:
    """Load a bundled tokenizer by name (or a tokenizer.json / tokenizer.json.gz by path); cached per process."""
    tk = _import_tokenizers()
    path = tokenizer_file(name)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return tk.Tokenizer.from_str(f.read())
    return tk.Tokenizer.from_file(str(path))


def count_tokens(prompts: Sequence[str], responses: Sequence[str], tokenizer: str = "llama2") -> tuple[np.ndarray, np.ndarray]:
    """Token counts of prompts (with BOS/special tokens, as vLLM counts prompt tokens) and responses (without)."""
    tok = load_tokenizer(tokenizer)
    p = tok.encode_batch(list(prompts), add_special_tokens=True)
    r = tok.encode_batch(list(responses), add_special_tokens=False)
    return (np.fromiter((len(e.ids) for e in p), dtype=np.int64, count=len(p)),
            np.fromiter((len(e.ids) for e in r), dtype=np.int64, count=len(r)))
