"""The registry of techniques: named choices of building blocks, and what the blocks combine with.

A technique is a named choice of building blocks: the dtype the model is materialised
in, autocast, loss scaling, base quantization (bitsandbytes), adapter (peft) and
optimizer. An experiment file names a technique and may replace any block, so a new
combination is one YAML file; a new adapter or optimizer is one descriptor in harness.blocks.

Importing this module does not import torch: experiment files validate without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.blocks.training import BLOCKS, blocks_on


@dataclass(frozen=True)
class Technique:
    weights: str          # dtype of the materialised model: fp32 | bf16 | fp16
    autocast: str         # none | bf16 | fp16
    loss_scaling: bool    # dynamic loss scaling (needed with fp16 autocast)
    quantization: str     # a key of harness.blocks.quantizations.QUANTIZATIONS (frozen base, bitsandbytes)
    double_quant: bool    # nf4 only: quantize the quantization constants too
    adapter: str          # a key of harness.blocks.adapters.ADAPTERS (peft)
    optimizer: str        # a key of harness.blocks.optimizers.OPTIMIZERS
    summary: str = ""

    @property
    def compute_dtype(self) -> str:
        """The dtype its matrix products run in: its autocast's, else its weights'."""
        return self.autocast if self.autocast != "none" else self.weights


TECHNIQUES: dict[str, Technique] = {
    "fp32": Technique("fp32", "none", False, "none", False, "none", "adamw",
                      "full fine-tuning, fp32 weights, gradients and AdamW states"),
    "bf16-pure": Technique("bf16", "none", False, "none", False, "none", "adamw",
                           "full fine-tuning with weights, gradients and AdamW states all in bf16"),
    "bf16-mixed": Technique("fp32", "bf16", False, "none", False, "none", "adamw",
                            "fp32 master weights and states, bf16 autocast for compute"),
    "fp16-mixed": Technique("fp32", "fp16", True, "none", False, "none", "adamw",
                            "fp32 master weights, fp16 autocast with dynamic loss scaling"),
    "adamw8bit": Technique("fp32", "bf16", False, "none", False, "none", "adamw8bit",
                           "full fine-tuning (fp32 master, bf16 autocast) with bitsandbytes 8-bit AdamW"),
    "lora": Technique("bf16", "bf16", False, "none", False, "lora", "adamw",
                      "frozen bf16 base, fp32 LoRA adapters, bf16 autocast, AdamW"),
    "int8-lora": Technique("bf16", "bf16", False, "int8", False, "lora", "adamw",
                           "frozen LLM.int8 base (bitsandbytes), LoRA adapters, AdamW"),
    "qlora": Technique("bf16", "bf16", False, "nf4", True, "lora", "paged_adamw8bit",
                       "frozen NF4 base with double quantization, bf16 compute, LoRA, paged 8-bit AdamW"),
}

# -- what blocks combine with, and where they run -------------------------------------------

# What a sharded experiment cannot be combined with (checked when the file is read): field -> why an
# experiment and its technique trip it, or None where they do not.
SHARDING_EXCLUDES: dict[str, Callable] = {
    # each quantization says why it cannot
    "quantization": lambda e, t: QUANTIZATIONS[t.quantization].not_sharded if t.quantization != "none" else None,
    "optimizer": lambda e, t: OPTIMIZERS[t.optimizer].not_sharded,  # each optimizer says why it cannot
    # each training block says why it cannot
    **{name: (lambda e, t, name=name: BLOCKS[name].not_sharded if getattr(e, name) else None)
       for name, block in BLOCKS.items() if block.not_sharded},
    "lora": lambda e, t: (
        "DoRA's magnitudes and the data-driven inits (PiSSA, OLoRA, ...) are computed from the base weights, which "
        "a sharded model materialises only after its adapters exist")
    if t.adapter != "none" and (e.lora.init_lora_weights is not True or e.lora.use_dora) else None,
}


def cuda_only(cfg) -> list[str]:
    """The blocks an experiment turns on that run on a CUDA device only, each with why: elsewhere the run is
    recorded `skipped` with them, and the predictions still cover what they can."""
    return [f"{key}: {block.cuda_only}" for key, block in blocks_on(cfg) if block.cuda_only]


def not_simulated(cfg, technique: Technique) -> list[str]:
    """Why the simulation cannot trace an experiment: its blocks' reasons and its optimizer's (only the
    analytic method predicts it)."""
    optimizer = OPTIMIZERS[technique.optimizer].not_simulated
    return ([f"{key}: {block.not_simulated}" for key, block in blocks_on(cfg) if block.not_simulated]
            + ([f"optimizer {technique.optimizer}: {optimizer}"] if optimizer else []))


class NotSimulated(Exception):
    """An experiment the simulation cannot trace (not_simulated): the simulation says so, the analytic answers."""
