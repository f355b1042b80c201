"""What a card leaves to a training run's tensors (torch-free: predictions and reports use it too); a
card's size is harness.cards.card_bytes."""

from __future__ import annotations

from harness.cards import card_bytes
from harness.device_memory import outside_allocator_bytes, unified_memory_bytes


def budget_cap_bytes(budget_gb: float, device_type: str, technique=None, unified_bytes: int = 0) -> int:
    """Bytes the torch allocator (CUDA) or the tensor tracker (CPU) may hold on a card of `budget_gb`:
    on CUDA the card less what lives outside the allocator (the context and the kernels a step of
    `technique` loads, harness.device_memory; half-precision kernels when not given), and less the device
    memory `unified_bytes` of CUDA unified memory take (a paged optimizer's state) where a caller knows them."""
    outside = outside_allocator_bytes(technique) + unified_memory_bytes(unified_bytes) if device_type == "cuda" else 0
    return max(card_bytes(budget_gb) - outside, 0)


def card_cap_bytes(card_gb: float, technique=None, unified_bytes: int = 0) -> int:
    """Bytes the torch allocator may reserve on a card of this nominal size."""
    return budget_cap_bytes(card_gb, "cuda", technique, unified_bytes)
