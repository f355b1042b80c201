"""What the lab knows of each model architecture's layers, from its config alone (no torch).

The names and widths of a decoder layer's linear layers decide what LoRA adapts by default
(every one of them), what the analytic predictor counts, what validation accepts as a target
and what the quantization probe reads. The rest of a family's description is what its
activations depend on: fused projections, extra norms, per-head norms of q and k, LayerNorm
or RMSNorm, a gated MLP or not, biases, positions, and the attention transformers runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class UnsupportedArchitecture(ValueError):
    """A model family the analytic predictor has no description of."""


# transformers' names of a decoder layer's linear layers, by role, where a family names them as
# Llama does (fused roles: Phi-3's).
LLAMA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "qkv": "qkv_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "gate_up": "gate_up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Architecture:
    """A decoder layer as far as memory is concerned (transformers' modeling file of the family)."""
    fused_qkv: bool = False        # one projection to q, k and v (Phi-3: qkv_proj; GPT-2: c_attn)
    fused_gate_up: bool = False    # one projection to the MLP's gate and up halves (Phi-3: gate_up_proj)
    qkv_bias: bool = False         # Qwen2: biases on q, k and v
    qk_norm: bool = False          # Qwen3, Gemma 3: an RMSNorm over each head of q and k
    sandwich_norms: bool = False   # Gemma 2/3: norms after attention and after the MLP as well (4 a layer)
    fp32_norm_scale: bool = False  # Gemma: norms scale by (1 + weight) in fp32, so a trained weight keeps
                                   # the fp32 normalised tensor
    gated_mlp: bool = True         # down(act(gate(x)) * up(x)); False: down(act(up(x))), no gate (GPT-2,
                                   # GPT-NeoX; width n_inner or intermediate_size, GPT-2's default 4h)
    layer_norm: bool = False       # LayerNorm, not RMSNorm: a weight and a bias, and it saves its input with
                                   # a mean and a reciprocal deviation per token, no normalised copy (GPT-2, NeoX)
    linear_bias: bool = False      # a bias on every linear layer of a decoder layer (GPT-2's Conv1D; NeoX's MLP,
                                   # and its attention unless the config's attention_bias is false)
    learned_positions: bool = False  # GPT-2: a learned absolute position embedding (wpe, n_positions x h) and no
                                   # rotary one, so q, k and v reach attention as views of c_attn's output
    head_major_qk: bool = False    # GPT-NeoX: rotary over the first rotary_pct of each head, q and k rebuilt by
                                   # a cat in head-major layout; attention's output follows, so the transpose
                                   # back to tokens before `dense` is a copy of its own
    whole_qkv_saved: bool = False  # v reaches attention as a view of the fused qkv output, which attention
                                   # then keeps whole (NeoX, Phi-3: traced)
    parallel_residual: bool = False  # GPT-NeoX's use_parallel_residual (its config's, default true): attention
                                   # and MLP read the same layer input, which their two norms save once
    eager_attention: bool = False  # transformers gives the family no SDPA (Gemma 2: SDPA cannot soft-cap), so
                                   # the lab runs its eager attention, which saves s x s scores per head
    logit_softcapping: bool = False  # Gemma 2: cap * tanh(x / cap) over attention scores and over the final
                                   # logits (config attn_logit_softcapping, final_logit_softcapping; None: off),
                                   # each tanh saving its s x s or vocabulary-wide output
    names: tuple[tuple[str, str], ...] = ()  # (role, transformers' name) where not LLAMA_NAMES'; GPT-2 names two
                                   # roles c_proj (attention's output and the MLP's down projection)

    def roles(self) -> tuple[str, ...]:
        """The linear layers of a decoder layer by role, in the order they run."""
        attention = ("qkv",) if self.fused_qkv else ("q", "k", "v")
        mlp = (("gate_up",) if self.fused_gate_up else ("gate", "up")) if self.gated_mlp else ("up",)
        return (*attention, "o", *mlp, "down")

    def name(self, role: str) -> str:
        return dict(self.names).get(role, LLAMA_NAMES[role])

    def linear_names(self) -> tuple[str, ...]:
        """Each name once: peft matches a target by the module name's last part, so GPT-2's c_proj
        adapts attention's output and the MLP's down projection alike."""
        return tuple(dict.fromkeys(self.name(role) for role in self.roles()))


LLAMA = Architecture()
# model_type in a transformers config -> its description. Mixtral's experts are the same SwiGLU
# MLP per expert (harness.step.models.SequentialExperts names them so). Gemma 2 is Gemma 3 without
# q/k norms, with soft-capped eager attention (s x s scores per layer) and soft-capped logits.
GPT_STYLE = replace(LLAMA, fused_qkv=True, gated_mlp=False, layer_norm=True, linear_bias=True)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": LLAMA,
    "qwen2": replace(LLAMA, qkv_bias=True),
    "qwen3": replace(LLAMA, qk_norm=True),
    "gemma": replace(LLAMA, fp32_norm_scale=True),
    "gemma2": replace(LLAMA, sandwich_norms=True, fp32_norm_scale=True, eager_attention=True,
                      logit_softcapping=True),
    "gemma3_text": replace(LLAMA, sandwich_norms=True, qk_norm=True, fp32_norm_scale=True),
    "phi3": replace(LLAMA, fused_qkv=True, fused_gate_up=True, whole_qkv_saved=True),
    "gpt2": replace(GPT_STYLE, learned_positions=True,
                    names=(("qkv", "c_attn"), ("o", "c_proj"), ("up", "c_fc"), ("down", "c_proj"))),
    "gpt_neox": replace(GPT_STYLE, head_major_qk=True, whole_qkv_saved=True, parallel_residual=True,
                        names=(("qkv", "query_key_value"), ("o", "dense"), ("up", "dense_h_to_4h"),
                               ("down", "dense_4h_to_h"))),
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


def attention_implementation(config, requested: str) -> str:
    """The attention a model runs: the experiment's (sdpa by default), except in a family that
    transformers gives only eager attention (Gemma 2: SDPA cannot soft-cap its scores, and
    transformers refuses it), which runs eager whatever the experiment says."""
    family = ARCHITECTURES.get(getattr(config, "model_type", None))
    return "eager" if family is not None and family.eager_attention else requested


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
    # Counted by role: GPT-2's c_proj is two of its four linear layers.
    roles = family.roles()
    adapted = sum(family.name(role) in target_modules for role in roles)
    return list(target_modules), (
        f"LoRA adapts {adapted} of the {len(roles)} linear layers of each "
        f"{config.model_type} layer; left out: {', '.join(left_out)}")
