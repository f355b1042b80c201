"""An experiment as transformers' TrainingArguments (TRL's SFTConfig for trl-sft).

Every field the experiment decides is mapped here, once; `training_args:` in an experiment file
adds the user's own fields on top, except those the experiment (or the measurement) owns.
Importing this module does not import torch or transformers.
"""

from __future__ import annotations

# TrainingArguments fields an experiment sets itself, with what sets them: a user's training_args
# may not set them again (one fact in one place).
OWNED = {
    "per_device_train_batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "max_steps": "steps (and warmup_steps, the untimed steps before them)",
    "num_train_epochs": "steps (and warmup_steps, the untimed steps before them)",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "bf16": "the technique's autocast (autocast: bf16)",
    "fp16": "the technique's autocast (autocast: fp16, with loss_scaling)",
    "optim": "optimizer (adamw, adamw8bit, paged_adamw8bit, paged_adamw, loraplus)",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "seed": "seed",
    "data_seed": "seed",
    "use_cpu": "device",
    "max_length": "seq_len",
    "packing": "the engine (trl-sft packs)",
    # What the measurement needs: the same sequences in the same order, every step's loss, nothing
    # written or sent during the run.
    "train_sampling_strategy": "the lab: sequential, so that every engine sees the same sequences in order",
    "logging_strategy": "the lab: every step's loss is logged",
    "logging_steps": "the lab: every step's loss is logged",
    "output_dir": "the lab: a temporary folder",
    "report_to": "the lab: nothing is reported elsewhere during a measurement",
    "save_strategy": "the lab: nothing is saved during a measurement",
    "eval_strategy": "eval_every (the lab's held-out loss)",
}

# The experiment's optimizers by TrainingArguments' `optim` names. LoRA+ has no name there: peft's
# create_loraplus_optimizer goes to Trainer's `optimizers` argument, as peft documents it.
OPTIM_NAMES = {"adamw": {"cuda": "adamw_torch_fused", "cpu": "adamw_torch"},
               "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit",
               "paged_adamw": "paged_adamw_32bit"}


class NotMapped(Exception):
    """An experiment this engine cannot run as it is: the record is `skipped` with the reason."""


def owned_field(key: str) -> str | None:
    return OWNED.get(key)


def arguments_class(engine: str) -> type:
    if engine == "trl-sft":
        from trl import SFTConfig

        return SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def checkpointing_fields() -> tuple[str, str]:
    """Checkpointing's TrainingArguments fields: transformers 5.2x renamed gradient_* to activation_*."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return f"{prefix}_checkpointing", f"{prefix}_checkpointing_kwargs"


def mapped_arguments(cfg, technique, device_type: str, output_dir: str) -> tuple[dict, list[str]]:
    """TrainingArguments fields of an experiment, and where the Trainer's step still differs from the
    lab's; NotMapped where it cannot express the experiment."""
    if cfg.optimizer_in_backward:
        raise NotMapped("Trainer steps the optimizer after backward and clips, logs and schedules between; "
                        "it has no per-parameter optimizer step in backward (optimizer_in_backward)")
    # Trainer has counterparts of these (use_liger_kernel, torch_compile; SFTConfig's activation_offloading),
    # not mapped here yet: refused rather than approximated.
    unmapped = [name for name in ("selective_checkpointing", "activation_offloading", "liger_kernels", "compile")
                if getattr(cfg, name)]
    if unmapped:
        raise NotMapped(f"{', '.join(unmapped)}: not mapped to Trainer's arguments yet")
    if technique.loss_scaling != (technique.autocast == "fp16"):
        raise NotMapped(f"Trainer scales the loss exactly when fp16 autocast is on (fp16: true); this experiment "
                        f"has autocast {technique.autocast} with loss_scaling {technique.loss_scaling}")
    if technique.autocast == "fp16" and device_type == "cpu":
        raise NotMapped("accelerate runs fp16 mixed precision on an accelerator only: on a CPU, Trainer with "
                        "fp16: true trains in fp32, without autocast or loss scaling")
    optim = OPTIM_NAMES.get(technique.optimizer)
    if technique.optimizer != "loraplus" and optim is None:
        raise NotMapped(f"optimizer {technique.optimizer!r} is not mapped to a TrainingArguments `optim` yet")
    if isinstance(optim, dict):
        optim = optim["cuda" if device_type == "cuda" else "cpu"]
    arguments = dict(
        output_dir=output_dir, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.warmup_steps + cfg.steps + 1,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        # The lab's step: a constant learning rate and no clipping (Trainer's defaults: linear decay, 1.0).
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        bf16=technique.autocast == "bf16", fp16=technique.autocast == "fp16",
        seed=cfg.seed, use_cpu=device_type == "cpu", train_sampling_strategy="sequential",
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    # As the lab's own loop: non-reentrant checkpointing works with a frozen base.
    flag, kwargs = checkpointing_fields()
    arguments[flag] = cfg.gradient_checkpointing
    if cfg.gradient_checkpointing:
        arguments[kwargs] = {"use_reentrant": False}
    if optim is not None:
        arguments["optim"] = optim
    notes = []
    if cfg.optim.weight_decay:
        notes.append("Trainer decays no bias or norm weight (get_decay_parameter_names); the lab's AdamW decays "
                     "every trainable tensor")
    user = dict(cfg.training_args)
    if user:
        notes.append("the experiment's training_args: " + ", ".join(f"{k}={v!r}" for k, v in sorted(user.items())))
    return {**arguments, **user}, notes
