"""The precisions a technique trains in, one descriptor each: the dtype the model is materialised in
(`weights:`), the autocast its matrix products run under (`autocast:`) and whether the loss is scaled
(`loss_scaling:`), with the loss a run in that precision is held to, in the experiment file that shows it
(`shown_by`). A technique (harness.techniques) names these three fields among its others; a precision is
the combination of them that the lab compares against fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.blocks.parts import BASELINE, LossRule


@dataclass(frozen=True)
class Precision:
    weights: str        # fp32 | bf16 | fp16
    autocast: str       # none | bf16 | fp16
    loss_scaling: bool
    summary: str
    # The loss it is held to in `shown_by`, against a reference run, or why it has no rule of its own.
    loss: LossRule | str
    shown_by: str       # the experiment file that runs it (experiments/NAME.yaml)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(
        "fp32", "none", False, "fp32 weights, gradients and optimizer state; no autocast",
        "the reference every other precision and every full fine-tuning optimizer is compared with", BASELINE),
    "bf16-mixed": Precision(
        "fp32", "bf16", False, "fp32 master weights, bf16 autocast for the matrix products",
        LossRule(BASELINE, 0.01, "fp32 master weights and optimizer: only the matmuls round to bf16"), "bf16-mixed"),
    "fp16-mixed": Precision(
        "fp32", "fp16", True, "fp32 master weights, fp16 autocast with dynamic loss scaling",
        LossRule(BASELINE, 0.01, "fp32 master weights; loss scaling keeps small fp16 gradients"), "fp16-mixed"),
    "bf16-pure": Precision(
        "bf16", "none", False, "weights, gradients and optimizer state all in bf16",
        LossRule(BASELINE, 0.03, "bf16 weights round away updates below 2^-8 of a weight, so some learning is lost"),
        "bf16-pure"),
}
