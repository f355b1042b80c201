"""Step-time statistics, tokens per second and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import statistics

from harness.architectures import ARCHITECTURES
from harness.cards import CARDS, card_in_device_name

# A card's dense peak FLOP/s by compute dtype comes from the lab's one card catalogue (harness.cards).


def step_time_stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "all": times,
    }


def model_flops_per_token(config, seq_len: int, full_backward: bool) -> float:
    """Matmul FLOPs per trained token (PaLM appendix B accounting; recomputation not counted).

    Forward: 2 FLOPs per multiply-accumulate of every weight a token passes through (for MoE,
    only the experts it is routed to) plus attention scores and values, 2 * 2 * layers *
    seq_len * hidden (no causal halving, as PaLM counts). Backward costs twice the forward
    when weight gradients are computed (full fine-tuning) and about once the forward when
    the base is frozen (adapters: input gradients only; the adapters themselves are small).
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention_weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    active_experts = getattr(config, "num_experts_per_tok", 1) if getattr(config, "num_local_experts", 0) else 1
    # A gated MLP has three matrices, GPT-2's and NeoX's two (harness.architectures); GPT-2 names
    # its width n_inner (None: 4h).
    family = ARCHITECTURES.get(getattr(config, "model_type", None))
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    mlp_weights = (3 if family is None or family.gated_mlp else 2) * hidden * intermediate * active_experts
    per_token_weights = layers * (attention_weights + mlp_weights) + hidden * config.vocab_size
    forward = 2 * per_token_weights + 4 * layers * seq_len * heads * head_dim
    return forward * (3 if full_backward else 2)


def peak_flops(device_name: str, compute_dtype: str) -> float | None:
    """fp32 matmuls run as TF32 only where allowed; they are counted at the fp32 (non-tensor) peak."""
    name = card_in_device_name(device_name)
    return CARDS[name].peak(compute_dtype) if name else None


def mfu(config, seq_len: int, tokens_per_s: float, full_backward: bool, device_name: str,
        compute_dtype: str) -> dict | None:
    peak = peak_flops(device_name, compute_dtype)
    if peak is None:
        return None
    per_token = model_flops_per_token(config, seq_len, full_backward)
    return {"mfu": per_token * tokens_per_s / peak, "flops_per_token": per_token, "peak_flops": peak,
            "compute_dtype": compute_dtype}
