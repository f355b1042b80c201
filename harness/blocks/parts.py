"""What the descriptors of building blocks are made of (harness.blocks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Unmapped:
    """A building block an engine has no counterpart for, and why: its runs are `skipped`, saying it."""
    reason: str


class NotMapped(Exception):
    """An experiment an engine cannot run as it is: the record is `skipped` with the reason."""


@dataclass(frozen=True)
class BuiltForTrainer:
    """A block the lab builds itself and hands to Trainer (its `optimizers` argument), and why it has no name
    in TrainingArguments."""
    reason: str


# The loss comparison's reference: fp32 full fine-tuning (harness.report.loss).
BASELINE = "fp32"


@dataclass(frozen=True)
class LossRule:
    """The final held-out loss a technique must reach: within `tolerance` of a reference experiment's."""
    reference: str
    tolerance: float  # largest allowed (loss - reference) / reference
    why: str


@dataclass(frozen=True)
class Setting:
    """A field of an experiment's `optim:` block that one optimizer reads: its type, its default (also the
    value every record made before it existed ran with), its bound and what a value out of bounds is told."""
    name: str
    type: type
    default: Any
    within: Callable[[Any], bool]
    bound: str
    meaning: str


@dataclass(frozen=True)
class Refusal:
    """An experiment a block cannot be part of: the field to change, when (experiment, technique) trips it,
    and why."""
    field: str
    applies: Callable
    why: str
