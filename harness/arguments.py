"""Command-line numbers and folders, checked like experiment fields (argparse types).

A bad value is argparse's usage error (exit status 2) naming the flag, before anything runs.
Torch-free, and the report's folder check imports nothing else of the harness.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def like_field(field_name: str, kind: type = int):
    """The value of an experiment field given on the command line (e.g. --seq-len: seq_len)."""
    from harness.config import field_check

    ok, message = field_check(field_name)

    def parse(text: str):
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{message} (got {text})")
        return value
    parse.__name__ = field_name
    return parse


def positive(kind: type = float):
    def parse(text: str):
        value = _number(text, kind)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive (got {text})")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def parse_duration(text: str) -> float:
    """Seconds (positive) from '11m', '90s', '1h', '1m30s' or a plain number of seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    value = str(text).strip().lower()
    total, number = 0.0, ""
    for char in value:
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            number = "bad"
            break
    try:
        total += float(number) if number else 0.0
    except ValueError:
        total = 0.0
    if total <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 11m, 90s, 1m30s, 600)")
    return total
