"""The quantizations of a frozen base an experiment may name (`quantization:`), one descriptor each: what
bitsandbytes stores the base's weights as, why a sharded experiment cannot have it, and the loss a run on
that base is held to, in the experiment file that shows it (`shown_by`), against LoRA on the unquantized
base (the adapter is the same). Where it acts is code: harness.step.models and harness.predict.analytic.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.blocks.parts import LossRule


@dataclass(frozen=True)
class Quantization:
    summary: str
    not_sharded: str    # why a sharded experiment cannot have it
    loss: LossRule
    shown_by: str       # the experiment file that runs it (experiments/NAME.yaml)


_BNB_NOT_SHARDED = (
    "bitsandbytes' packed weights keep their quantization state on the parameter object, which FSDP2's "
    "DTensor shards do not carry (FSDP-QLoRA stored NF4 in a 16-bit quant_storage under FSDP1, which torch "
    "has deprecated); LoRA on a sharded 16-bit base is the sharded adapter run")

QUANTIZATIONS: dict[str, Quantization | None] = {
    "none": None,  # the base in the technique's `weights:` dtype
    "int8": Quantization(
        "bitsandbytes' LLM.int8: int8 weights, outlier features in 16 bits", _BNB_NOT_SHARDED,
        LossRule("lora", 0.01, "LLM.int8 keeps outlier features in 16 bits: near-lossless"), "int8-lora"),
    "nf4": Quantization(
        "bitsandbytes' 4-bit NormalFloat weights in blocks of 64 (double_quant: its scales quantized too)",
        _BNB_NOT_SHARDED,
        LossRule("lora", 0.03, "NF4 rounding of the frozen base; the QLoRA paper reports 16-bit parity"), "qlora"),
}
