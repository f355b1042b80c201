"""Loss parity: each technique's final held-out loss against a reference run on the same pretrained base.

Memory and speed do not depend on weight values; loss does. Only runs that fine-tune pretrained
weights (`random_init` false) and evaluated on held-out text are compared, and only with a
reference run of the same comparison: same model, device class, data, steps, sequence length,
effective batch, evaluation and seed. A loss above the reference by more than the technique's
tolerance is "off"; a loss below it holds (the technique costs nothing here).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.blocks.loss import loss_rules
from harness.blocks.parts import BASELINE, LossRule
from harness.report.verdicts import HOLDS, OFF, UNCHECKED, Verdict, relative_error

# Each technique against the run it should match, as the descriptor of the block it changes says
# (harness.blocks): precision changes against fp32 full fine-tuning, quantized bases against LoRA on the
# unquantized base (the adapter is the same), adapter variants against LoRA, each optimizer against its
# reference, each in the experiment that shows it.
LOSS_RULES = loss_rules()
COMPARISON_KEYS = ("model", "base_checkpoint", "device", "data", "steps", "warmup_steps", "seq_len", "eval_every",
                   "eval_sequences", "seed")


@dataclass(frozen=True)
class LossComparison:
    record: dict
    reference: dict | None
    rule: LossRule | None
    loss: float
    reference_loss: float | None
    verdict: Verdict

    @property
    def difference(self) -> float | None:
        return None if self.reference_loss is None else self.loss - self.reference_loss

    @property
    def ratio(self) -> float | None:
        return None if not self.reference_loss else self.loss / self.reference_loss

    @property
    def learning_rate(self) -> float | None:
        return learning_rate(self.record)

    @property
    def reference_learning_rate(self) -> float | None:
        return None if self.reference is None else learning_rate(self.reference)

    @property
    def crosses_learning_rates(self) -> bool:
        """The run and its reference trained at different learning rates (an adapter at its own against full
        fine-tuning): the comparison is then of recipes, not of the technique's arithmetic alone."""
        return self.reference is not None and self.learning_rate != self.reference_learning_rate


def comparison_key(record: dict) -> tuple:
    config = record.get("config") or {}
    effective_batch = (config.get("micro_batch") or 0) * (config.get("grad_accum") or 0)
    return tuple(repr(config.get(key)) for key in COMPARISON_KEYS) + (effective_batch,)


def learning_rate(record: dict) -> float | None:
    """The optimizer's learning rate, as the run's configuration gave it (not a key of the comparison: each
    technique trains at its own)."""
    return ((record.get("config") or {}).get("optim") or {}).get("lr")


def crossed_learning_rates(comparisons: list[LossComparison]) -> list[str]:
    """'lora at 0.002 against fp32 at 0.0002': each pair of experiments compared across learning rates, once."""
    pairs = [f"{c.record.get('experiment')} at {c.learning_rate:g} against {c.rule.reference} at "
             f"{c.reference_learning_rate:g}" for c in comparisons if c.crosses_learning_rates
             and c.learning_rate is not None and c.reference_learning_rate is not None]
    return list(dict.fromkeys(pairs))


def eval_final(record: dict) -> float | None:
    return (record.get("loss") or {}).get("eval_final")


def comparable(record: dict) -> bool:
    """A finished fine-tune of pretrained weights with a final held-out loss."""
    return record.get("status") == "ok" and record.get("random_init") is False and eval_final(record) is not None


def judge_loss(loss: float, reference_loss: float, rule: LossRule) -> Verdict:
    error = relative_error(loss, reference_loss)
    if error <= rule.tolerance + 1e-12:
        where = "below" if error < 0 else "within"
        return Verdict(HOLDS, error, f"{where} +{rule.tolerance:.0%} of {rule.reference}")
    return Verdict(OFF, error, f"more than +{rule.tolerance:.0%} above {rule.reference}")


def loss_parity(records: list[dict], folded: list[dict] = ()) -> list[LossComparison]:
    """One comparison per comparable run except the baselines, in a fixed order. `folded`: records a newer
    record of their configuration replaced (harness.report.load), which stand as references where no shown
    run does: a reference must share the run's base, data and steps, and a base pretrained again on another
    machine is another base, whose newest runs may be only some of the cells."""
    runs = sorted((r for r in records if comparable(r)), key=lambda r: r.get("_file") or "")
    references: dict[tuple, dict] = {}
    # reference runs: no gradient checkpointing (it changes no arithmetic); a shown run first, then the first file
    for record in runs + sorted((r for r in folded if comparable(r)), key=lambda r: r.get("_file") or ""):
        config = record.get("config") or {}
        if not config.get("gradient_checkpointing"):
            references.setdefault((comparison_key(record), record.get("experiment")), record)
    comparisons = []
    for record in runs:
        # An experiment's own rule, else its technique's (an adapter variant such as DoRA is
        # held to LoRA's); references are experiments, so a variant never stands in for one.
        experiment, technique = record.get("experiment"), (record.get("config") or {}).get("technique")
        if experiment == BASELINE:
            continue
        rule = LOSS_RULES.get(experiment) or LOSS_RULES.get(technique)
        reference = references.get((comparison_key(record), rule.reference)) if rule else None
        loss = eval_final(record)
        if reference is None:
            why = (f"no rule for {experiment!r}" if rule is None
                   else f"no {rule.reference} run on the same base, data and steps to compare with")
            comparisons.append(LossComparison(record, None, rule, loss, None, Verdict(UNCHECKED, None, why)))
            continue
        reference_loss = eval_final(reference)
        comparisons.append(LossComparison(record, reference, rule, loss, reference_loss,
                                          judge_loss(loss, reference_loss, rule)))
    return comparisons
