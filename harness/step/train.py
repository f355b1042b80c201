"""One explicit training step, in the spirit of nanoGPT: forward, backward, optimizer.

Gradient accumulation divides each micro-batch's mean loss by the number of
micro-batches. Every micro-batch holds the same number of tokens (fixed-length windows,
no padding), so this equals the mean over the whole batch exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from harness.blocks.optimizers import OPTIMIZERS
from harness.step import sharding, zero
from harness.step.models import (
    DTYPES,
    build_base_model,
    materialize_model,
    prepare_for_training,
    quantized_layers,
)


@dataclass
class Progress:
    """Where the run is, so that a failure can say where it happened."""
    phase: str = "load"
    step: int | None = None
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)  # held-out loss: {"step", "loss"}


def no_phase(name: str):
    return nullcontext()


def build_training(source, technique, cfg, device: torch.device, optimizer_device: str | None = None, mesh=None):
    """Model, optimizer and loss scaler for a technique: the one code path runs and simulations share.

    optimizer_device picks the optimizer variant of another device type (a simulation of a
    CUDA step on CPU fake tensors gets the fused AdamW a CUDA run gets); mesh: the ranks a sharded
    model is sharded over (a simulation's fake ones; by default every rank of the process group).
    With DeepSpeed's ZeRO the model is its engine and the optimizer a `zero.ZeroStep`, which runs
    backward itself (`backward`).
    """
    sharded = cfg.sharding == "fsdp2"
    model = build_base_model(source, technique, device, cfg.seed, cfg.attn_implementation, cfg.trust_remote_code,
                             materialize=not sharded)
    model = prepare_for_training(model, technique, cfg.lora, cfg.gradient_checkpointing, cfg.selective_checkpointing,
                                 cfg.liger_kernels)
    if sharded:
        model = sharding.fully_shard_model(model, technique, cfg.cpu_offload, device, mesh)
        if source.random_init:
            materialize_model(model, device, DTYPES[technique.weights], cfg.seed)
            sharding.reset_adapters(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def build(params):
        return OPTIMIZERS[technique.optimizer].build(params, cfg.optim, optimizer_device or device.type, model=model)

    optimizer = optimizer_in_backward(trainable, build) if cfg.optimizer_in_backward else build(trainable)
    if zero.is_zero(cfg):  # DeepSpeed partitions the built model and optimizer, and scales fp16 losses itself
        model, optimizer = zero.initialize(model, optimizer, technique, cfg)
    scaler = torch.amp.GradScaler(device.type) if technique.loss_scaling and not zero.is_zero(cfg) else None
    if cfg.compile:
        model = torch.compile(model)
    return model, optimizer, scaler


def saved_tensors_context(model, cfg):
    """What the forward pass runs under: TRL's activation offloading (the tensors autograd saves
    go to pinned host memory, on a side stream, and come back in backward; the output head's stay),
    as SFTTrainer sets it up; otherwise nothing. One context serves every step."""
    if not cfg.activation_offloading:
        return nullcontext()
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    return get_act_offloading_ctx_manager(model)


@dataclass
class StepsInBackward:
    """The optimizer of a step fused into backward: every parameter has its own optimizer, which a
    post-accumulate-grad hook steps as soon as the parameter's gradient is complete, then frees
    the gradient (torch's recipe, "How to save memory by fusing the optimizer step into the
    backward pass"). All gradients are never alive at once; after backward nothing is left to do."""
    per_parameter: dict

    @property
    def state(self) -> dict:  # what the memory tracker labels optimizer state
        return {p: state for optimizer in self.per_parameter.values() for p, state in optimizer.state.items()}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def optimizer_in_backward(params: list, build) -> StepsInBackward:
    per_parameter = {p: build([p]) for p in params}

    def step_now(p):
        per_parameter[p].step()
        per_parameter[p].zero_grad(set_to_none=True)

    for p in params:
        p.register_post_accumulate_grad_hook(step_now)
    return StepsInBackward(per_parameter)


def backward(loss: torch.Tensor, optimizer, scaler) -> None:
    """A micro-batch's backward pass: through the loss scaler, or the optimizer's own where it runs
    backward itself (a DeepSpeed engine's, whose hooks partition the gradients)."""
    if isinstance(optimizer, zero.ZeroStep):
        optimizer.backward(loss)
    else:
        (scaler.scale(loss) if scaler is not None else loss).backward()


def train_step(model, optimizer, micro_batches: list[torch.Tensor], autocast: str, scaler,
               progress: Progress, phase=no_phase, after_backward=None, saved_tensors=None) -> torch.Tensor:
    """One optimizer step over `micro_batches`; returns the step's mean loss (a 0-d tensor).

    saved_tensors: the context the forward passes run under (saved_tensors_context).

    The loss stays a tensor so that the step never waits for the device (and so that it
    can run under fake tensors); callers convert it outside the timed region.
    """
    device_type = micro_batches[0].device.type
    dtype = DTYPES.get(autocast)
    total = torch.zeros((), device=micro_batches[0].device)
    for input_ids in micro_batches:
        progress.phase = "forward"
        with (phase("forward"), saved_tensors or nullcontext(),
              torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)):
            loss = model(input_ids=input_ids, labels=input_ids).loss / len(micro_batches)
        progress.phase = "backward"
        with phase("backward"):
            backward(loss, optimizer, scaler)
        total += loss.detach().float()
    if after_backward is not None:
        after_backward()
    progress.phase = "optimizer"
    with phase("optimizer"):
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def evaluate(model, sequences: torch.Tensor, autocast: str, micro_batch: int) -> float:
    """Mean next-token loss over held-out sequences (no gradients), in chunks of micro_batch."""
    dtype = DTYPES.get(autocast)
    was_training = model.training
    model.eval()
    # On CPU, bitsandbytes repacks a 4-bit weight in place for its inference kernel the first
    # time a Linear4bit runs in eval mode, and the new layout stays for the rest of training
    # (it also fails on widths that are not a multiple of 32). The layer has no dropout, so
    # leaving it in training mode changes nothing else.
    linear_4bit = tuple(layer for layer, quantization in quantized_layers().items() if quantization.bits == 4)
    for module in model.modules():
        if isinstance(module, linear_4bit):
            module.train()
    losses = []
    with torch.no_grad(), torch.autocast(sequences.device.type, dtype=dtype, enabled=dtype is not None):
        for chunk in sequences.split(micro_batch):
            # every sequence has the same length, so the mean of chunk means is the mean
            losses.append(float(model(input_ids=chunk, labels=chunk).loss) * len(chunk))
    model.train(was_training)
    return sum(losses) / len(sequences)
