"""One explicit training step, in the spirit of nanoGPT: forward, backward, optimizer.

Gradient accumulation divides each micro-batch's mean loss by the number of
micro-batches. Every micro-batch holds the same number of tokens (fixed-length windows,
no padding), so this equals the mean over the whole batch exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """Where the run is, so that a failure can say where it happened."""
    phase: str = "load"
    step: int | None = None
    losses: list[float] = field(default_factory=list)


def no_phase(name: str):
    return nullcontext()


def train_step(model, optimizer, micro_batches: list[torch.Tensor], autocast: str, scaler,
               progress: Progress, phase=no_phase, after_backward=None) -> float:
    """One optimizer step over `micro_batches`; returns the step's mean loss."""
    device_type = micro_batches[0].device.type
    dtype = AUTOCAST_DTYPES.get(autocast)
    total = torch.zeros((), device=micro_batches[0].device)
    for input_ids in micro_batches:
        progress.phase = "forward"
        with phase("forward"), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=input_ids, labels=input_ids).loss / len(micro_batches)
        progress.phase = "backward"
        with phase("backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
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
    return float(total)

