"""What the lab knows of each model architecture's layers, from its config alone (no torch).

The names of the decoder's linear layers decide what LoRA adapts by default, what the
analytic predictor counts, what validation accepts as a target and what the quantization
probe reads.
"""

from __future__ import annotations

# Llama, Mistral and Mixtral (per expert): attention and SwiGLU MLP projections.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
