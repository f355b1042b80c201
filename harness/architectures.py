"""What the lab knows of each model architecture's layers, from its config alone (no torch).

The names and widths of a decoder layer's linear layers decide what LoRA adapts by default
(every one of them), what the analytic predictor counts, what validation accepts as a target
and what the quantization probe reads. The rest of a family's description is what its
activations depend on: fused projections, extra norms, per-head norms of q and k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class UnsupportedArchitecture(ValueError):
    """A model family the analytic predictor has no description of."""


@dataclass(frozen=True)
class Architecture:
    """A decoder layer as far as memory is concerned (transformers' modeling file of the family)."""
    fused_qkv: bool = False        # one projection to q, k and v (Phi-3: qkv_proj)
    fused_gate_up: bool = False    # one projection to the MLP's gate and up halves (Phi-3: gate_up_proj)
    qkv_bias: bool = False         # Qwen2: biases on q, k and v
    qk_norm: bool = False          # Qwen3, Gemma 3: an RMSNorm over each head of q and k
    sandwich_norms: bool = False   # Gemma 3: norms after attention and after the MLP as well (4 a layer)
    fp32_norm_scale: bool = False  # Gemma: norms scale by (1 + weight) in fp32, so a trained weight keeps
                                   # the fp32 normalised tensor

    def linear_names(self) -> tuple[str, ...]:
        attention = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if self.fused_gate_up else ("gate_proj", "up_proj")
        return (*attention, "o_proj", *mlp, "down_proj")


LLAMA = Architecture()
# model_type in a transformers config -> its description. Mixtral's experts are the same SwiGLU
# MLP per expert (harness.step.models.SequentialExperts names them so). Gemma 2 is left out: its
# soft-capped eager attention keeps s x s scores per layer that this walk does not count yet.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": LLAMA,
    "qwen2": replace(LLAMA, qkv_bias=True),
    "qwen3": replace(LLAMA, qk_norm=True),
    "gemma": replace(LLAMA, fp32_norm_scale=True),
    "gemma3_text": replace(LLAMA, sandwich_norms=True, qk_norm=True, fp32_norm_scale=True),
    "phi3": replace(LLAMA, fused_qkv=True, fused_gate_up=True),
}
# Every linear layer name of every family: what a target may name before a model's config is read.
LINEAR_NAMES = tuple(dict.fromkeys(name for a in ARCHITECTURES.values() for name in a.linear_names()))


def architecture_of(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model type {model_type!r} is not one the analytic predictor describes (it knows "
            f"{', '.join(sorted(ARCHITECTURES))}); the simulated method traces any transformers model")
    return ARCHITECTURES[model_type]


# The config's default LoRA targets (Llama's names, as the lab has always written them) mean
# every linear layer of the model's own family; so does peft's "all-linear".
DEFAULT_TARGETS = LLAMA.linear_names()


def lora_targets(config, target_modules) -> tuple[list[str] | str, str | None]:
    """What LoRA adapts in this model (names, or peft's "all-linear" for a family not described
    here) and a warning where the targets cover fewer of a layer's linear layers than it has."""
    family = ARCHITECTURES.get(getattr(config, "model_type", None))
    every = target_modules == "all-linear" or list(target_modules) == list(DEFAULT_TARGETS)
    if family is None:
        return ("all-linear" if every else list(target_modules)), None
    names = family.linear_names()
    if every:
        return list(names), None
    left_out = [name for name in names if name not in target_modules]
    if not left_out:
        return list(target_modules), None
    return list(target_modules), (
        f"LoRA adapts {len(names) - len(left_out)} of the {len(names)} linear layers of each "
        f"{config.model_type} layer; left out: {', '.join(left_out)}")
