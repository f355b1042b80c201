"""Units and number formatting. Every byte figure is shown in GB (1e9 bytes) with GiB (2^30) beside it."""

from __future__ import annotations

import math
from pathlib import PurePosixPath

from harness.cards import CARD_BYTES, card_bytes
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


def card_of(byte_count: float | None) -> int | None:
    """The nominal size N of a card of the lab's convention (harness.cards.card_bytes: a card sold as N GB
    holds N GiB, the H200 its measured bytes) that holds exactly `byte_count`, else None: a budget given in
    1e9-byte GB is a cap, not such a card, and must not be named as one."""
    if byte_count is None or (isinstance(byte_count, float) and math.isnan(byte_count)):
        return None
    candidates = [*CARD_BYTES, round(byte_count / GIB)]
    return next((size for size in candidates if card_bytes(size) == byte_count), None)


def fmt_card(byte_count: float | None) -> str:
    """A budget as what it is: '24 GB card (24.00 GiB)' for a card of the lab's convention, else its bytes."""
    size = card_of(byte_count)
    if size is None:
        return fmt_bytes(byte_count)
    return f"{size} GB card ({gib(byte_count):.2f} GiB)"


def fmt_percent(fraction: float | None, digits: int = 1, signed: bool = False) -> str:
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "-"
    return f"{fraction * 100:{'+' if signed else ''}.{digits}f}%"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def fmt_counted(n: int, noun: str) -> str:
    """'1 speed prediction', '49 speed predictions'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def fmt_counts(counts: dict[str, int]) -> str:
    """Counts of several kinds, each saying what it counts: '499 memory predictions, 2 fit tables'."""
    return ", ".join(fmt_counted(n, noun) for noun, n in counts.items() if n)


# harness.env records a library it could not import as None: the report says so in words, the same everywhere.
NOT_INSTALLED = "not installed"
NOT_RECORDED = "?"  # a record made before the library was listed


def fmt_version(versions: dict | None, name: str) -> str:
    if name not in (versions or {}):
        return NOT_RECORDED
    return NOT_INSTALLED if versions[name] is None else str(versions[name])


def fmt_versions(versions: dict | None) -> str:
    """'liger-kernel not installed, peft 0.22.0': every library a record lists, by name."""
    return ", ".join(f"{name} {fmt_version(versions, name)}" for name in sorted(versions or {}))


# A model given as a file (heldout/gemma-2-2b.json) or a folder is named by the file's stem or the folder's name.
MODEL_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def model_name(model) -> str:
    """A model as the report names it. Only a label that is a path loses its suffix: "llama-3.1-8b" is a
    name, not a file ending in .1-8b."""
    model = str(model)
    if "/" not in model and not model.endswith(MODEL_FILE_SUFFIXES):
        return model
    path = PurePosixPath(model.rstrip("/"))
    return path.stem if path.suffix in MODEL_FILE_SUFFIXES else path.name


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
