"""The quantizations of a frozen base an experiment may name (`quantization:`), one descriptor each: how
bitsandbytes is asked for it, what it stores per weight (the formula's weights and quantization constants),
what its linear layer keeps for backward, what its dequantization costs the speed model and a GPU-time
estimate, the CUDA kernels it loads outside the allocator, why a sharded experiment cannot have it, the
loss a run on that base is held to in the experiment file that shows it (`shown_by`), against LoRA on the
unquantized base (the adapter is the same), and why its memory prediction may miss, where that is known.

Torch-free: bitsandbytes and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from harness.blocks.parts import LossRule

NF4_BLOCK = 64            # bitsandbytes' 4-bit block size (QLoRA paper §3; bitsandbytes.functional.quantize_4bit)
NESTED_BLOCK = 256        # double quantization: 8-bit absmax constants in blocks of 256
NF4_CODE_BYTES = 16 * 4   # the 16-entry NF4 code book, fp32, per weight tensor
NESTED_CODE_BYTES = 256 * 4 + 4  # 8-bit dynamic code book and offset, per weight tensor
INT8_THRESHOLD = 6.0      # LLM.int8's outlier threshold (the paper's, and transformers' default)


@dataclass(frozen=True)
class Quantization:
    summary: str
    bits: int                # bits stored per quantized weight
    # (linears, double_quant) -> (bytes of the quantized weights, bytes of their constants); `linears` are a
    # model's (n_in, n_out, count) per linear layer role (harness.predict.analytic.Shape.linears).
    storage: Callable
    # (technique, compute dtype) -> transformers' BitsAndBytesConfig for it.
    bnb_config: Callable
    layer: str      # the bitsandbytes.nn linear layer transformers puts in the model for it
    # (layer, weight, device, fake) -> None: quantize a freshly initialised 16-bit weight into the layer. A
    # simulation's weight is fake (fake=True): bitsandbytes' parameter classes cannot wrap fake tensors, so its
    # quantize function runs directly and the result is kept where the layer's forward reads it.
    quantize: Callable
    # Its matmul keeps its input for backward (LLM.int8's MatMul8bitLt); else only the packed weight (MatMul4Bit).
    saves_input: bool
    # Its layer casts its own bias to the compute dtype in its first forward, for good (Linear4bit).
    casts_bias: bool
    takes_double_quant: bool  # `double_quant:` quantizes its constants too
    # The kernel that dequantizes its weight for a 16-bit product, costed at the bandwidth of its benchmark
    # (harness.predict.speed); None: no separate dequantization (LLM.int8 multiplies in int8).
    dequantize_kernel: str | None
    # CUDA kernels it loads beyond the half-precision ones, outside torch's allocator (harness.device_memory).
    kernel_bytes: int
    # Assumptions of a GPU-time estimate (harness.lab.estimate), on the safe side: seconds to build (and
    # quantize) a billion parameters, and the share of the sustained matmul throughput left to its products.
    build_seconds_per_billion: float
    speed_share: float
    not_sharded: str    # why a sharded experiment cannot have it
    loss: LossRule
    shown_by: str       # the experiment file that runs it (experiments/NAME.yaml)
    # Why its memory predictions can miss a GPU run's, where that is known (the report says it); None: they should not.
    prediction_miss: str | None = None
    # What it computes with real values (a code book), called before a simulation's fake mode: (technique) -> None.
    before_fake: Callable | None = None
    package: str = "bitsandbytes"  # the module it imports that a machine may lack: without it a run is skipped


# -- LLM.int8 ---------------------------------------------------------------------------------------

def _int8_storage(linears, double_quant: bool = False) -> tuple[int, int]:
    """One int8 per weight, one fp32 scale per output row (SCB)."""
    weights = sum(n_in * n_out * count for n_in, n_out, count in linears)
    rows = sum(n_out * count for _, n_out, count in linears)
    return weights, 4 * rows


def _int8_config(technique, compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)


def _int8_quantize(layer, weight, device, fake: bool) -> None:
    import bitsandbytes as bnb
    from torch import nn

    if fake:
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
        layer.weight = nn.Parameter(codes, requires_grad=False)
        layer.weight.CB, layer.weight.SCB = codes, scales
    else:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)


# -- NF4 ----------------------------------------------------------------------------------------------

def _nf4_storage(linears, double_quant: bool) -> tuple[int, int]:
    """Two weights a byte; an fp32 absmax per block of 64 (or, double-quantized, an 8-bit one and an fp32
    scale per 256 of them) and the code books, per weight tensor."""
    packed = sum(n_in * n_out * count for n_in, n_out, count in linears) // 2
    constants = 0
    for n_in, n_out, count in linears:
        blocks = math.ceil(n_in * n_out / NF4_BLOCK)
        if double_quant:
            per_tensor = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES
        else:
            per_tensor = 4 * blocks + NF4_CODE_BYTES
        constants += per_tensor * count
    return packed, constants


def _nf4_config(technique, compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=technique.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def _nf4_quantize(layer, weight, device, fake: bool) -> None:
    import bitsandbytes as bnb
    import torch
    from torch import nn

    if fake:
        packed, state = bnb.functional.quantize_4bit(
            weight, compress_statistics=layer.weight.compress_statistics, quant_type=layer.weight.quant_type,
            quant_storage=torch.uint8)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.weight.quant_state = state
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=layer.weight.quant_type,
                                         compress_statistics=layer.weight.compress_statistics,
                                         quant_storage=torch.uint8, module=layer)._quantize(device)


def _nf4_code_book(technique) -> None:
    """bitsandbytes caches the 4-bit code book after one real quantization (it reads values with .tolist())."""
    import bitsandbytes as bnb
    import torch

    bnb.functional.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), quant_type="nf4",
                                 compress_statistics=technique.double_quant)


_BNB_NOT_SHARDED = (
    "bitsandbytes' packed weights keep their quantization state on the parameter object, which FSDP2's "
    "DTensor shards do not carry (FSDP-QLoRA stored NF4 in a 16-bit quant_storage under FSDP1, which torch "
    "has deprecated); LoRA on a sharded 16-bit base is the sharded adapter run")

QUANTIZATIONS: dict[str, Quantization | None] = {
    "none": None,  # the base in the technique's `weights:` dtype
    "int8": Quantization(
        "bitsandbytes' LLM.int8: int8 weights, outlier features in 16 bits", 8, _int8_storage, _int8_config,
        layer="Linear8bitLt", quantize=_int8_quantize,
        saves_input=True, casts_bias=False, takes_double_quant=False, dequantize_kernel=None,
        # int8-lora__tinyllama-1.1b__36356b7b325b.json's kernels outside the allocator (867,762,176 B) less the
        # half-precision figure of harness.device_memory.KERNEL_MODULE_BYTES: CALIBRATED on that record.
        kernel_bytes=67_108_864,
        build_seconds_per_billion=1.5, speed_share=0.25, not_sharded=_BNB_NOT_SHARDED,
        loss=LossRule("lora", 0.01, "LLM.int8 keeps outlier features in 16 bits: near-lossless"), shown_by="int8-lora",
        prediction_miss=(
            "LLM.int8 on CUDA also keeps, for backward, the input columns that hold an outlier (|x| >= 6, "
            "its threshold), which depend on the values: the predictions take the count random weights give "
            "(harness/predict/outliers.py: most of the MLP's product at 7B), the rows taken as independent, "
            "which gives the most. Trained weights put outliers in a few feature dimensions; the fit answers, "
            "made for them, count none.")),
    "nf4": Quantization(
        "bitsandbytes' 4-bit NormalFloat weights in blocks of 64 (double_quant: its scales quantized too)", 4,
        _nf4_storage, _nf4_config, layer="Linear4bit", quantize=_nf4_quantize, saves_input=False, casts_bias=True,
        takes_double_quant=True,
        dequantize_kernel="bitsandbytes::dequantize_4bit", kernel_bytes=0,
        build_seconds_per_billion=1.5, speed_share=0.5, not_sharded=_BNB_NOT_SHARDED,
        loss=LossRule("lora", 0.03, "NF4 rounding of the frozen base; the QLoRA paper reports 16-bit parity"),
        shown_by="qlora", before_fake=_nf4_code_book),
}
