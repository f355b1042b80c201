"""Sharding with DeepSpeed's ZeRO (stage 2: gradients and optimizer state; stage 3: parameters too).

The lab builds its model and torch optimizer as for any technique; `initialize` hands both to
`deepspeed.initialize`, which partitions them over the ranks of the process group already joined.
The engine then owns backward (its hooks reduce-scatter each gradient into its partition) and the
optimizer step: the step object `ZeroStep` stands where a torch optimizer stands in
harness.step.train, so the lab's one training step drives it.

Mixed precision is DeepSpeed's own: with a 16-bit autocast the engine holds 16-bit weights and the
optimizer fp32 master partitions (its `bf16`/`fp16` sections, fp16 with its own loss scale).
Gradient accumulation is the lab's: each micro-batch's loss is already divided by their number, and
`managed_gradient_accumulation: false` makes every `step()` the accumulation boundary.
With `cpu_offload` the optimizer's partitions (and for stage 3 the parameters') live in host memory
and the client optimizer (torch's AdamW, not DeepSpeed's compiled CPU Adam) steps there.
"""

from __future__ import annotations

STAGES = {"zero2": 2, "zero3": 3}


def is_zero(cfg) -> bool:
    return cfg.sharding in STAGES


def ds_config(technique, cfg, hidden_size: int) -> dict:
    """DeepSpeed's configuration for an experiment: what the record keeps as the engine's settings.

    Bucket sizes follow the model's width as transformers' Trainer fills DeepSpeed's `auto` values
    (DeepSpeed's own defaults, 5e8 elements, are buffers of a gigabyte whatever the model)."""
    stage = STAGES[cfg.sharding]
    zero = {"stage": stage, "reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size}
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
              "managed_gradient_accumulation": False, "zero_optimization": zero,
              # the client optimizer steps the offloaded partitions (DeepSpeed would want its own CPU Adam)
              "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1}
    if technique.autocast in ("bf16", "fp16"):
        config[technique.autocast] = {"enabled": True}
    return config


class ZeroStep:
    """The optimizer of harness.step.train for a DeepSpeed engine: the engine runs backward and steps."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the lab divided the loss by the micro-batches already

    def step(self) -> None:
        self.engine.step()  # reduces what is left, steps the partitions, zeroes the gradients

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the engine's step zeroes them

    @property
    def state(self) -> dict:
        """The client optimizer's state (its moments of the fp32 partitions): what the tracker labels."""
        return self.engine.optimizer.optimizer.state

    def partitions(self) -> dict[str, list]:
        """This rank's flat partitions by memory category: the 16-bit weights the engine computes with, the
        optimizer's fp32 master copy (optimizer state, as in bitsandbytes' and torch's mixed-precision states)
        and, in stage 3, the gradient partitions' buffer (stage 2 builds its gradient partitions in the step,
        where they count as the step's own)."""
        zero = self.engine.optimizer
        weights = getattr(zero, "bit16_groups_flat", None) or getattr(zero, "fp16_partitioned_groups_flat", [])
        masters = (getattr(zero, "single_partition_of_fp32_groups", None)
                   or getattr(zero, "fp32_partitioned_groups_flat", []))
        gradients = getattr(zero, "grad_partitions_flat_buffer", None)
        return {"weights": list(weights), "optimizer_state": list(masters),
                "gradients": [gradients] if gradients is not None else []}


def initialize(model, optimizer, technique, cfg):
    """The DeepSpeed engine around a built model and its torch optimizer; returns (engine, ZeroStep)."""
    import deepspeed

    config = ds_config(technique, cfg, model.config.hidden_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, ZeroStep(engine)


def description(technique, cfg, hidden_size: int) -> dict:
    """Which library sharded, and how (for the run's record)."""
    import deepspeed

    return {"library": "deepspeed", "version": deepspeed.__version__, "method": f"ZeRO stage {STAGES[cfg.sharding]}",
            "config": ds_config(technique, cfg, hidden_size)}
