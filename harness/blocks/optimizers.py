"""The optimizers an experiment may name (`optimizer:`), one descriptor each.

A descriptor says how the optimizer is built from the trainable parameters, the experiment's `optim:`
block and the device type (`model` is there for optimizers that group parameters by name: LoRA+,
GaLore), what its state and its step cost for the analytic formula, its TrainingArguments `optim` or why
Trainer has none, whether it steps FSDP2's sharded parameters, the package it imports, its own `optim:`
settings and the loss it is held to, in the experiment file that shows it (`shown_by`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from harness.blocks.parts import BASELINE, BuiltForTrainer, LossRule, NotMapped, Refusal, Setting, Unmapped


@dataclass(frozen=True)
class Optimizer:
    build: Callable          # (params, settings, device_type, model=None) -> a torch optimizer
    # (sizes, param_bytes, shape, settings, device_type) -> (state bytes, the largest transient of its step):
    # `sizes` are the trainable tensors' element counts, `param_bytes` their dtype's bytes, `shape` the
    # model's (harness.predict.analytic.Shape), `settings` the experiment's `optim:` block, `device_type` the
    # code path predicted (torch's optimizers step tensor by tensor on a CPU, all at once on CUDA).
    state_bytes: Callable
    # TrainingArguments' `optim` (a name, or names by device type), the lab's own optimizer handed to
    # Trainer (BuiltForTrainer), or why Trainer has none (Unmapped).
    trainer: str | dict | BuiltForTrainer | Unmapped
    summary: str
    # Why it cannot step FSDP2's or ZeRO's sharded parameters (DTensors, flat partitions); None: it can.
    not_sharded: str | None
    # The loss it is held to in `shown_by`, against a reference run, or why it has no rule of its own.
    loss: LossRule | str
    shown_by: str | None     # the experiment file that runs it (experiments/NAME.yaml), if one does
    package: str | None = None   # the module it imports that a machine may lack: without it a run is skipped
    settings: tuple[Setting, ...] = ()    # its own fields of the `optim:` block
    refusals: tuple[Refusal, ...] = ()    # experiments it cannot be part of (checked when the file is read)
    # Bytes per element of the state it keeps in CUDA unified memory, outside torch's allocator, for a
    # parameter of PAGED_MIN_ELEMENTS or more (bitsandbytes' paged optimizers); 0: none.
    paged_state_bytes: int = 0
    # Trainer's further arguments for it: (experiment, model config) -> (arguments, notes of where Trainer's
    # step still differs).
    trainer_arguments: Callable | None = None
    # Whether Trainer gives it weight decay in its own parameter groups (no bias or norm decayed), as it does
    # every optimizer it builds with the TrainingArguments' weight_decay.
    trainer_decay_groups: bool = True
    # Why the simulation cannot trace it (fake tensors have no values); None: it can.
    not_simulated: str | None = None
    # Why Trainer's run of it holds other bytes than the lab's, where that is known (the report says it).
    trainer_memory: str | None = None
    # What its quantization computes with real values (code books), called before a simulation's fake mode.
    before_fake: Callable | None = None
    # The CUDA kernel its step runs, which the lab's optimizer benchmarks time (harness.predict.speed costs its
    # step by it); None: no benchmark times it, and the speed model costs it as torch's fused AdamW, saying so.
    step_kernel: str | None = None
    # What makes its first steps slow beyond their FLOPs, for a GPU-time estimate (harness.lab.estimate):
    # (words, (experiment, linears) -> seconds), `linears` the model's (n_in, n_out, count) per linear role.
    first_steps: tuple[str, Callable] | None = None
    # A step torch.compile runs (torchao's): the bytes the compiled code for one parameter of n elements with
    # quantized states allocates besides the tensors it is given, on CUDA (harness.predict.simulate); None:
    # its step is not compiled.
    step_buffers: Callable[[int], int] | None = None

    @property
    def paged(self) -> bool:
        return self.paged_state_bytes > 0

    def paged_bytes(self, sizes) -> int:
        """Bytes of its state in CUDA unified memory for trainable tensors of `sizes` elements."""
        return self.paged_state_bytes * sum(n for n in sizes if n >= PAGED_MIN_ELEMENTS)


# bitsandbytes' paged optimizers take a state buffer from CUDA unified memory (functional.get_paged:
# cudaMallocManaged) only for a parameter of this many elements or more, smaller ones from torch
# (optim/optimizer.py, Optimizer8bit.get_state_buffer, 0.50: `p.numel() < 1e5`).
PAGED_MIN_ELEMENTS = 100_000


# -- AdamW, torch's -----------------------------------------------------------------------------

def _adamw(params, settings, device_type: str, model=None):
    import torch

    # The fused kernel is what a GPU user gets by default; it does not exist on CPU.
    fused = device_type == "cuda"
    return torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                             weight_decay=settings.weight_decay, fused=fused)


def adamw_bytes(sizes, param_bytes, shape=None, settings=None, device_type="cuda") -> tuple[int, int]:
    """AdamW: two states per parameter in the parameter's dtype, plus a step counter per tensor."""
    return sum(2 * param_bytes * n + 4 for n in sizes), 0


# -- bitsandbytes -------------------------------------------------------------------------------

OPTIM8_BLOCK = 256        # bitsandbytes blockwise 8-bit optimizer state: one fp32 scale per 256
OPTIM8_MIN_SIZE = 4096    # bitsandbytes keeps 32-bit state for tensors smaller than this


def _bnb(name: str):
    def build(params, settings, device_type: str, model=None):
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                        weight_decay=settings.weight_decay)
    return build


def _adamw8bit_bytes(sizes, param_bytes, shape=None, settings=None, device_type="cuda") -> tuple[int, int]:
    """bitsandbytes 8-bit AdamW: two uint8 states plus one fp32 scale per block of 256, for tensors of at
    least 4096 elements; smaller tensors keep two fp32 states."""
    return sum(2 * n + 2 * 4 * math.ceil(n / OPTIM8_BLOCK) if n >= OPTIM8_MIN_SIZE else 8 * n for n in sizes), 0


def _fp32_adamw_bytes(sizes, param_bytes, shape=None, settings=None, device_type="cuda") -> tuple[int, int]:
    """bitsandbytes' 32-bit AdamW: two fp32 states per parameter."""
    return sum(8 * n for n in sizes), 0


_BNB_IN_TRAINER = ("with a bitsandbytes 8-bit optimizer Trainer keeps the optimizer state of every nn.Embedding in 32 "
                   "bits (Trainer.create_optimizer: register_module_override(..., optim_bits=32)); the lab's AdamW8bit "
                   "keeps all of it in 8 bits")
_BNB_NOT_SHARDED = ("sharded parameters are DTensors, which AdamW steps shard by shard, while bitsandbytes' "
                    "blockwise quantized states expect whole tensors")

# -- LoRA+ (peft) -------------------------------------------------------------------------------


def _loraplus(params, settings, device_type: str, model=None):
    """LoRA+: AdamW with lora_B learning loraplus_lr_ratio times faster than lora_A (peft's own
    create_loraplus_optimizer; the memory is AdamW's)."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=settings.lr,
                                     loraplus_lr_ratio=settings.loraplus_lr_ratio, betas=tuple(settings.betas),
                                     eps=settings.eps, weight_decay=settings.weight_decay,
                                     fused=device_type == "cuda")


# -- GaLore (galore-torch) ----------------------------------------------------------------------

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


# Sustained FP32 FLOP/s of a GPU's SVD (cuSOLVER), an assumption for an H100/H200-class card: about 1.5% of
# their FP32 peak (67 TFLOP/s on both data sheets), since half of an SVD's bidiagonalisation is
# matrix-vector products bound by memory bandwidth (3.35 to 4.8 TB/s: 4 bytes read per 2 FLOPs give at
# most 1.7 to 2.4 TFLOP/s for that half) and its iterations are partly sequential. An order of magnitude.
SVD_FLOPS = 1e12


def svd_flops(m: int, n: int) -> float:
    """FLOPs of a thin SVD (singular values and both sets of vectors) of an m x n matrix: Golub and Van
    Loan's work count for the R-SVD, 6 m n^2 + 20 n^3 with m >= n (Matrix Computations, their table of
    SVD algorithms' work), of the order m n min(m, n): between 6 and 26 times it."""
    m, n = max(m, n), min(m, n)
    return 6 * m * n ** 2 + 20 * n ** 3


def galore_svd_seconds(experiment, linears) -> float:
    """galore-torch's projector takes a full SVD (torch.linalg.svd, in fp32) of each projected weight's
    gradient at its first step and every `galore_update_proj_gap` steps; the lab projects every decoder
    linear layer. The tracked step steps the optimizer too."""
    optimizer_steps = experiment.warmup_steps + experiment.steps + 1
    rounds = -(-optimizer_steps // experiment.optim.galore_update_proj_gap)
    return rounds * sum(count * svd_flops(n_in, n_out) for n_in, n_out, count in linears) / SVD_FLOPS


def galore_bytes(sizes, param_bytes, shape, settings, device_type="cuda") -> tuple[int, int]:
    """GaLore (galore-torch's GaLoreAdamW, proj_type std) over full fine-tuning, whose trainable
    tensors have `sizes` elements: (optimizer state, the largest transient of its step).

    A decoder linear weight of m x n keeps its moments in the projected space, r x max(m, n) each,
    and the projection, r x min(m, n) (the SVD's singular vectors, cast back to the weight's
    dtype), with r at most min(m, n); every other parameter has AdamW's two moments (its step
    counter is a Python number). Stepping a tensor makes two of its size in its dtype: a projected
    weight's update brought back to m x n and scaled, another's denominator and update.
    """
    state = projected = 0
    for n_in, n_out, count in shape.linears().values():
        r = min(settings.galore_rank, n_in, n_out)
        state += count * param_bytes * r * (2 * max(n_in, n_out) + min(n_in, n_out))
        projected += count * n_in * n_out
    return state + 2 * param_bytes * (sum(sizes) - projected), 2 * param_bytes * max(sizes)


def _galore_arguments(cfg, model_config) -> tuple[dict, list[str]]:
    """GaLore in Trainer: the layers the lab's GaLore projects (optim_target_modules) and its settings
    (optim_args, which Trainer parses for rank, update_proj_gap and scale), and what Trainer's GaLore
    still does otherwise: it builds GaLoreAdamW with the learning rate alone, so betas, eps and weight
    decay are galore-torch's defaults."""
    import inspect

    from galore_torch import GaLoreAdamW

    targets = galore_targets(model_config)
    if isinstance(targets, str):  # peft's "all-linear" would take the LM head too
        raise NotMapped(f"GaLore's layers are named only for the model families harness.architectures describes, "
                        f"not {getattr(model_config, 'model_type', None)!r}")
    arguments = {"optim_target_modules": targets,
                 "optim_args": f"rank={cfg.optim.galore_rank},update_proj_gap={cfg.optim.galore_update_proj_gap},"
                               f"scale={cfg.optim.galore_scale}"}
    defaults = {k: v.default for k, v in inspect.signature(GaLoreAdamW).parameters.items()}
    ours = {"betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}
    differ = [f"{k} {defaults[k]} (the experiment's {v})" for k, v in ours.items() if v != defaults[k]]
    notes = [f"Trainer builds GaLoreAdamW with the learning rate alone: {', '.join(differ)}"] if differ else []
    return arguments, notes


# -- torchao ------------------------------------------------------------------------------------

def _torchao(name: str):
    """torchao's low-bit AdamW: both moments quantized blockwise (8-bit or 4-bit codes, or fp8), one
    fp32 scale per block; tensors under 4,096 elements keep plain states."""
    def build(params, settings, device_type: str, model=None):
        import torchao.optim

        return getattr(torchao.optim, name)(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                            weight_decay=settings.weight_decay)
    return build


def _torchao_bytes(code: float, block: int, book: int, step_buffers: Callable[[int], int]):
    """torchao's low-bit AdamW: per moment, `code` bytes per element, an fp32 scale per block of `block` and
    a code book of `book` fp32 entries, and an fp32 step per tensor; tensors under 4,096 elements or not a
    whole number of blocks keep plain states in the parameter's dtype. The step's transient on CUDA: the
    compiled step's buffers for the largest tensor with quantized states (on a CPU the lab counts the eager
    step, whose transient is not modelled here)."""
    def state_bytes(sizes, param_bytes, shape=None, settings=None, device_type="cuda") -> tuple[int, int]:
        quantized = [n for n in sizes if n >= 4096 and n % block == 0]
        plain = sum(sizes) - sum(quantized)
        state = 4 * len(sizes) + 2 * (sum(int(code * n) + 4 * (n // block) + 4 * book for n in quantized)
                                      + param_bytes * plain)
        return state, step_buffers(max(quantized)) if device_type == "cuda" and quantized else 0
    return state_bytes


def _torchao_code_books():
    """torchao's optimizer code books are computed with real values (`.tolist()`) and cached after one call."""
    from torchao.optim import subclass_4bit, subclass_8bit

    for books in (subclass_8bit, subclass_4bit):
        books.get_qmap_signed(), books.get_qmap_unsigned()


def _torchao_step_buffers(per_element: float, block: int):
    """torchao steps each parameter with torch.compile(single_param_adam, fullgraph=True). Inductor's code
    for it (torch 2.13, TORCH_LOGS=output_code) writes each quantized moment's new values to buffers before
    quantizing them, since a block's scale needs the block's largest value first: `per_element` bytes per
    element and an fp32 scale per block, for each of the two moments."""
    return lambda n: 2 * (int(per_element * n) + 4 * (n // block))


def _torchao_optimizer(name: str, code: float, block: int, book: int, trainer, summary: str, loss,
                       shown_by: str, step_buffers: Callable[[int], int], step_kernel: str | None = None) -> Optimizer:
    """One of torchao's low-bit AdamWs (`name` in torchao.optim), its states as _torchao_bytes counts them."""
    return Optimizer(_torchao(name), _torchao_bytes(code, block, book, step_buffers), trainer, summary,
                     not_sharded="sharded parameters are DTensors, which AdamW steps shard by shard, while torchao's "
                                 "blockwise quantized states expect whole tensors",
                     loss=loss, shown_by=shown_by, package="torchao", before_fake=_torchao_code_books,
                     step_kernel=step_kernel, step_buffers=step_buffers)


# -- SGD with momentum and Adafactor, torch's ------------------------------------------------------

def _sgd(params, settings, device_type: str, model=None):
    import torch

    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _sgd_bytes(sizes, param_bytes, shape=None, settings=None, device_type="cuda") -> tuple[int, int]:
    """torch's SGD: one momentum buffer per parameter in its dtype (none without momentum), no step counter.
    Weight decay adds each parameter to a copy of its gradient: every gradient at once on CUDA (foreach,
    torch's default there), one at a time on a CPU."""
    state = param_bytes * sum(sizes) if settings.momentum else 0
    decayed = (sum(sizes) if device_type == "cuda" else max(sizes)) if settings.weight_decay else 0
    return state, param_bytes * decayed


def _adafactor(params, settings, device_type: str, model=None):
    """torch's Adafactor (the paper's factored second moment, no first moment), at the experiment's learning
    rate and weight decay; its decay rate (beta2_decay -0.8) and epsilons are torch's defaults, and the
    `optim:` block's betas and eps are not used."""
    import torch

    return torch.optim.Adafactor(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _adafactor_bytes(sizes, param_bytes, shape, settings=None, device_type="cuda") -> tuple[int, int]:
    """torch's Adafactor over full fine-tuning: a matrix of m x n keeps a row factor (m) and a column factor (n)
    of its second moment, a vector its whole second moment, each in the parameter's dtype, and every tensor an
    fp32 step. Its step makes a variance estimate of each matrix's size (m x n): on CUDA (foreach, torch's
    default there) every matrix's at once; on a CPU one at a time, with the previous tensor's update still
    held, counted here as twice the largest (an upper bound)."""
    matrices = [n_in * n_out for n_in, n_out, count in shape.linears().values() for _ in range(count)]
    factors = [n_in + n_out for n_in, n_out, count in shape.linears().values() for _ in range(count)]
    for rows, cols, count in ((shape.vocab, shape.hidden, 1 if shape.tied_embeddings else 2),
                              (shape.positions, shape.hidden, 1 if shape.positions else 0),
                              (shape.experts, shape.hidden, shape.layers if shape.experts else 0)):
        matrices += [rows * cols] * count
        factors += [rows + cols] * count
    vectors = shape.small_tensors()
    assert sum(matrices) + sum(vectors) == sum(sizes), "Adafactor's formula covers full fine-tuning's tensors"
    state = sum(4 + param_bytes * n for n in factors + vectors)
    transient = max(sum(matrices), sum(vectors)) if device_type == "cuda" else 2 * max(matrices)
    return state, param_bytes * transient


_ITEM = ("its step reads each parameter's norm as a Python number (.item()), which a fake tensor does not "
         "have")


# -- the registry -------------------------------------------------------------------------------

# The kernels of the steps the lab's optimizer benchmarks time (harness.lab.microbench).
_FUSED_ADAMW = "aten::_fused_adamw_"
_BNB_8BIT_STEP = "bitsandbytes::optimizer_update_8bit_blockwise"
# The kernel an optimizer's step is costed by where no benchmark times its own (`step_kernel` None).
UNTIMED_STEP_KERNEL = _FUSED_ADAMW

OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(
        _adamw, adamw_bytes, {"cuda": "adamw_torch_fused", "cpu": "adamw_torch"}, "torch's AdamW (fused on CUDA)",
        not_sharded=None, loss="the reference every other optimizer is compared with", shown_by=BASELINE,
        step_kernel=_FUSED_ADAMW),
    "loraplus": Optimizer(
        _loraplus, adamw_bytes,
        BuiltForTrainer("TrainingArguments has no LoRA+: peft's create_loraplus_optimizer goes to Trainer's "
                        "`optimizers` argument, as peft documents it"),
        "LoRA+: AdamW with lora_B learning loraplus_lr_ratio times faster than lora_A (peft)",
        not_sharded=None,
        loss=LossRule("lora", 0.01, "the same adapters with lora_B learning faster, which the LoRA+ paper "
                                    "reports to reach a lower loss, not a higher one"),
        shown_by="loraplus",
        settings=(Setting("loraplus_lr_ratio", float, 16.0, lambda v: 0 < v < float("inf"), "must be positive",
                          "lora_B's learning rate over lora_A's; 16 is the paper's advice"),),
        refusals=(Refusal("optimizer", lambda e, t: t.adapter == "none",
                          "LoRA+ sets the learning rates of LoRA's A and B matrices: it needs an adapter (adapter: "
                          "lora)"),
                  Refusal("optimizer_in_backward", lambda e, t: e.optimizer_in_backward,
                          "LoRA+ groups the adapters of the whole model into one optimizer; stepping each parameter "
                          "on its own is not LoRA+")),
        step_kernel=_FUSED_ADAMW),
    "adamw8bit": Optimizer(
        _bnb("AdamW8bit"), _adamw8bit_bytes, "adamw_bnb_8bit", "bitsandbytes' blockwise 8-bit AdamW",
        not_sharded=_BNB_NOT_SHARDED,
        loss=LossRule(BASELINE, 0.01, "block-wise 8-bit Adam states are reported to match 32-bit Adam"),
        shown_by="adamw8bit", package="bitsandbytes", trainer_memory=_BNB_IN_TRAINER, step_kernel=_BNB_8BIT_STEP),
    "paged_adamw8bit": Optimizer(
        _bnb("PagedAdamW8bit"), _adamw8bit_bytes, "paged_adamw_8bit",
        "bitsandbytes' 8-bit AdamW with its state in CUDA unified memory (QLoRA's)", not_sharded=_BNB_NOT_SHARDED,
        loss="its arithmetic is adamw8bit's; qlora, which runs it, is held to its NF4 base's rule",
        shown_by="qlora", package="bitsandbytes", trainer_memory=_BNB_IN_TRAINER, step_kernel=_BNB_8BIT_STEP,
        paged_state_bytes=2),  # its two states, uint8
    "paged_adamw": Optimizer(
        _bnb("PagedAdamW"), _fp32_adamw_bytes, "paged_adamw_32bit",
        "bitsandbytes' 32-bit AdamW with its state in CUDA unified memory", not_sharded=_BNB_NOT_SHARDED,
        loss="no experiment runs it alone", shown_by=None, package="bitsandbytes",
        paged_state_bytes=8),  # two fp32 states
    "galore_adamw": Optimizer(
        _galore, galore_bytes, "galore_adamw",
        "GaLore: AdamW moments of the decoder's linear weights in a low-rank projection of their gradients",
        not_sharded="sharded parameters are DTensors, while GaLore's projections take the SVD of whole gradients",
        loss=LossRule("bf16-pure", 0.03, "full fine-tuning whose AdamW moments live in a rank-128 projection of "
                                         "each gradient, renewed every 200 steps: updates outside it are lost"),
        shown_by="galore", package="galore_torch",
        settings=(Setting("galore_rank", int, 128, lambda v: v >= 1, "must be at least 1",
                          "the projection's rank (galore-torch's README value)"),
                  Setting("galore_update_proj_gap", int, 200, lambda v: v >= 1, "must be at least 1",
                          "how many steps between two SVDs of the gradient"),
                  Setting("galore_scale", float, 0.25, lambda v: 0 < v < float("inf"), "must be positive",
                          "the update's scale")),
        refusals=(Refusal("optimizer", lambda e, t: t.adapter != "none",
                          "GaLore projects the gradients of full weight matrices: it is a full fine-tuning "
                          "optimizer (adapter: none)"),),
        trainer_arguments=_galore_arguments, trainer_decay_groups=False,
        first_steps=("GaLore's SVDs", galore_svd_seconds)),
    "ao_adamw8bit": _torchao_optimizer(
        "AdamW8bit", 1.0, 256, 256,
        # Trainer builds torchao's AdamW8bit with block_size 256, torchao's own default (the lab's).
        "adamw_torch_8bit", "torchao's AdamW with both moments in 8-bit codes, blocks of 256",
        LossRule("bf16-pure", 0.01, "block-wise 8-bit moments, as bitsandbytes' 8-bit AdamW (same bf16 weights)"),
        "ao-adamw8bit", _torchao_step_buffers(4, 256),  # the new moment in fp32
        step_kernel="torchao::single_param_adam[OptimState8bit]"),
    "ao_adamw4bit": _torchao_optimizer(
        "AdamW4bit", 0.5, 128, 16,
        Unmapped("Trainer's adamw_torch_4bit builds torchao's AdamW4bit with block_size 256, where torchao's own "
                 "default (the lab's) is 128, and optim_args passes block_size on as a string, which torchao cannot "
                 "take: its quantized state would not be the experiment's"),
        "torchao's AdamW with both moments in 4-bit codes, blocks of 128",
        LossRule("bf16-pure", 0.02, "4-bit moments in blocks of 128: coarser than 8-bit, and without the "
                                    "rank-1 normalisation of the 4-bit optimizers paper"),
        # the new moment in fp32, its code book index in int64, its packed 4-bit codes
        "ao-adamw4bit", _torchao_step_buffers(4 + 8 + 0.5, 128)),
    "ao_adamw_fp8": _torchao_optimizer(
        "AdamWFp8", 1.0, 256, 0,
        Unmapped("transformers has no `optim` for torchao's AdamWFp8 (OptimizerNames: adamw_torch_4bit and "
                 "adamw_torch_8bit only)"),
        "torchao's AdamW with both moments in fp8 (e4m3), a scale per block of 256",
        LossRule("bf16-pure", 0.01, "fp8 (e4m3) moments with a scale per block of 256"),
        "ao-adamw-fp8", _torchao_step_buffers(0, 256)),  # quantized as it is computed: only the scales
    "sgd_momentum": Optimizer(
        _sgd, _sgd_bytes, "sgd", "torch's SGD with momentum: one buffer per parameter, no second moment",
        not_sharded=None,
        loss="no tolerance yet: without a step size per parameter its loss depends on the learning rate far more "
             "than AdamW's; no run on the lab's base has set one",
        shown_by="sgd-momentum",
        settings=(Setting("momentum", float, 0.9, lambda v: 0 <= v < 1, "must be in [0, 1)",
                          "SGD's momentum (torch's: buffer = momentum x buffer + gradient)"),),
        trainer_arguments=lambda cfg, model_config: ({"optim_args": f"momentum={cfg.optim.momentum}"}, [])),
    "adafactor": Optimizer(
        _adafactor, _adafactor_bytes,
        Unmapped("TrainingArguments' adafactor is transformers' own Adafactor (its update clipping and relative "
                 "step sizes), not torch's torch.optim.Adafactor, which the lab runs"),
        "torch's Adafactor: the second moment of each matrix as a row and a column factor, no first moment",
        not_sharded="not yet checked on sharded parameters: its row and column factors are reductions over a "
                    "whole matrix, of which a rank's shard holds some rows",
        loss="no tolerance yet: no run on the lab's base has set one", shown_by="adafactor",
        refusals=(Refusal("optimizer", lambda e, t: t.adapter != "none",
                          "the lab's formula counts Adafactor's factored state over the model's own matrices: it is "
                          "run as a full fine-tuning optimizer (adapter: none)"),),
        not_simulated=_ITEM),
}


def optimizer_settings() -> list[Setting]:
    """Every optimizer's own `optim:` fields, in the registry's order."""
    return [setting for optimizer in OPTIMIZERS.values() for setting in optimizer.settings]
