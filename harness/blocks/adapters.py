"""The adapters an experiment may name (`adapter:`), one descriptor each.

An adapter is a peft method: how it wraps a model, and what it adds to each linear layer it
adapts (the trainable tensors' element counts, which the analytic predictor needs). Its
settings are the experiment's `lora:` block, whose fields are peft's own (harness.config):
DoRA, rsLoRA and PiSSA are LoRA with a peft flag, so they are experiment files only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
