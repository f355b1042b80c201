"""The registry of techniques and of the building blocks they are made of.

A technique is a named choice of building blocks: the dtype the model is materialised
in, autocast, loss scaling, base quantization (bitsandbytes), adapter (peft) and
optimizer. An experiment file names a technique and may replace any block, so a new
combination is one YAML file; a new block is one function registered in a dict here.

Importing this module does not import torch: experiment files validate without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Technique:
    weights: str          # dtype of the materialised model: fp32 | bf16 | fp16
    autocast: str         # none | bf16 | fp16
    loss_scaling: bool    # dynamic loss scaling (needed with fp16 autocast)
    quantization: str     # none | int8 | nf4 (frozen base, bitsandbytes)
    double_quant: bool    # nf4 only: quantize the quantization constants too
    adapter: str          # a key of ADAPTERS (peft)
    optimizer: str        # a key of OPTIMIZERS
    summary: str = ""


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

QUANTIZATIONS = ("none", "int8", "nf4")


# -- adapters (peft) --------------------------------------------------------------------
# An adapter is a peft method: how it wraps a model, and what it adds to each linear layer it
# adapts (the trainable tensors' element counts, which the analytic predictor needs). Its
# settings are the experiment's `lora:` block, whose fields are peft's own (harness.config):
# DoRA, rsLoRA and PiSSA are LoRA with a peft flag, so they are experiment files only.

@dataclass(frozen=True)
class Adapter:
    wrap: Callable                 # (model, settings) -> the peft model
    trainable_tensors: Callable    # (n_in, n_out, settings) -> element counts per adapted linear
    summary: str = ""


def _lora_wrap(model, settings):
    import warnings

    from peft import LoraConfig, get_peft_model

    from harness.architectures import lora_targets

    targets, warning = lora_targets(model.config, settings.target_modules)
    if warning:
        warnings.warn(warning, stacklevel=2)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, use_dora=settings.use_dora,
                        use_rslora=settings.use_rslora, init_lora_weights=settings.init_lora_weights,
                        task_type="CAUSAL_LM", **settings.peft)
    return get_peft_model(model, config)


def _lora_tensors(n_in: int, n_out: int, settings) -> list[int]:
    # lora_A (r x in) and lora_B (out x r); DoRA adds a magnitude per output feature.
    return [settings.r * n_in, settings.r * n_out] + ([n_out] if settings.use_dora else [])


ADAPTERS: dict[str, Adapter | None] = {
    "none": None,  # full fine-tuning
    "lora": Adapter(_lora_wrap, _lora_tensors, "peft LoRA and its variants (use_dora, use_rslora, "
                    "init_lora_weights: pissa, olora, ...)"),
}


# An optimizer is built from the trainable parameters, the experiment's `optim:` block and the
# device type; `model` is there for the optimizers that group parameters by name (LoRA+).

def _adamw(params, settings, device_type: str, model=None):
    import torch

    # The fused kernel is what a GPU user gets by default; it does not exist on CPU.
    fused = device_type == "cuda"
    return torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                             weight_decay=settings.weight_decay, fused=fused)


def _bnb(name: str):
    def build(params, settings, device_type: str, model=None):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                        weight_decay=settings.weight_decay)
    return build


def _loraplus(params, settings, device_type: str, model=None):
    """LoRA+: AdamW with lora_B learning loraplus_lr_ratio times faster than lora_A (peft's own
    create_loraplus_optimizer; the memory is AdamW's)."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=settings.lr,
                                     loraplus_lr_ratio=settings.loraplus_lr_ratio, betas=tuple(settings.betas),
                                     eps=settings.eps, weight_decay=settings.weight_decay,
                                     fused=device_type == "cuda")


def _galore(params, settings, device_type: str, model=None):
    """GaLore (galore-torch, the library transformers' `optim="galore_adamw"` uses): the gradients of
    the decoder's linear weights are projected to `galore_rank` dimensions, where the optimizer keeps
    its moments; every other parameter gets plain AdamW in the same optimizer (galore-torch's README
    recipe, with its rank, projection gap and scale as defaults). Its 8-bit variant synchronises
    CUDA in every step, so it cannot run on a CPU: it is left out."""
    from galore_torch import GaLoreAdamW

    projected = {id(p) for p in _decoder_linear_weights(model)}
    groups = [{"params": [p for p in params if id(p) not in projected]},
              {"params": [p for p in params if id(p) in projected], "rank": settings.galore_rank,
               "update_proj_gap": settings.galore_update_proj_gap, "scale": settings.galore_scale,
               "proj_type": "std"}]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=settings.lr, betas=tuple(settings.betas),
                       eps=settings.eps, weight_decay=settings.weight_decay)


def galore_targets(model_config) -> list[str] | str:
    """The decoder layers' linear layers by name (attention and MLP, as LoRA's default targets name
    them for the model's family): what GaLore projects, in the lab's loop and as Trainer's
    optim_target_modules."""
    from harness.architectures import DEFAULT_TARGETS, lora_targets

    return lora_targets(model_config, list(DEFAULT_TARGETS))[0]


def _decoder_linear_weights(model) -> list:
    """The weights of the linear layers GaLore projects (galore_targets)."""
    import torch

    names = set(galore_targets(model.config))
    return [module.weight for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names]


def _torchao(name: str):
    """torchao's low-bit AdamW: both moments quantized blockwise (8-bit or 4-bit codes, or fp8), one
    fp32 scale per block; tensors under 4,096 elements keep plain states."""
    def build(params, settings, device_type: str, model=None):
        import torchao.optim

        return getattr(torchao.optim, name)(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                            weight_decay=settings.weight_decay)
    return build


OPTIMIZERS: dict[str, Callable] = {
    "adamw": _adamw,
    "loraplus": _loraplus,
    "adamw8bit": _bnb("AdamW8bit"),
    "paged_adamw8bit": _bnb("PagedAdamW8bit"),
    "paged_adamw": _bnb("PagedAdamW"),
    "galore_adamw": _galore,
    "ao_adamw8bit": _torchao("AdamW8bit"),
    "ao_adamw4bit": _torchao("AdamW4bit"),
    "ao_adamw_fp8": _torchao("AdamWFp8"),
}

# -- sharding (harness.step.sharding) ----------------------------------------------------
_DEEPSPEED = ("fake tensors cannot trace DeepSpeed's ZeRO engine (its partitioned parameters and its gradient "
              "hooks hold real storage); its memory per rank is predicted by the analytic method, with DeepSpeed's "
              "own estimators beside it")

# What a sharded experiment cannot be combined with, and why (checked when the file is read):
# field -> (whether an experiment and its technique trip it, the reason).
SHARDING_EXCLUDES: dict[str, tuple[Callable, str]] = {
    "quantization": (lambda e, t: t.quantization != "none",
                     "bitsandbytes' packed weights keep their quantization state on the parameter object, which "
                     "FSDP2's DTensor shards do not carry (FSDP-QLoRA stored NF4 in a 16-bit quant_storage under "
                     "FSDP1, which torch has deprecated); LoRA on a sharded 16-bit base is the sharded adapter run"),
    "optimizer": (lambda e, t: t.optimizer not in ("adamw", "loraplus"),
                  "sharded parameters are DTensors; AdamW steps them shard by shard, while bitsandbytes' and "
                  "torchao's quantized states and GaLore's projections expect whole tensors"),
    "optimizer_in_backward": (lambda e, t: e.optimizer_in_backward,
                              "a sharded gradient is complete only after its reduce-scatter, which FSDP2 runs "
                              "outside the parameter's gradient hooks"),
    "lora": (lambda e, t: t.adapter != "none" and (e.lora.init_lora_weights is not True or e.lora.use_dora),
             "DoRA's magnitudes and the data-driven inits (PiSSA, OLoRA, ...) are computed from the base weights, "
             "which a sharded model materialises only after its adapters exist"),
}


# Building blocks (experiment fields) the simulation cannot trace, with the reason: only the analytic
# method predicts them.
NOT_SIMULATED: dict[str, str] = {
    "liger_kernels": "Liger's Triton kernels do not run on fake tensors",
    "sharding=zero2": _DEEPSPEED,
    "sharding=zero3": _DEEPSPEED,
}


def blocks_in(cfg, table: dict[str, str]) -> list[str]:
    """The building blocks of `table` (CUDA_ONLY, NOT_SIMULATED) an experiment turns on, each with its reason.

    A key is a field (on when true) or `field=value` (on when the field has that value)."""
    def on(key: str) -> bool:
        name, _, value = key.partition("=")
        return getattr(cfg, name) == value if value else bool(getattr(cfg, name))
    return [f"{key}: {why}" for key, why in table.items() if on(key)]


class NotSimulated(Exception):
    """An experiment with a building block of NOT_SIMULATED: the simulation says so, the analytic answers."""


# Building blocks (experiment fields) that run on a CUDA device only, with the reason: elsewhere the
# run is recorded `skipped` with it, and the predictions still cover what they can.
CUDA_ONLY: dict[str, str] = {
    "activation_offloading": "offloading moves saved activations from GPU memory to host memory; on a CPU they "
                             "are in host memory already (TRL's OffloadActivations needs an accelerator)",
    "liger_kernels": "Liger's kernels are Triton kernels, which run on GPUs",
    "compile": "inductor's CPU kernels say nothing of a GPU's memory or speed, and compiling the step alone takes "
               "over a minute on 2 CPU cores",
}

# Paged optimizers keep their state in CUDA unified memory, outside torch's allocator.
PAGED_OPTIMIZERS = {"paged_adamw8bit", "paged_adamw"}
