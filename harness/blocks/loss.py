"""The loss rules of every building block, gathered from their descriptors: each precision, quantization,
adapter (and adapter variant) and optimizer that has a rule holds it, keyed by the experiment file that
shows it (harness.report.loss looks a record's experiment up here, then its technique)."""

from __future__ import annotations

from harness.blocks.adapters import ADAPTERS
from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.parts import LossRule
from harness.blocks.precisions import PRECISIONS
from harness.blocks.quantizations import QUANTIZATIONS


def loss_rules() -> dict[str, LossRule]:
    """{experiment that shows a block: the rule it is held to}; two blocks claiming one experiment is a slip
    in the descriptors (the experiment would be held to whichever came last)."""
    shown = [(block.shown_by, block.loss) for registry in (PRECISIONS, QUANTIZATIONS, ADAPTERS, OPTIMIZERS)
             for block in registry.values() if block is not None]
    shown += [(variant.shown_by, variant.loss) for adapter in ADAPTERS.values() if adapter is not None
              for variant in adapter.variants]
    rules: dict[str, LossRule] = {}
    for experiment, rule in shown:
        if isinstance(rule, LossRule):
            if experiment in rules:
                raise ValueError(f"two blocks give experiment {experiment!r} a loss rule")
            rules[experiment] = rule
    return rules
