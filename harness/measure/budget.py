"""What an N GB card leaves to a training run (torch-free: predictions and reports use it too)."""

from __future__ import annotations

# The CUDA context and the kernels of cuBLAS/cuDNN live outside the torch allocator; a run
# records the context it measured beside this allowance.
CUDA_CONTEXT_ALLOWANCE = 512 * 2**20


def budget_cap_bytes(budget_gb: float, device_type: str) -> int:
    """Bytes the torch allocator (CUDA) or the tensor tracker (CPU) may hold on an N GB card."""
    allowance = CUDA_CONTEXT_ALLOWANCE if device_type == "cuda" else 0
    return max(int(budget_gb * 1e9) - allowance, 0)


# A card's size as sold names binary gigabytes: a "24 GB" card holds 24 GiB (25.8e9 bytes). The
# H200's "141 GB" is its maker's rounding; one measured by the lab holds 150,109,880,320 bytes
# (139.8 GiB). Sizes not listed are read as GiB.
CARD_BYTES = {16: 16 * 2**30, 24: 24 * 2**30, 40: 40 * 2**30, 48: 48 * 2**30, 80: 80 * 2**30,
              141: 150_109_880_320}


def card_bytes(card_gb: float) -> int:
    return CARD_BYTES.get(card_gb, int(card_gb * 2**30))


def card_cap_bytes(card_gb: float) -> int:
    """Bytes the torch allocator may hold on a card of this nominal size (CUDA context set aside)."""
    return max(card_bytes(card_gb) - CUDA_CONTEXT_ALLOWANCE, 0)
