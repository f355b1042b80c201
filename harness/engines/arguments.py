"""An experiment as transformers' TrainingArguments (TRL's SFTConfig for trl-sft).

Every field the experiment decides is mapped here, once; `training_args:` in an experiment file
adds the user's own fields on top, except those the experiment (or the measurement) owns.
Importing this module does not import torch or transformers.
"""

from __future__ import annotations

from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.parts import BuiltForTrainer, NotMapped, Unmapped
from harness.blocks.training import BLOCKS as TRAINING_BLOCKS
from harness.blocks.training import CHECKPOINTING_KWARGS, blocks_on

# The building blocks that are experiment fields (harness.config.Experiment), by engine: the
# arguments that turn each on, or why the engine has none, as each block's descriptor says. CUDA-only
# blocks never reach an engine on a CPU: the worker skips them first.
BLOCKS = {name: block.engines for name, block in TRAINING_BLOCKS.items()}

# The experiment's optimizers by TrainingArguments' `optim` names (by device type where they differ),
# or why Trainer has none, as each optimizer's descriptor says; those the lab builds for Trainer's
# `optimizers` argument (LoRA+) have no name there.
OPTIM_NAMES = {name: optimizer.trainer for name, optimizer in OPTIMIZERS.items()
               if not isinstance(optimizer.trainer, BuiltForTrainer)}

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
    "optim": f"optimizer ({', '.join(name for name, o in OPTIMIZERS.items() if not isinstance(o.trainer, Unmapped))})",
    "optim_target_modules": "optimizer (galore_adamw: the decoder's linear layers)",
    "optim_args": ", ".join(f"optim.{s.name}" for o in OPTIMIZERS.values() if o.trainer_arguments for s in o.settings),
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "gradient_checkpointing (non-reentrant) and selective_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing (non-reentrant) and selective_checkpointing",
    **{field: block for block, engines in BLOCKS.items() for mapping in engines.values()
       if isinstance(mapping, dict) for field in mapping if field != CHECKPOINTING_KWARGS},
    # Either would turn a block on, or make it other than the lab's, behind the experiment's back.
    "torch_compile_backend": "compile (torch.compile's defaults, as the lab compiles)",
    "torch_compile_mode": "compile (torch.compile's defaults, as the lab compiles)",
    "liger_kernel_config": "liger_kernels (Liger's defaults, as the lab applies them)",
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


# Arguments by which Trainer or TRL send something off this machine (the hub; trackers and their
# spaces): a measurement sends nothing, so they are refused by name, whatever their value.
SENDING_PREFIXES = ("push_to_hub", "hub_", "trackio_")
SENDING_FIELDS = ("report_to",)


def sends_data(key: str) -> str | None:
    """Why a training argument is refused for sending data (None if it sends nothing)."""
    if key.startswith(SENDING_PREFIXES) or key in SENDING_FIELDS:
        return ("sends data off this machine (the hub, or a tracker's integration); a measurement sends "
                "nothing, so no experiment may set it")
    return None


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


def block_arguments(cfg, engine: str) -> dict:
    """The arguments of the experiment's building blocks (blocks_on) in this engine; NotMapped naming
    every block it has no counterpart for."""
    mappings = [block.engines[engine] for _, block in blocks_on(cfg)]
    refused = [m.reason for m in mappings if isinstance(m, Unmapped)]
    if refused:
        raise NotMapped("; ".join(refused))
    return {field: value for mapping in mappings for field, value in mapping.items()}


def optim_name(optimizer: str, device_type: str) -> str | None:
    """TrainingArguments' `optim` for the experiment's optimizer (None for one the lab builds for Trainer's
    `optimizers`, such as LoRA+)."""
    optim = OPTIMIZERS[optimizer].trainer
    if isinstance(optim, BuiltForTrainer):
        return None
    if isinstance(optim, Unmapped):
        raise NotMapped(optim.reason)
    return optim["cuda" if device_type == "cuda" else "cpu"] if isinstance(optim, dict) else optim


def mapped_arguments(cfg, technique, engine: str, device_type: str, output_dir: str,
                     model_config) -> tuple[dict, list[str]]:
    """TrainingArguments fields of an experiment in `engine` (trainer or trl-sft) on a model of
    `model_config`, and where the Trainer's step still differs from the lab's; NotMapped where it
    cannot express the experiment."""
    blocks = block_arguments(cfg, engine)
    if technique.loss_scaling != (technique.autocast == "fp16"):
        raise NotMapped(f"Trainer scales the loss exactly when fp16 autocast is on (fp16: true); this experiment "
                        f"has autocast {technique.autocast} with loss_scaling {technique.loss_scaling}")
    if technique.autocast == "fp16" and device_type == "cpu":
        raise NotMapped("accelerate runs fp16 mixed precision on an accelerator only: on a CPU, Trainer with "
                        "fp16: true trains in fp32, without autocast or loss scaling")
    optim = optim_name(technique.optimizer, device_type)
    optimizer = OPTIMIZERS[technique.optimizer]
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
    checkpointing = blocks.pop(CHECKPOINTING_KWARGS, {})
    arguments[flag] = cfg.gradient_checkpointing
    if cfg.gradient_checkpointing:
        arguments[kwargs] = {"use_reentrant": False, **checkpointing}
    arguments.update(blocks)
    notes = []
    if optim is not None:
        arguments["optim"] = optim
    if optimizer.trainer_arguments:
        more, more_notes = optimizer.trainer_arguments(cfg, model_config)
        arguments.update(more)
        notes += more_notes
    if cfg.optim.weight_decay and optimizer.trainer_decay_groups:
        notes.append("Trainer decays no bias or norm weight (get_decay_parameter_names); the lab's AdamW decays "
                     "every trainable tensor")
    user = dict(cfg.training_args)
    if user:
        notes.append("the experiment's training_args: " + ", ".join(f"{k}={v!r}" for k, v in sorted(user.items())))
    return {**arguments, **user}, notes
