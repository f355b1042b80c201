"""A base model the lab pretrains itself, so that loss comparisons mean something offline.

Random weights give the real memory and speed of a technique but say nothing about what it
costs in loss. `harness base` pretrains a small Llama-shaped model on the standard
library's modules (bf16 mixed precision, a fixed token budget) and caches the checkpoint
with its tokenizer; experiments name it as `model: base` and fine-tune it on the standard
library's tests, a different kind of text, with a held-out split to evaluate on.

The recipe (and so the checkpoint) depends on the device class: a few million parameters
on a CPU (minutes), a ~100M-parameter model on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BASE_SOURCE = "base"
PRETRAIN_DATA = "stdlib-lib"  # the fine-tunes (experiments/matrix.yaml) use stdlib-tests


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the checkpoint: its id is a digest of these fields."""
    preset: str
    steps: int
    seq_len: int
    micro_batch: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_sequences: int = 64
    max_bytes: int = 4_000_000
    seed: int = 0
    technique: str = "bf16-mixed"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    final_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak

    @property
    def tokens(self) -> int:
        return self.steps * self.micro_batch * self.seq_len


RECIPES = {
    # ~5M parameters, ~0.6M tokens: a minute or two on 2 CPU cores.
    "cpu": Recipe("tiny-llama", steps=300, seq_len=128, micro_batch=16, lr=3e-3, warmup_steps=30, eval_every=50),
    # ~100M parameters, ~66M tokens: sized to take minutes on one H100 (an estimate: not yet run).
    "cuda": Recipe("llama-100m", steps=2000, seq_len=1024, micro_batch=32, lr=1e-3, warmup_steps=100,
                   eval_every=250, max_bytes=40_000_000),
}


def recipe_id(recipe: Recipe) -> str:
    from harness.presets import PRESETS

    # the preset's shape too: a changed preset is a different model under the same name
    identity = {**asdict(recipe), "shape": PRESETS[recipe.preset]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{recipe.preset}-{digest}"


def checkpoint_dir(recipe: Recipe) -> Path:
    from harness.data import cache_dir

    return cache_dir() / "base" / recipe_id(recipe)


def base_checkpoint_path(device_type: str = "cpu") -> Path | None:
    """The cached base checkpoint for a device class, or None if it has not been pretrained."""
    folder = checkpoint_dir(RECIPES[device_type])
    return folder if (folder / "pretraining.json").exists() else None


def base_identity(device_type: str) -> str | None:
    """Which pretrained checkpoint `model: base` means now: the recipe and a digest of its
    pretraining record, so that retraining the base (`--force`) makes every fine-tune on it
    a new configuration. None where it has not been pretrained yet."""
    folder = base_checkpoint_path(device_type)
    if folder is None:
        return None
    digest = hashlib.sha256((folder / "pretraining.json").read_bytes()).hexdigest()[:8]
    return f"{folder.name}@{digest}"


def resolve_base(device_type: str) -> Path:
    folder = base_checkpoint_path(device_type)
    if folder is None:
        raise FileNotFoundError(f"model source '{BASE_SOURCE}': no pretrained base for {device_type} yet; "
                                "run `make base` (python -m harness base) first")
    return folder


def _lr_factor(recipe: Recipe):
    """Linear warm-up, then cosine decay to final_lr_ratio of the peak."""
    floor = recipe.final_lr_ratio

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def pretrain(recipe: Recipe, device_type: str, results_dir: str | Path = "results", log=print) -> dict:
    """Pretrain, evaluate on held-out modules, save checkpoint and tokenizer, write a record."""
    from types import SimpleNamespace

    import torch

    from harness import records
    from harness.config import DataSettings, LoraSettings, OptimSettings
    from harness.data import load_batches
    from harness.models import resolve_source
    from harness.techniques import TECHNIQUES
    from harness.train import Progress, build_training, evaluate, train_step

    started = time.perf_counter()
    device = torch.device(device_type)
    torch.manual_seed(recipe.seed)
    source = resolve_source(recipe.preset)
    vocab = source.config.vocab_size
    # a random-init preset gets a BPE of its vocabulary size trained on the training split
    data = DataSettings(source=PRETRAIN_DATA, max_bytes=recipe.max_bytes)
    batches, tokenizer, data_info = load_batches(data, source, recipe.seq_len, recipe.micro_batch, 1, recipe.seed)
    held_out, _, held_out_info = load_batches(data, source, recipe.seq_len, recipe.eval_sequences, 1, recipe.seed,
                                              split="eval", tokenizer=tokenizer)
    eval_batch = held_out.step(0, device)[0]

    technique = TECHNIQUES[recipe.technique]
    cfg = SimpleNamespace(seed=recipe.seed, attn_implementation="sdpa", trust_remote_code=False,
                          lora=LoraSettings(), gradient_checkpointing=False,
                          optim=OptimSettings(lr=recipe.lr, weight_decay=recipe.weight_decay,
                                              betas=list(recipe.betas)))
    model, optimizer, scaler = build_training(source, technique, cfg, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(recipe))
    progress, evaluations = Progress(), []
    uniform = math.log(vocab)
    evaluations.append({"step": 0, "loss": evaluate(model, eval_batch, technique.autocast, recipe.micro_batch)})
    log(f"base {recipe_id(recipe)}: {recipe.tokens:,} tokens, held-out loss at start "
        f"{evaluations[0]['loss']:.3f} (uniform: ln {vocab} = {uniform:.3f})")
    for step in range(recipe.steps):
        loss = train_step(model, optimizer, batches.step(step, device), technique.autocast, scaler, progress)
        progress.losses.append(float(loss))
        schedule.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            evaluations.append({"step": step + 1,
                                "loss": evaluate(model, eval_batch, technique.autocast, recipe.micro_batch)})
            log(f"  step {step + 1}/{recipe.steps}: train loss {progress.losses[-1]:.3f}, "
                f"held-out loss {evaluations[-1]['loss']:.3f} ({time.perf_counter() - started:.0f} s)")

    folder = checkpoint_dir(recipe)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    environment = records.current_environment(device_type)
    record = {"kind": "base", "schema_version": 1, "recipe": asdict(recipe), "recipe_id": recipe_id(recipe),
              "technique": recipe.technique, "data": {"source": PRETRAIN_DATA, "corpus": data_info["corpus"],
                                                  "tokens": data_info["tokens"],
                                                  "held_out_tokens": held_out_info["tokens"]},
              "parameters": sum(p.numel() for p in model.parameters()), "tokens_trained": recipe.tokens,
              "uniform_loss": uniform, "train_loss": progress.losses, "held_out": evaluations,
              "final_held_out_loss": evaluations[-1]["loss"], "seconds": time.perf_counter() - started,
              "device_type": device_type, "environment": environment, "git": records.git_state(),
              "finished_at": records.now()}
    (staging / "pretraining.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    records.write_atomic(Path(results_dir) / "base" / f"{records.device_slug(environment['device_name'])}"
                         f"__{recipe_id(recipe)}.json", record)
    return record


def main(args) -> int:
    from harness import records

    device_type = records.resolve_device(args.device)
    recipe = RECIPES[device_type]
    existing = base_checkpoint_path(device_type)
    if existing is not None and not args.force:
        record = json.loads((existing / "pretraining.json").read_text())
        print(f"base {recipe_id(recipe)} is pretrained already ({existing}): held-out loss "
              f"{record['final_held_out_loss']:.3f} vs uniform {record['uniform_loss']:.3f}; --force retrains")
        return 0
    record = pretrain(recipe, device_type, args.out)
    print(f"base saved to {checkpoint_dir(recipe)}: held-out loss {record['final_held_out_loss']:.3f} "
          f"(uniform {record['uniform_loss']:.3f}) after {record['tokens_trained']:,} tokens, "
          f"{record['seconds']:.0f} s")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default="results", help="results folder for the pretraining record")
    parser.add_argument("--force", action="store_true", help="pretrain again even if a checkpoint exists")
