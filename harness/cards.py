"""The GPU catalogue: each card's dense peak throughput, memory bandwidth, memory and a rental price.

One table for the whole lab (torch-free: the report reads it too). MFU divides by a card's peak
(harness.measure.throughput), the speed model scales the lab's own measured throughput on one card to
another by the ratio of their peaks and bandwidths (harness.predict.speed), and the fit table maps
a card size to the card whose speed and price it shows (CARD_OF_SIZE).

Peaks are dense (no 2:4 sparsity) tensor-core FLOP/s for bf16/fp16 with fp32 accumulation, the
non-tensor fp32 rate (fp32 matmuls are not run as TF32 by the lab), and int8 tensor OP/s.
Sources, the vendors' data sheets:
- H100 SXM5, H100 PCIe: NVIDIA H100 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h100/).
- H200 SXM: NVIDIA H200 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/h200/).
- A100 40GB SXM: NVIDIA A100 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/a100/).
- L40S: NVIDIA L40S data sheet (nvidia.com/en-us/data-center/l40s/).
- L4: NVIDIA L4 Tensor Core GPU data sheet (nvidia.com/en-us/data-center/l4/).
- RTX 4090, RTX 3090: NVIDIA Ada GPU architecture white paper, appendix table (RTX 4090, fp16/bf16 with
  fp32 accumulate), NVIDIA Ampere GA102 GPU architecture white paper (RTX 3090).
- T4: NVIDIA T4 Tensor Core GPU data sheet (no bf16 tensor cores: bf16 is None).
The host link is each data sheet's PCIe rate, one direction (half the bidirectional figure they print): Gen5
x16 (H200, H100): 64 GB/s; Gen4 x16 (A100, L40S, L4, RTX 4090, RTX 3090): 32 GB/s; Gen3 x16 (T4): 16 GB/s.
A pinned copy achieves somewhat less than the rate the link is sold at.

Prices, USD per GPU-hour on demand (the user sets their own with `harness predict --price`):
- A100, H100, H200: the low end of the "specialty cloud" on-demand range in Mercatus' cloud GPU pricing
  guide, May 2026 (mercatus-ai.com/blog/cloud-gpu-pricing): A100 80GB $1.10-1.50, H100 SXM5 $2.50-3.50,
  H200 SXM5 $3.50-4.50.
- RTX 4090: $0.34/h, L40S: $0.26/h, T4: $0.07/h: GPU Tracker's cost-per-token article, March 2026
  (gputracker.dev/blog/gpu-cost-per-token-llm-inference-2026); the L40S and T4 figures are its spot prices.
- H100 PCIe, L4, RTX 3090: no price (None): give one with --price.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    memory_gb: float            # as sold
    bf16: float | None          # dense FLOP/s
    fp16: float
    fp32: float
    int8: float                 # dense OP/s
    bandwidth: float            # memory bandwidth, bytes/s
    price_per_hour: float | None  # USD per GPU-hour (sources above)
    host_link: float            # PCIe bytes/s one way between host and card (activation offloading's copies)

    def peak(self, compute_dtype: str) -> float | None:
        return {"bf16": self.bf16, "fp16": self.fp16, "fp32": self.fp32, "int8": self.int8}.get(compute_dtype)


# Ordered: a device name is matched against the keys in this order ("H100 PCIe" before "H100").
CARDS = {
    "H200": Card(141, 989e12, 989e12, 67e12, 1979e12, 4.8e12, 3.50, 64e9),
    "H100 PCIe": Card(80, 756e12, 756e12, 51e12, 1513e12, 2.0e12, None, 64e9),
    "H100": Card(80, 989e12, 989e12, 67e12, 1979e12, 3.35e12, 2.50, 64e9),
    "A100": Card(40, 312e12, 312e12, 19.5e12, 624e12, 1.555e12, 1.10, 32e9),
    "L40S": Card(48, 362e12, 362e12, 91.6e12, 733e12, 0.864e12, 0.26, 32e9),
    "L4": Card(24, 121e12, 121e12, 30.3e12, 242.5e12, 0.3e12, None, 32e9),
    "RTX 4090": Card(24, 165.2e12, 165.2e12, 82.6e12, 660.6e12, 1.008e12, 0.34, 32e9),
    "RTX 3090": Card(24, 71e12, 71e12, 35.6e12, 284e12, 0.936e12, None, 32e9),
    "T4": Card(16, None, 65e12, 8.1e12, 130e12, 0.32e12, 0.07, 16e9),
}

# The card the fit table (harness.predict.fit_table.FIT_CARDS) shows each size's speed and price for:
# the common rental card of that size.
CARD_OF_SIZE = {16: "T4", 24: "RTX 4090", 40: "A100", 48: "L40S", 80: "H100", 141: "H200"}


class UnknownCard(ValueError):
    pass


def card(name: str) -> Card:
    """A card by its catalogue name (case-insensitive), or by a device name that contains one
    ("NVIDIA H200" -> H200)."""
    for key, value in CARDS.items():
        if key.lower() == name.lower():
            return value
    found = card_in_device_name(name)
    if found is None:
        raise UnknownCard(f"unknown GPU {name!r}: one of {', '.join(CARDS)}")
    return CARDS[found]


def card_in_device_name(device_name: str) -> str | None:
    """The catalogue name a device name (torch.cuda.get_device_name) contains, if any."""
    for key in CARDS:
        if key.lower() in device_name.lower():
            return key
    return None


# -- a card's size --------------------------------------------------------------------------------
# One convention everywhere: a card's "N GB" is its size as sold, and GPU memory is sold in binary
# units, so a "24 GB" card holds 24 GiB (25,769,803,776 B). The H200's "141 GB" is its maker's rounding;
# the one the lab measured holds 150,109,880,320 bytes (139.8 GiB). An experiment's `budget_gb`,
# `--budget-gb`, `--card`, the fit table's cards, the report's figures and the claims ledger's cards all
# go through card_bytes. (Figures the documents themselves state, such as "28 GB" of weights, are their
# own arithmetic in 1e9 bytes, and the ledger compares them as such.)
CARD_BYTES = {16: 16 * 2**30, 24: 24 * 2**30, 40: 40 * 2**30, 48: 48 * 2**30, 80: 80 * 2**30,
              141: 150_109_880_320}


def card_bytes(card_gb: float) -> int:
    """A card of this nominal size, in bytes (sizes not listed: GiB)."""
    return CARD_BYTES.get(card_gb, int(card_gb * 2**30))
