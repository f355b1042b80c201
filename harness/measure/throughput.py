"""Step-time statistics, tokens per second and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import statistics

from harness.architectures import ARCHITECTURES

# Dense peak tensor throughput in FLOP/s from the vendors' data sheets, by compute dtype.
# fp32 matmuls run as TF32 only where allowed; we count them at the fp32 (non-tensor) peak.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 83e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 36e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


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
    for key, table in PEAK_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if key in device_name:
            return table.get(compute_dtype)
    return None


def mfu(config, seq_len: int, tokens_per_s: float, full_backward: bool, device_name: str,
        compute_dtype: str) -> dict | None:
    peak = peak_flops(device_name, compute_dtype)
    if peak is None:
        return None
    per_token = model_flops_per_token(config, seq_len, full_backward)
    return {"mfu": per_token * tokens_per_s / peak, "flops_per_token": per_token, "peak_flops": peak,
            "compute_dtype": compute_dtype}
