"""Prompt features for the CPU length estimator, and the train/held-out split shared with the transformer pipeline.

Features are computed from the prompt *text* only (no tokenizer, numpy + the standard library), so the estimator
loads and predicts in a few milliseconds inside the scheduler:

* ``dense_features``: a fixed vector of hand-made cues (:data:`DENSE_NAMES`): sizes (characters, words, lines, log
  scales), punctuation and structure (question marks, code fences, list markers, numbers, URLs, code-like lines),
  script/language cues (non-ASCII, CJK, Cyrillic, Hangul, kana, Arabic ... fractions), the request type from keywords
  ("write", "explain", "list", "summarize", "code", "essay", "translate", "fix", "short", "detailed" ...), in the
  first words (the instruction) and anywhere, and numbers the user asks for ("in 500 words", "10 ideas");
* ``hashed_ngrams``: a hashed bag of lower-cased word unigrams and bigrams of the first ``max_words`` words
  (CRC32 into ``2**bits`` buckets -- deterministic across processes, unlike ``hash()``), sublinear TF, L2 norm.

``load_split`` is the transformer pipeline's 80/20 split (``length_estimation.dataset``, seed 42) as (train, test).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
DEFAULT_DATASET = "sharegpt_text"


# ------------------------------------------------------------------------------------------------ split
def load_split(dataset: str = DEFAULT_DATASET, seed: int = SPLIT_SEED, train_fraction: float = TRAIN_FRACTION,
               tokenizer: str = "llama2", path: str | None = None, limit: int | None = None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames of the split the transformer pipeline uses (``length_estimation.dataset``): filtered
    rows (non-blank prompt, output >= 1, prompt + output < 4096), a seeded permutation, the last 20 % ``test``.
    The CPU estimator trains on ``train`` + ``val`` (it needs no early-stopping slice) and is scored on ``test``,
    the same held-out rows as the transformer."""
    from length_estimation.dataset import DataConfig, load_splits, split_frame

    cfg = DataConfig(dataset=dataset, path=path, tokenizer=tokenizer, seed=seed,
                     test_fraction=round(1.0 - train_fraction, 10), limit=limit)
    df = load_splits(cfg)
    train = df[df["split"].isin(("train", "val"))].reset_index(drop=True)
    train.attrs = dict(df.attrs)
    return train, split_frame(df, "test")


# ------------------------------------------------------------------------------------------------ dense features
_WORD = re.compile(r"[\w']+", re.UNICODE)
_NUMBER = re.compile(r"\d+")
_URL = re.compile(r"https?://|www\.")
_UPPER = re.compile(r"[A-Z]")
_DIGIT = re.compile(r"[0-9]")
_PUNCT = re.compile(r"[.,;:!?()\[\]{}<>\"'`=+\-*/\\|#@$%^&_~]")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[a-zA-Z][.)])\s+", re.M)
_CODE_LINE = re.compile(r"[;{}]\s*$|^\s*(?:def |class |import |from \S+ import|#include|public |private |function |"
                        r"const |let |var |return |if \(|for \(|SELECT |<\w+[ >])", re.M | re.I)
_WORDS_ASKED = re.compile(r"(\d{2,5})\s*(?:-\s*)?(?:words?|word-|mots|palabras|字)", re.I)
_ITEMS_ASKED = re.compile(r"\b(\d{1,3})\s+(?:\w+\s+)?(?:ideas|examples|ways|tips|questions|names|titles|points|"
                          r"reasons|steps|things|options|items|suggestions|bullet|sentences|paragraphs|lines|"
                          r"headlines|taglines|slogans|topics|facts|keywords|tweets|posts|quotes)\b", re.I)
_PARAS_ASKED = re.compile(r"\b(\d{1,2}|one|two|three|four|five)\s+(?:paragraphs?|pages?)\b", re.I)

# keyword groups: a cue fires when any of its words/phrases occurs (word boundaries, lower case)
KEYWORDS: dict[str, tuple[str, ...]] = {
    "write": ("write", "compose", "draft", "create", "generate", "make"),
    "explain": ("explain", "describe", "elaborate", "why", "how does", "how do", "what is", "what are"),
    "list": ("list", "bullet", "enumerate", "top", "ideas", "examples", "suggest", "give me"),
    "summarize": ("summarize", "summarise", "summary", "tl;dr", "tldr", "shorten", "condense"),
    "code": ("code", "function", "script", "program", "python", "javascript", "java", "sql", "c++", "c#", "react",
             "html", "css", "api", "bash", "typescript", "golang", "rust", "regex", "implement", "class"),
    "fix": ("fix", "debug", "error", "bug", "exception", "traceback", "doesn't work", "not working"),
    "essay": ("essay", "article", "blog", "story", "report", "paper", "chapter", "novel", "speech", "script for"),
    "poem": ("poem", "song", "lyrics", "rap", "haiku", "verse", "limerick"),
    "letter": ("email", "letter", "message", "cover letter", "reply", "respond"),
    "translate": ("translate", "translation", "in english", "in chinese", "in spanish", "in french", "in korean"),
    "rewrite": ("rewrite", "rephrase", "paraphrase", "improve", "edit", "proofread", "correct", "polish"),
    "plan": ("plan", "outline", "schedule", "itinerary", "strategy", "roadmap", "curriculum", "syllabus"),
    "table": ("table", "csv", "spreadsheet", "markdown table", "chart"),
    "short": ("short", "brief", "briefly", "concise", "one sentence", "one word", "one line", "yes or no", "only",
              "just", "single"),
    "long": ("detailed", "in detail", "comprehensive", "long", "thorough", "step by step", "step-by-step",
             "elaborate", "extensive", "full", "complete"),
    "roleplay": ("act as", "pretend", "you are", "imagine you", "role", "i want you to"),
    "continue": ("continue", "go on", "keep going", "more"),
    "greeting": ("hi", "hello", "hey", "thanks", "thank you", "good morning"),
    "question_word": ("what", "who", "when", "where", "which", "how", "why"),
    "yesno": ("is it", "can you", "do you", "are you", "is there", "does"),
    "compare": ("compare", "difference", "differences", "vs", "versus", "pros and cons", "advantages"),
    "math": ("calculate", "solve", "equation", "formula", "math", "probability", "integral", "derivative"),
}
_KW_RE = {k: re.compile(r"(?<![\w])(?:" + "|".join(re.escape(w) for w in ws) + r")(?![\w])")
          for k, ws in KEYWORDS.items()}
HEAD_WORDS = 12  # the instruction usually sits in the first words

# unicode ranges of scripts (fractions of the characters)
_SCRIPTS = {
    "cjk": re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]"),
    "kana": re.compile(r"[\u3040-\u30ff]"),
    "hangul": re.compile(r"[\uac00-\ud7af\u1100-\u11ff]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
    "latin_ext": re.compile(r"[\u00c0-\u024f]"),
}

_FIXED_NAMES = (
    "log_chars", "log_words", "log_lines", "log_nonempty_lines", "chars_per_word", "log_max_line_chars",
    "n_question", "n_exclaim", "ends_question", "n_code_fence", "frac_code_lines", "n_list_lines", "n_numbers",
    "n_urls", "frac_upper", "frac_digit", "frac_punct", "frac_nonascii", "n_colon_lines", "n_quotes",
    "log_words_asked", "has_words_asked", "log_items_asked", "has_items_asked", "n_paras_asked", "first_person",
    "starts_imperative", "log_prompt_tokens_est",
)
DENSE_NAMES: tuple[str, ...] = (
    _FIXED_NAMES
    + tuple(f"script_{s}" for s in _SCRIPTS)
    + tuple(f"kw_head_{k}" for k in KEYWORDS)
    + tuple(f"kw_any_{k}" for k in KEYWORDS)
)
_IMPERATIVES = frozenset(
    "write explain list summarize summarise give create make generate describe tell provide suggest compose draft "
    "translate rewrite rephrase fix help show design build implement convert find correct improve edit outline "
    "compare analyze analyse plan act pretend imagine continue please".split())
_NUMWORD = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def _count(rx: re.Pattern, s: str) -> int:
    return sum(1 for _ in rx.finditer(s))


def dense_one(text: str) -> list[float]:
    """The :data:`DENSE_NAMES` features of one prompt."""
    t = text or ""
    n = len(t)
    low = t.lower()
    words = _WORD.findall(low)
    nw = len(words)
    lines = t.split("\n")
    nonempty = [ln for ln in lines if ln.strip()]
    nl = max(1, len(nonempty))
    ascii_n = len(t.encode("ascii", "ignore"))
    upper = len(_UPPER.findall(t))
    digit = len(_DIGIT.findall(t))
    punct = len(_PUNCT.findall(t))
    words_asked = [int(m) for m in _WORDS_ASKED.findall(t)]
    items_asked = [int(m) for m in _ITEMS_ASKED.findall(t)]
    paras = [_NUMWORD.get(m.lower(), None) or (int(m) if m.isdigit() else 1) for m in _PARAS_ASKED.findall(t)]
    head = " ".join(words[:HEAD_WORDS])
    first = words[0] if words else ""
    fixed = [
        math.log1p(n), math.log1p(nw), math.log1p(len(lines)), math.log1p(len(nonempty)), n / max(1, nw),
        math.log1p(max((len(ln) for ln in lines), default=0)),
        min(t.count("?"), 20), min(t.count("!"), 20), float(t.rstrip().endswith("?")), min(t.count("```"), 10),
        _count(_CODE_LINE, t) / nl, min(_count(_LIST_LINE, t), 50), min(_count(_NUMBER, t), 100),
        min(_count(_URL, t), 20), upper / max(1, n), digit / max(1, n), punct / max(1, n), 1 - ascii_n / max(1, n),
        sum(1 for ln in nonempty if ln.rstrip().endswith(":")), min(t.count('"'), 50),
        math.log1p(max(words_asked, default=0)), float(bool(words_asked)),
        math.log1p(max(items_asked, default=0)), float(bool(items_asked)), float(min(max(paras, default=0), 10)),
        float(bool(re.search(r"\b(i|my|me|i'm|we|our)\b", head))), float(first in _IMPERATIVES),
        math.log1p(ascii_n / 4.0 + (n - ascii_n) * 1.0),  # a tokenizer-free prompt-token estimate
    ]
    scripts = [_count(rx, t) / max(1, n) for rx in _SCRIPTS.values()]
    kw_head = [float(rx.search(head) is not None) for rx in _KW_RE.values()]
    kw_any = [float(rx.search(low) is not None) for rx in _KW_RE.values()]
    return fixed + scripts + kw_head + kw_any


def dense_features(prompts: Iterable[str]) -> np.ndarray:
    """``(n, len(DENSE_NAMES))`` float32 matrix of hand-made prompt cues."""
    rows = [dense_one(p) for p in prompts]
    if not rows:
        return np.zeros((0, len(DENSE_NAMES)), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ hashed n-grams
def _bucket(tok: str, bits: int) -> int:
    return zlib.crc32(tok.encode("utf-8")) & ((1 << bits) - 1)


def hashed_ngram_rows(prompts: Sequence[str], bits: int = 14, max_words: int = 64
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The non-zeros of ``hashed_ngrams`` per prompt: (bucket indices, values)."""
    rows = []
    for p in prompts:
        words = _WORD.findall((p or "").lower())[:max_words]
        counts: dict[int, int] = {}
        prev = "<s>"
        for w in words:
            for tok in (w, prev + " " + w):
                b = _bucket(tok, bits)
                counts[b] = counts.get(b, 0) + 1
            prev = w
        if counts:
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            val = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
            rows.append((idx, (val / np.linalg.norm(val)).astype(np.float32)))
        else:
            rows.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)))
    return rows


def hashed_ngrams(prompts: Sequence[str], bits: int = 14, max_words: int = 64) -> np.ndarray:
    """``(n, 2**bits)`` float32 hashed bag of unigrams + bigrams of the first ``max_words`` lower-cased words
    (TF as ``1 + log(count)``, rows L2-normalised). Words are ``\\w+`` runs (a CJK sentence is one word)."""
    out = np.zeros((len(prompts), 1 << bits), dtype=np.float32)
    for i, (idx, val) in enumerate(hashed_ngram_rows(prompts, bits, max_words)):
        out[i, idx] = val
    return out
