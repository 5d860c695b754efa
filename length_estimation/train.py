"""Fine-tune the transformer length estimator: ``python -m length_estimation.train [overrides]`` (Hydra).

Examples::

    python -m length_estimation.train                                  # MiniLM, 128 tokens, 400 steps on a CPU
    python -m length_estimation.train training.max_steps=600           # continue the same run to step 600
    python -m length_estimation.train model=roberta_base training=paper device=cuda   # the paper's setup

A plain torch loop (AdamW, warmup + linear decay, gradient clipping, MSE on the standardised target). The run
directory ``outputs/length/<run_name>/`` receives:

- ``checkpoints/step-NNNNNNN/``: every ``training.save_every`` steps and at the end; each is an estimator directory
  (model, tokenizer, ``estimator.json``) plus ``trainer_state.pt`` (optimizer, scheduler, step, epoch and position
  in it, torch RNG, best score, loss history). Written to a temporary directory and renamed, so a kill never leaves a
  half checkpoint; ``checkpoints/latest`` names the newest one; the ``keep_last`` newest are kept.
- ``best/``: the estimator with the best validation score so far; ``model/``: the estimator to use (the best one,
  or the last one without a validation slice), written at the end.
- ``train_log.csv`` (step, loss, lr, val_loss, val_mae, elapsed_s) and ``train_summary.json``.

Resume: rerunning the same command continues from the newest checkpoint (``training.resume=auto``): weights,
optimizer and scheduler state, step, data position and RNG, so an interrupted run ends where an uninterrupted one
would (exactly, on a CPU, with the same ``max_steps``; a larger ``max_steps`` stretches a linear/cosine schedule).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vidur.records import write_atomic, write_text

from .dataset import DataConfig, load_splits, split_frame, split_summary
from .metrics import mae as mae_metric
from .transformer import (
    EstimatorMeta,
    TargetTransform,
    TransformerEstimator,
    collate,
    effective_max_length,
    encode,
    forward_batches,
    import_ml,
    load_model_and_tokenizer,
    pick_device,
    replace_dir,
    set_threads,
)

log = logging.getLogger("length_estimation.train")

STATE_FILE = "trainer_state.pt"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "val_loss", "val_mae", "elapsed_s")


def _plain(cfg) -> dict:
    """A DictConfig or mapping as a plain, resolved dict."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    return json.loads(json.dumps(cfg))


# --------------------------------------------------------------------------------------------------- batching

def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """The batches (index arrays) of one epoch; a pure function of (seed, epoch), so resume replays the order.

    ``group_by_length``: shuffle, cut into mega-batches of 50 batches, sort each by length, then shuffle the
    batches (as HF's ``group_by_length``): little padding, still a random order."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        return [perm[i: i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = batch_size * 50
    batches = []
    for i in range(0, len(perm), mega):
        chunk = perm[i: i + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[k] for k in order]


def lr_lambda_factory(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown scheduler {kind!r}: use linear, cosine or constant")

    return f


# --------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (the ``latest`` pointer, else the highest step with a trainer state)."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).exists():
            return cand
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name and (p / STATE_FILE).exists())
    return steps[-1] if steps else None


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name)
    for p in steps[: max(0, len(steps) - max(1, keep_last))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step-*.tmp-*"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, estimator: TransformerEstimator, state: dict, keep_last: int) -> Path:
    import torch

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dst = root / f"step-{state['step']:07d}"
    tmp = root / f"{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    estimator.meta.trained_steps = int(state["step"])
    estimator.write_into(tmp)
    torch.save(state, tmp / STATE_FILE)
    replace_dir(tmp, dst)
    write_text(root / "latest", dst.name + "\n")
    _prune(root, keep_last)
    return dst


def write_log(run_dir: Path, history: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for row in history:
                w.writerow({k: row.get(k, "") for k in LOG_COLUMNS})

    write_atomic(Path(run_dir) / "train_log.csv", write)


def _check_compatible(saved: dict, now: dict) -> None:
    """Resuming with another model, data or target would silently mix two runs: refuse."""
    problems = []
    for key in ("data", "model"):
        if saved.get(key) != now.get(key):
            problems.append(f"{key}: checkpoint {saved.get(key)} vs now {now.get(key)}")
    for key in ("target", "standardize", "batch_size"):
        a, b = saved.get("training", {}).get(key), now.get("training", {}).get(key)
        if a != b:
            problems.append(f"training.{key}: checkpoint {a!r} vs now {b!r}")
    if problems:
        raise ValueError("cannot resume: the run directory's checkpoint was trained with a different config ("
                         + "; ".join(problems) + "). Use another run_name, or training.resume=false to start over.")


# --------------------------------------------------------------------------------------------------- training

def run_training(cfg) -> dict[str, Any]:
    """Train per ``cfg`` (the composed ``conf/length`` config, a DictConfig or a plain dict); returns the summary."""
    c = _plain(cfg)
    t_cfg, m_cfg = c["training"], c["model"]
    data_cfg = DataConfig.from_mapping(c["data"])
    run_dir = Path(c["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(c.get("progress", True))
    torch, _ = import_ml()
    device = pick_device(c.get("device", "auto"))
    threads = set_threads(c.get("num_threads"))
    seed = int(c.get("seed", 0))

    # ---- data
    frame = load_splits(data_cfg)
    train_df, val_df = split_frame(frame, "train"), split_frame(frame, "val")
    log.info("data %s (%s tokenizer): %s", data_cfg.source, data_cfg.tokenizer, split_summary(frame))

    # ---- resume?
    resume = str(t_cfg.get("resume", "auto")).lower()
    ckpt = None if resume in ("false", "0", "no") else latest_checkpoint(run_dir)
    if resume in ("true", "1", "yes") and ckpt is None:
        raise FileNotFoundError(f"training.resume=true but {checkpoint_dir(run_dir)} has no checkpoint")
    if ckpt is None and resume in ("false", "0", "no"):
        for sub in ("checkpoints", "best", "model"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)

    torch.manual_seed(seed)  # the new head's initialisation, then dropout
    state: dict[str, Any]
    if ckpt is not None:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        _check_compatible(state.get("config", {}), c)
        tok, model = load_model_and_tokenizer(str(ckpt))
        meta = EstimatorMeta.read(ckpt)
        log.info("resuming from %s (step %d)", ckpt, state["step"])
    else:
        tok, model = load_model_and_tokenizer(m_cfg["name_or_path"])
        transform = TargetTransform.fit(train_df["output_tokens"].to_numpy(), t_cfg.get("target", "log"),
                                        bool(t_cfg.get("standardize", True)))
        meta = EstimatorMeta(
            target=asdict(transform), max_length=effective_max_length(tok, model, int(m_cfg.get("max_length", 512))),
            truncation_side=str(m_cfg.get("truncation_side", "right")), max_output_tokens=data_cfg.max_model_len,
            base_model=str(m_cfg["name_or_path"]), count_tokenizer=data_cfg.tokenizer, data=data_cfg.to_dict())
        state = {"step": 0, "epoch": 0, "pos": 0, "history": [], "evals": [], "best_score": None, "best_step": None,
                 "bad_evals": 0, "elapsed_s": 0.0, "stopped": ""}
    model.to(device)
    model.train()
    transform = meta.transform
    estimator = TransformerEstimator(model, tok, meta, device=device, batch_size=int(t_cfg.get("eval_batch_size", 64)))

    # ---- encode once
    t0 = time.perf_counter()
    train_ids = encode(tok, train_df["prompt"].tolist(), meta.max_length, meta.truncation_side)
    val_ids = encode(tok, val_df["prompt"].tolist(), meta.max_length, meta.truncation_side) if len(val_df) else []
    lengths = np.array([len(x) for x in train_ids])
    y_train = transform.forward(train_df["output_tokens"].to_numpy()).astype(np.float32)
    y_val_tokens = val_df["output_tokens"].to_numpy()
    log.info("tokenised %d train / %d val prompts in %.1f s (mean %.0f tokens, cap %d)", len(train_ids),
             len(val_ids), time.perf_counter() - t0, lengths.mean(), meta.max_length)

    # ---- schedule
    bs = int(t_cfg.get("batch_size", 16))
    steps_per_epoch = math.ceil(len(train_ids) / bs)
    max_steps = t_cfg.get("max_steps")
    if max_steps is None:
        epochs = t_cfg.get("epochs")
        if not epochs:
            raise ValueError("set training.max_steps or training.epochs")
        max_steps = int(epochs) * steps_per_epoch
    max_steps = int(max_steps)
    warmup = int(t_cfg.get("warmup_steps") or round(float(t_cfg.get("warmup_ratio", 0.0)) * max_steps))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(t_cfg.get("weight_decay", 0.0))},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=float(t_cfg.get("lr", 1e-4)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(str(t_cfg.get("scheduler", "linear")), warmup, max_steps))
    if ckpt is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the schedule of *this* config (max_steps may have grown): the next step's lr, as LambdaLR computes it
        for g, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            g["lr"] = base * f(scheduler.last_epoch)
        torch.set_rng_state(state["torch_rng"])
        if device.startswith("cuda") and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if str(t_cfg.get("precision", "fp32")) == "bf16" and device.startswith("cuda") else None)

    def snapshot() -> dict:
        s = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "torch_rng", "cuda_rng")}
        s.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), torch_rng=torch.get_rng_state(),
                 config=c, max_steps=max_steps)
        if device.startswith("cuda"):
            s["cuda_rng"] = torch.cuda.get_rng_state()
        return s

    def evaluate_val() -> dict:
        z = forward_batches(model, tok, val_ids, int(t_cfg.get("eval_batch_size", 64)), device)
        zt = transform.forward(y_val_tokens)
        pred = np.maximum(1, np.round(transform.inverse(z)))
        return {"val_loss": float(np.mean((z - zt) ** 2)), "val_mae": mae_metric(y_val_tokens, pred)}

    select = str(t_cfg.get("select_metric", "mae"))
    patience = t_cfg.get("early_stopping_patience")
    delta = float(t_cfg.get("early_stopping_delta", 0.0))
    eval_every = int(t_cfg.get("eval_every") or 0)
    save_every = int(t_cfg.get("save_every") or 0)
    log_every = max(1, int(t_cfg.get("log_every", 10)))
    keep_last = int(t_cfg.get("keep_last", 2))
    max_time = t_cfg.get("max_time_s")
    grad_clip = float(t_cfg.get("grad_clip") or 0.0)
    group = bool(t_cfg.get("group_by_length", True))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=state["step"], desc=f"train {run_dir.name}", unit="step",
                   dynamic_ncols=True)
    session_t0 = time.perf_counter()
    elapsed_before = float(state.get("elapsed_s", 0.0))
    running, running_n = 0.0, 0
    last_saved = state["step"] if ckpt is not None else -1
    state["stopped"] = ""
    y_train_t = torch.from_numpy(y_train)
    loss_fn = torch.nn.MSELoss()

    while state["step"] < max_steps and not state["stopped"]:
        batches = epoch_batches(lengths, bs, seed, state["epoch"], group)
        while state["pos"] < len(batches):
            idx = batches[state["pos"]]
            ids = [train_ids[i] for i in idx]
            input_ids, mask = collate(tok, ids)
            target = y_train_t[idx].to(device)
            if autocast is not None:
                with autocast:
                    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            else:
                out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            loss = loss_fn(out.float().reshape(-1), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            state["pos"] += 1
            state["step"] += 1
            step = state["step"]
            running += float(loss.detach())
            running_n += 1
            elapsed = elapsed_before + time.perf_counter() - session_t0
            state["elapsed_s"] = elapsed
            row = None
            if step % log_every == 0 or step == max_steps:
                row = {"step": step, "epoch": state["epoch"], "loss": running / running_n, "lr": lr_now,
                       "elapsed_s": round(elapsed, 2)}
                running, running_n = 0.0, 0
            if val_ids and eval_every and (step % eval_every == 0 or step == max_steps):
                ev = evaluate_val()
                row = {**(row or {"step": step, "epoch": state["epoch"], "lr": lr_now,
                                  "elapsed_s": round(elapsed, 2)}), **ev}
                state["evals"].append({"step": step, **ev})
                score = ev["val_mae"] if select == "mae" else ev["val_loss"]
                if state["best_score"] is None or score < state["best_score"] - delta:
                    state["best_score"], state["best_step"], state["bad_evals"] = score, step, 0
                    meta.trained_steps = step
                    estimator.save(run_dir / "best")
                else:
                    state["bad_evals"] += 1
                    if patience is not None and state["bad_evals"] >= int(patience):
                        state["stopped"] = f"early stopping at step {step} (best step {state['best_step']})"
                if bar is not None:
                    bar.write(f"step {step}: val_loss {ev['val_loss']:.4f} val_mae {ev['val_mae']:.1f} tokens")
            if row is not None:
                state["history"].append(row)
                if bar is not None and "loss" in row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.2e}")
            if bar is not None:
                bar.update(1)
            if max_time is not None and elapsed - elapsed_before >= float(max_time):
                state["stopped"] = f"time limit {max_time} s at step {step}"
            if save_every and step % save_every == 0 and step != last_saved:
                save_checkpoint(run_dir, estimator, snapshot(), keep_last)
                write_log(run_dir, state["history"])
                last_saved = step
            if step >= max_steps or state["stopped"]:
                break
        else:
            state["epoch"] += 1
            state["pos"] = 0
    if bar is not None:
        bar.close()

    if state["step"] != last_saved:
        save_checkpoint(run_dir, estimator, snapshot(), keep_last)
    write_log(run_dir, state["history"])

    # ---- the estimator to use: best on val, else the last weights
    final_src = run_dir / "best" if (run_dir / "best").exists() and state.get("best_step") is not None else None
    tmp = run_dir / f"model.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if final_src is not None:
        shutil.copytree(final_src, tmp)
    else:
        meta.trained_steps = state["step"]
        estimator.write_into(tmp)
    replace_dir(tmp, run_dir / "model")

    summary = {
        "run_dir": str(run_dir), "model": m_cfg, "data": data_cfg.to_dict(), "splits": split_summary(frame),
        "training": t_cfg, "device": device, "num_threads": threads, "step": state["step"], "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch, "epoch": state["epoch"], "best_step": state.get("best_step"),
        "best_val_" + select: state.get("best_score"), "last_eval": state["evals"][-1] if state["evals"] else None,
        "elapsed_s": round(float(state["elapsed_s"]), 1), "stopped": state["stopped"] or "max_steps",
        "resumed_from": str(ckpt) if ckpt is not None else None, "target": asdict(transform),
        "max_length": meta.max_length,
    }
    write_text(run_dir / "train_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("done: step %d, %.0f s, model at %s", state["step"], state["elapsed_s"], run_dir / "model")
    return summary


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf/length", config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        s = run_training(cfg)
        last = s.get("last_eval") or {}
        print(f"trained {s['step']}/{s['max_steps']} steps in {s['elapsed_s']:.0f} s ({s['stopped']}); "
              f"val MAE {last.get('val_mae', float('nan')):.1f} tokens; estimator: {s['run_dir']}/model")

    _main()


if __name__ == "__main__":
    main()
