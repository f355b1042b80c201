"""The adapters an experiment may name (`adapter:`), one descriptor each.

An adapter is a peft method: how it wraps a model, and what it adds to each linear layer it
adapts (the trainable tensors' element counts, which the analytic predictor needs), and the loss
it is held to in the experiment file that shows it. Its settings are the experiment's `lora:` block,
whose fields are peft's own (harness.config): DoRA, rsLoRA and PiSSA are LoRA with a peft flag, so
they are experiment files only; a variant held to a rule of its own is listed with it (`variants`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from harness.blocks.parts import BASELINE, LossRule


@dataclass(frozen=True)
class Variant:
    """An adapter with some of its `lora:` fields set, run by the experiment file `shown_by`, and the loss
    it is held to there (an experiment without a rule of its own is held to its technique's)."""
    shown_by: str
    lora: dict          # the `lora:` fields the experiment file sets
    loss: LossRule


@dataclass(frozen=True)
class Adapter:
    wrap: Callable                 # (model, settings) -> the peft model
    trainable_tensors: Callable    # (n_in, n_out, settings) -> element counts per adapted linear
    summary: str
    # The loss it is held to in `shown_by`, against a reference run, or why it has no rule of its own.
    loss: LossRule | str
    shown_by: str | None           # the experiment file that runs it (experiments/NAME.yaml)
    variants: tuple[Variant, ...] = ()


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
    "lora": Adapter(
        _lora_wrap, _lora_tensors,
        "peft LoRA and its variants (use_dora, use_rslora, init_lora_weights: pissa, olora, ...)",
        LossRule(BASELINE, 0.05, "a rank-r update can only approximate full fine-tuning"), "lora",
        variants=(
            Variant("dora", {"use_dora": True},
                    LossRule("lora", 0.01, "LoRA's update split into a direction and a learned magnitude, which the "
                                           "DoRA paper reports to match or beat LoRA at the same rank")),
            Variant("pissa", {"init_lora_weights": "pissa_niter_4"},
                    LossRule("lora", 0.01, "LoRA started from the weights' principal singular vectors, which the "
                                           "PiSSA paper reports to converge faster than LoRA")))),
}
