"""`harness base`: pretrain the lab's base model (recipe and identity: harness.step.checkpoint).

bf16 mixed precision (fp32 on a CPU that only emulates bf16) on the standard library's modules, a fixed token budget, held-out loss
along the way; the checkpoint and tokenizer are cached and the pretraining record is written
to results/base/.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from harness import env, schema
from harness.step.checkpoint import (
    PRETRAIN_DATA,
    PRETRAINING_FILE,
    Recipe,
    base_checkpoint_path,
    checkpoint_dir,
    recipe_for,
    recipe_id,
    weights_digest,
)


def _lr_factor(recipe: Recipe):
    """Linear warm-up, then cosine decay to final_lr_ratio of the peak."""
    floor = recipe.final_lr_ratio

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def pretrain(recipe: Recipe, device_type: str, results_dir: str | Path = "results",
             log=print) -> schema.BaseRecord:
    """Pretrain, evaluate on held-out modules, save checkpoint and tokenizer, write a record."""
    import torch

    from harness.config import DataSettings, Experiment, OptimSettings
    from harness.step.data import load_batches
    from harness.step.models import resolve_source
    from harness.step.train import Progress, build_training, evaluate, train_step
    from harness.techniques import TECHNIQUES

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
    cfg = Experiment(technique=recipe.technique, model=recipe.preset, seed=recipe.seed,
                     optim=OptimSettings(lr=recipe.lr, weight_decay=recipe.weight_decay, betas=list(recipe.betas)))
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
    environment = env.current_environment(device_type)
    record = schema.BaseRecord(
        recipe=asdict(recipe), recipe_id=recipe_id(recipe), technique=recipe.technique,
        data={"source": PRETRAIN_DATA, "corpus": data_info["corpus"], "tokens": data_info["tokens"],
              "held_out_tokens": held_out_info["tokens"]},
        parameters=sum(p.numel() for p in model.parameters()), tokens_trained=recipe.tokens, uniform_loss=uniform,
        train_loss=progress.losses, held_out=evaluations, final_held_out_loss=evaluations[-1]["loss"],
        seconds=time.perf_counter() - started, device_type=device_type, environment=environment,
        git=env.git_state(), finished_at=env.now(), weights_digest=weights_digest(staging))
    schema.write(staging / PRETRAINING_FILE, record)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    schema.write(schema.base_record_path(results_dir, env.device_slug(environment["device_name"]), record.identity),
                 record)
    return record


def main(args) -> int:
    device_type = env.resolve_device(args.device)
    recipe = recipe_for(device_type)
    existing = base_checkpoint_path(device_type)
    if existing is not None and not args.force:
        record = schema.read(existing / PRETRAINING_FILE, kind="base")
        print(f"base {recipe_id(recipe)} is pretrained already ({existing}): held-out loss "
              f"{record.final_held_out_loss:.3f} vs uniform {record.uniform_loss:.3f}; --force retrains")
        return 0
    record = pretrain(recipe, device_type, args.out)
    print(f"base saved to {checkpoint_dir(recipe)}: held-out loss {record.final_held_out_loss:.3f} "
          f"(uniform {record.uniform_loss:.3f}) after {record.tokens_trained:,} tokens, {record.seconds:.0f} s")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default="results", help="results folder for the pretraining record")
    parser.add_argument("--force", action="store_true", help="pretrain again even if a checkpoint exists")
