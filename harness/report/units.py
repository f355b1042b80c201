"""Units and number formatting. Every byte figure is shown in GB (1e9 bytes) with GiB (2^30) beside it."""

from __future__ import annotations

import math

from harness.schema import CATEGORIES

GB = 1e9
GIB = 2**30
# "7B" in the documents is Llama-2-7B; where 7e9 vs this count matters, the ledger says so.
LLAMA_2_7B_PARAMETERS = 6_738_415_616
DOCUMENTS_MODEL = "llama-2-7b"  # its preset's name


def gb(value: float) -> float:
    return value / GB


def gib(value: float) -> float:
    return value / GIB


def fmt_bytes(value: float | None, digits: int = 2) -> str:
    """'26.95 GB (25.10 GiB)'; values under 1 GB in MB (1e6) with MiB beside them."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) < 1e9:
        return f"{value / 1e6:.{digits}f} MB ({value / 2**20:.{digits}f} MiB)"
    return f"{gb(value):.{digits}f} GB ({gib(value):.{digits}f} GiB)"


def fmt_gb(value: float | None, digits: int = 3) -> str:
    """A table cell in GB (the column header states the unit)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{gb(value):.{digits}f}"


def fmt_percent(fraction: float | None, digits: int = 1, signed: bool = False) -> str:
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "-"
    return f"{fraction * 100:{'+' if signed else ''}.{digits}f}%"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def fmt_sci(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}"


# How a value of each claim unit is written (claims.yaml names the unit).
FORMATTERS = {
    "bytes": fmt_bytes,
    "fraction": lambda v: fmt_percent(v, 2),
    "bits_per_parameter": lambda v: "-" if v is None else f"{v:.2f} bits/parameter",
    "bytes_per_parameter": lambda v: "-" if v is None else f"{v:.1f} B/parameter",
    "bytes_per_value": lambda v: "-" if v is None else f"{v:.3f} B/value",
    "relative_error": fmt_sci,
    "count": fmt_count,
    "bits": lambda v: "-" if v is None else f"{v:g} bits",
    "bits_per_weight": lambda v: "-" if v is None else f"{v:.2f} bits/quantized weight",
    "ratio": lambda v: "-" if v is None else f"{v:.2f}x",
    "tokens_per_s": lambda v: "-" if v is None else f"{v:,.0f} tokens/s",
    "sequences": lambda v: "-" if v is None else f"{v:.0f} sequence{'' if v == 1 else 's'}",
}


# What a claim's figure measures, in words (the ledger's sub-line under the documents' figure).
UNIT_WORDS = {
    "bytes": "memory", "fraction": "a share", "bits_per_parameter": "bits per parameter",
    "bytes_per_parameter": "bytes per parameter", "relative_error": "a relative error", "count": "a count",
    "bits": "bits", "bits_per_weight": "bits per quantized weight", "ratio": "a ratio",
    "tokens_per_s": "a speed", "sequences": "sequences per micro-batch", "bytes_per_value": "bytes per stored value",
}


# The memory categories of a record, in words (tables, legends).
CATEGORY_WORDS = {**{name: name.replace("_", " ") for name in CATEGORIES}, "quant_constants": "quantization constants",
                  "all_gather": "all-gather buffers", "reduce_scatter": "reduce-scatter buffers"}


def fmt_value(value: float | None, unit: str) -> str:
    return FORMATTERS.get(unit, lambda v: "-" if v is None else f"{v:g}")(value)
