"""The training blocks an experiment turns on with one field of its own (harness.config.Experiment), and the
ways to shard it (`sharding:`), one descriptor each.

A descriptor says what the block does, the TrainingArguments (SFTConfig) fields that turn it on in each
Trainer engine or why that engine has none, why a CPU run is skipped where it needs a GPU, why the
simulation cannot trace it where it cannot, why a sharded experiment cannot have it, and the package it
imports. Where it acts is code: `prepare_for_training` (harness.step.models) or `build_training` /
`saved_tensors_context` (harness.step.train), and its activation rule in harness.predict.analytic.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.blocks.parts import Refusal, Unmapped

# Where a block sets the checkpointing kwargs: this version's field for them (engines.arguments.checkpointing_fields).
CHECKPOINTING_KWARGS = "checkpointing_kwargs"
TRAINER_ENGINES = ("trainer", "trl-sft")


@dataclass(frozen=True)
class Block:
    summary: str
    # engine -> the arguments that turn it on there, or why the engine has none
    engines: dict[str, dict | Unmapped]
    cuda_only: str | None = None       # why a run elsewhere is skipped; None: it runs anywhere
    not_simulated: str | None = None   # why fake tensors cannot trace it; None: the simulation does
    not_sharded: str | None = None     # why a sharded experiment cannot have it; None: it can
    package: str | None = None         # the module it imports that a machine may lack: without it a run is skipped
    refusals: tuple[Refusal, ...] = ()  # experiments it cannot be part of (checked when the file is read)


def _both(mapping) -> dict:
    """The same mapping for Trainer and SFTTrainer (SFTConfig is a TrainingArguments)."""
    return dict.fromkeys(TRAINER_ENGINES, mapping)


# The boolean fields, in the order their refusals are listed.
BLOCKS: dict[str, Block] = {
    "optimizer_in_backward": Block(
        "each parameter's optimizer stepped in a post-accumulate-grad hook as soon as its gradient is complete",
        _both(Unmapped("Trainer steps the optimizer after backward and clips, logs and schedules between; it has "
                       "no per-parameter optimizer step in backward (optimizer_in_backward)")),
        not_sharded="a sharded gradient is complete only after its reduce-scatter, which FSDP2 runs outside the "
                    "parameter's gradient hooks",
        refusals=(Refusal("optimizer_in_backward", lambda e, t: e.grad_accum > 1,
                          "a parameter steps as soon as its gradient is complete: there is nothing to accumulate into "
                          "(set grad_accum: 1)"),
                  Refusal("optimizer_in_backward", lambda e, t: t.loss_scaling,
                          "loss scaling checks every gradient for inf/NaN before any parameter steps; stepping in "
                          "backward cannot wait for that"))),
    "selective_checkpointing": Block(
        "checkpointing that keeps attention's outputs (TRL's selective policy)",
        {"trainer": Unmapped("TrainingArguments has no selective checkpointing (selective_checkpointing); TRL's "
                             "SFTTrainer has it, as gradient_checkpointing_kwargs selective: true (engine trl-sft)"),
         # TRL wraps the model with the policy the lab's selective checkpointing uses (keep attention's outputs).
         "trl-sft": {CHECKPOINTING_KWARGS: {"selective": True}}},
        package="trl",
        refusals=(Refusal("selective_checkpointing", lambda e, t: not e.gradient_checkpointing,
                          "selective checkpointing chooses what checkpointing keeps: it needs gradient_checkpointing: "
                          "true"),)),
    "activation_offloading": Block(
        "saved tensors to pinned host memory in forward and back in backward (TRL's OffloadActivations)",
        {"trainer": Unmapped("TrainingArguments has no activation offloading (activation_offloading); TRL's "
                             "SFTConfig has it (engine trl-sft)"),
         "trl-sft": {"activation_offloading": True}},
        cuda_only="offloading moves saved activations from GPU memory to host memory; on a CPU they are in host "
                  "memory already (TRL's OffloadActivations needs an accelerator)",
        package="trl"),
    "liger_kernels": Block(
        "Liger's Triton kernels: RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy (no logits held)",
        _both({"use_liger_kernel": True}),
        cuda_only="Liger's kernels are Triton kernels, which run on GPUs",
        package="liger_kernel"),  # simulated by stand-ins for its autograd Functions (harness.predict.liger)
    "compile": Block(
        "torch.compile on the model (inductor)", _both({"torch_compile": True}),
        cuda_only="inductor's CPU kernels say nothing of a GPU's memory or speed, and compiling the step alone "
                  "takes over a minute on 2 CPU cores"),
}

_DEEPSPEED = ("fake tensors cannot trace DeepSpeed's ZeRO engine (its partitioned parameters and its gradient "
              "hooks hold real storage); its memory per rank is predicted by the analytic method, with DeepSpeed's "
              "own estimators beside it")
_TRAINER_SHARDS = _both(Unmapped("Trainer shards through accelerate's FSDP and DeepSpeed plugins (an accelerate "
                                 "config and a launcher), which the Trainer engines do not map yet (sharding)"))

# The values of `sharding:` other than none (harness.step.sharding, harness.step.zero).
SHARDINGS: dict[str, Block] = {
    "fsdp2": Block("torch's FSDP2, fully_shard per decoder layer", _TRAINER_SHARDS),
    "zero2": Block("DeepSpeed's ZeRO stage 2: gradients and optimizer state partitioned", _TRAINER_SHARDS,
                   not_simulated=_DEEPSPEED, package="deepspeed"),
    "zero3": Block("DeepSpeed's ZeRO stage 3: parameters, gradients and optimizer state partitioned",
                   _TRAINER_SHARDS, not_simulated=_DEEPSPEED, package="deepspeed"),
}


def blocks_on(cfg) -> list[tuple[str, Block]]:
    """The blocks an experiment turns on, each as (its key: the field, or `sharding=<way>`, and its descriptor)."""
    on = [(name, block) for name, block in BLOCKS.items() if getattr(cfg, name)]
    return on + ([(f"sharding={cfg.sharding}", SHARDINGS[cfg.sharding])] if cfg.sharding != "none" else [])
