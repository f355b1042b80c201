"""What a card of N GB holds, and what it leaves to a training run (torch-free: predictions and reports use it too).

One convention everywhere: a card's "N GB" is its size as sold, and GPU memory is sold in binary
units, so a "24 GB" card holds 24 GiB (25,769,803,776 B). The H200's "141 GB" is its maker's rounding;
the one the lab measured holds 150,109,880,320 bytes (139.8 GiB). An experiment's `budget_gb`,
`--budget-gb`, `--card`, the fit table's cards, the report's figures and the claims ledger's cards all
go through card_bytes. (Figures the documents themselves state, such as "28 GB" of weights, are their
own arithmetic in 1e9 bytes, and the ledger compares them as such.)
"""

from __future__ import annotations

CARD_BYTES = {16: 16 * 2**30, 24: 24 * 2**30, 40: 40 * 2**30, 48: 48 * 2**30, 80: 80 * 2**30,
              141: 150_109_880_320}


def card_bytes(card_gb: float) -> int:
    """A card of this nominal size, in bytes (sizes not listed: GiB)."""
    return CARD_BYTES.get(card_gb, int(card_gb * 2**30))


def budget_cap_bytes(budget_gb: float, device_type: str, technique=None) -> int:
    """Bytes the torch allocator (CUDA) or the tensor tracker (CPU) may hold on a card of `budget_gb`:
    on CUDA the card less what lives outside the allocator (the context and the kernels a step of
    `technique` loads, harness.predict.device_memory; half-precision kernels when not given)."""
    from harness.predict.device_memory import outside_allocator_bytes

    outside = outside_allocator_bytes(technique) if device_type == "cuda" else 0
    return max(card_bytes(budget_gb) - outside, 0)


def card_cap_bytes(card_gb: float, technique=None) -> int:
    """Bytes the torch allocator may reserve on a card of this nominal size."""
    return budget_cap_bytes(card_gb, "cuda", technique)
