"""Our loop against Trainer: each run in another training loop beside the lab's run of the same cell.

A run in transformers' Trainer or TRL's SFTTrainer (harness.engines) is paired with the lab's own
run of the same configuration on the same machine (every field equal but the engine and its
training_args; the device and, on a CPU, its instruction set: `load.machine`), shown or folded: the
ratio of their peaks and of their tokens/s, and the difference of their final
losses (the same sequences in the same order, so a loop that computes the same step gives the same
loss). A peak more than 3% apart, or a throughput more than 10% apart, says why: the memory category
that differs at the peak, the runs' own step-time spread, and what is known of the loop (REASONS).
A throughput ratio is a verdict only where both runs timed enough steps and the ratio lies beyond
the spread of their step times; otherwise the report says it is noise, or that the steps are too few.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness import schema
from harness.blocks.optimizers import OPTIMIZERS
from harness.report.load import LAB_ENGINE, _get, engine_of, machine
from harness.report.tables import Cell, Table
from harness.report.units import CATEGORY_WORDS, model_name

MEMORY_TOLERANCE = 0.03
THROUGHPUT_TOLERANCE = 0.10
# Fewer timed steps say too little of their own spread for a verdict: the sample standard deviation
# of 3 steps falls between 0.23 and 1.73 times the true one 9 times in 10 (chi-squared, 2 degrees of
# freedom); of 6 steps, between 0.48 and 1.49. Three timed steps on a CPU once made Trainer look
# up to 1.27x faster than our loop, which more steps did not confirm.
MIN_TIMED_STEPS = 6
# Fields that may differ between the two runs of a pair: which loop, and that loop's own settings.
ENGINE_FIELDS = ("engine", "training_args")

# What is known of each loop's difference from the lab's, found by reading the runs and the
# libraries' code: (engine, "memory" | "throughput", the technique's optimizer or None for any) -> why.
# An optimizer's own difference in Trainer is its descriptor's (harness.blocks.optimizers).
REASONS = {
    **{("trainer", "memory", name): optimizer.trainer_memory for name, optimizer in OPTIMIZERS.items()
       if optimizer.trainer_memory},
    ("trl-sft", "memory", None): (
        "SFTTrainer computes the loss in TRL's ChunkedLogProbFunction (a fused LM head that keeps no logits for "
        "backward); without Triton (on a CPU) it allocates its fp32 matmul buffer at up to 4,096 tokens x its chunk "
        "of 32,768 vocabulary entries, whatever the vocabulary, once in forward and once in backward: at the tiny "
        "preset's 4,096 words, eight times the logits (133.7 MB for 1,020 tokens, measured by the lab's tracker)"),
    # Where their loop is the slower one:
    ("trl-sft", "throughput", None): (
        "SFTTrainer computes the LM head twice (forward, and again in backward), and the entropy and token accuracy "
        "of every micro-batch for its metrics, read with .item() inside the step"),
}


def known_reason(engine: str, kind: str, optimizer: str | None) -> str | None:
    return REASONS.get((engine, kind, optimizer)) or REASONS.get((engine, kind, None))


@dataclass(frozen=True)
class EngineComparison:
    record: dict      # the run in another loop
    reference: dict   # the lab's run of the same cell
    peak_ratio: float | None
    tokens_ratio: float | None
    loss_difference: float | None
    eval_difference: float | None
    category_differences: dict[str, int]  # bytes alive at the peak, this loop's minus the lab's

    @property
    def engine(self) -> str:
        return engine_of(self.record)

    @property
    def memory_differs(self) -> bool:
        return self.peak_ratio is not None and abs(self.peak_ratio - 1) > MEMORY_TOLERANCE

    @property
    def throughput_differs(self) -> bool:
        return self.tokens_ratio is not None and abs(self.tokens_ratio - 1) > THROUGHPUT_TOLERANCE

    @property
    def timed_steps(self) -> int:
        """The fewer timed steps of the two runs."""
        return min(_get(r, "throughput", "timed_steps") or 0 for r in (self.record, self.reference))

    @property
    def throughput_noise(self) -> float:
        """How far the ratio of one step of each run strays from the ratio of their medians, as a log
        ratio: the two runs' relative step-time spreads combined (each a standard deviation over the
        median)."""
        return math.hypot(*(_spread(r) or 0.0 for r in (self.record, self.reference)))

    @property
    def throughput_beyond_noise(self) -> bool:
        """More than THROUGHPUT_TOLERANCE apart, from enough timed steps, beyond their spread: a difference
        of the loops, not of the moment each ran at."""
        return (self.throughput_differs and self.timed_steps >= MIN_TIMED_STEPS
                and abs(math.log(self.tokens_ratio)) > self.throughput_noise)


def pair_key(record: dict) -> tuple:
    config = {k: v for k, v in (record.get("config") or {}).items() if k not in ENGINE_FIELDS}
    return schema.configuration_key({**record, "config": config}, record.get("_slug") or ""), machine(record)


def _lab_runs(results) -> dict[tuple, dict]:
    """The lab's finished runs by pair key; a shown run before a folded one (a newer run of its configuration
    on another machine, whose Trainer run may be older)."""
    lab: dict[tuple, dict] = {}
    for record in results.records + results.folded_records:
        if record.get("status") == "ok" and engine_of(record) == LAB_ENGINE:
            lab.setdefault(pair_key(record), record)
    return lab


def _ratio(ours, theirs) -> float | None:
    return theirs / ours if ours and theirs is not None else None


def _difference(ours, theirs) -> float | None:
    return theirs - ours if ours is not None and theirs is not None else None


def engine_comparisons(results) -> list[EngineComparison]:
    """One comparison per finished run in another loop that has the lab's run of its cell, in file order."""
    lab = _lab_runs(results)
    comparisons = []
    for record in sorted(results.engine_records, key=lambda r: r.get("_file") or ""):
        reference = lab.get(pair_key(record))
        if record.get("status") != "ok" or reference is None:
            continue
        ours, theirs = (_get(reference, "memory", "breakdown_at_peak") or {}), (_get(record, "memory",
                                                                                      "breakdown_at_peak") or {})
        comparisons.append(EngineComparison(
            record, reference,
            peak_ratio=_ratio(_get(reference, "memory", "peak_allocated"), _get(record, "memory", "peak_allocated")),
            tokens_ratio=_ratio(_get(reference, "throughput", "tokens_per_s"), _get(record, "throughput",
                                                                                    "tokens_per_s")),
            loss_difference=_difference(_get(reference, "loss", "final"), _get(record, "loss", "final")),
            eval_difference=_difference(_get(reference, "loss", "eval_final"), _get(record, "loss", "eval_final")),
            category_differences={name: (theirs.get(name) or 0) - (ours.get(name) or 0) for name in CATEGORY_WORDS}))
    return comparisons


def not_run(results) -> list[str]:
    """Runs in another loop that measured nothing (skipped: the loop cannot express the cell), with why."""
    return [f"{r.get('experiment')} in {engine_of(r)}: {_get(r, 'error', 'message') or r.get('status')}"
            for r in sorted(results.engine_records, key=lambda r: r.get("_file") or "") if r.get("status") != "ok"]


def unpaired(results) -> list[str]:
    """Finished runs in another loop without the lab's run of their cell on their machine, each with its machine."""
    lab = _lab_runs(results)
    return [f"{r.get('experiment')} in {engine_of(r)} on {', '.join(str(part) for part in machine(r) if part)} "
            f"({r.get('_file')})"
            for r in sorted(results.engine_records, key=lambda r: r.get("_file") or "")
            if r.get("status") == "ok" and pair_key(r) not in lab]


def _spread(record: dict) -> float | None:
    """The step times' standard deviation over their median."""
    times = _get(record, "throughput", "step_time_s") or {}
    return times["stdev"] / times["median"] if times.get("stdev") is not None and times.get("median") else None


def why(comparison: EngineComparison) -> str:
    """Why the loops differ by more than the tolerances (empty where they do not)."""
    parts = []
    optimizer = (comparison.record.get("config") or {}).get("optimizer")
    if comparison.memory_differs:
        name = max(comparison.category_differences, key=lambda n: abs(comparison.category_differences[n]))
        change = comparison.category_differences[name]
        known = known_reason(comparison.engine, "memory", optimizer)
        parts.append(f"memory: {CATEGORY_WORDS[name]} at the peak {change / 2**20:+,.1f} MiB"
                     + (f"; {known}" if known else ""))
    if comparison.throughput_differs:
        parts.append("throughput: " + _throughput_why(comparison, optimizer))
    return "; ".join(parts)


def _throughput_why(comparison: EngineComparison, optimizer: str | None) -> str:
    if comparison.timed_steps < MIN_TIMED_STEPS:
        return (f"{comparison.timed_steps} timed steps, too few for a verdict (at least {MIN_TIMED_STEPS}: "
                "the spread of fewer is itself unknown)")
    if not comparison.throughput_beyond_noise:
        return (f"within noise: the step times' spread is {comparison.throughput_noise:.0%} (both runs' combined), "
                "not a difference of the loops")
    if comparison.tokens_ratio > 1:
        verdict = ("our loop is the slower one, beyond the step times' spread: a defect of ours to find "
                   "(not explained yet)")
    else:
        verdict = known_reason(comparison.engine, "throughput", optimizer) or "not explained yet"
    if on_gpu(comparison):
        return verdict
    # Seen on 2 shared cores: another job slowed every step of one run 7-fold, the pair's combined spread 33%.
    return verdict + ("; on a CPU shared with other jobs, one run can be slowed evenly throughout, which no spread "
                      "shows: run the pair again before trusting it")


def on_gpu(comparison: EngineComparison) -> bool:
    return _get(comparison.record, "memory", "source") == "cuda"


def _device(record: dict) -> str:
    name = _get(record, "environment", "device_name") or record.get("_slug") or "?"
    if _get(record, "memory", "source") == "cuda":
        return name
    return f"{name if name.startswith('CPU') else f'CPU ({name})'}, tracked tensor bytes"


def engine_table(comparisons: list[EngineComparison]) -> Table:
    rows = []
    for c in comparisons:
        config = c.record.get("config") or {}
        settings = config.get("training_args") or {}
        shape = (f"{model_name(config.get('model'))}, {config.get('seq_len')} x {config.get('micro_batch')} x "
                 f"{config.get('grad_accum')}")
        rows.append([
            Cell(str(c.record.get("experiment")), shape),
            Cell(_device(c.record)),
            Cell(c.engine, ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))),
            Cell("" if c.peak_ratio is None else f"{c.peak_ratio:.3f}", css="off" if c.memory_differs else ""),
            Cell("" if c.tokens_ratio is None else f"{c.tokens_ratio:.2f}",
                 css="off" if c.throughput_beyond_noise else ""),
            Cell("" if c.loss_difference is None else f"{c.loss_difference + 0.0:+.4f}",
                 "" if c.eval_difference is None else f"held-out {c.eval_difference + 0.0:+.4f}"),
            Cell(why(c)),
        ])
    note = (f"Each row: a run in another training loop over the lab's own run of the same cell (same model, "
            f"technique, shape, steps, batches, device; on a CPU the same processor and instruction set). Peak: "
            f"peak tracked or allocated bytes, theirs over ours; tokens/s: median over the timed steps after "
            f"warm-up, theirs over ours; loss: final training loss, theirs minus ours (nats). Shaded: more than "
            f"{MEMORY_TOLERANCE:.0%} apart in memory, or more than {THROUGHPUT_TOLERANCE:.0%} in throughput beyond "
            f"the spread of the step times (of at least {MIN_TIMED_STEPS} timed steps each). CPU rows are CPU "
            f"figures (tracked tensor bytes, a shared processor's speed), not a GPU's.")
    return Table(["Experiment", "Device", "Engine", "Peak ratio", "Tokens/s ratio", "Loss difference", "Why"],
                 rows, note, css="engines", numeric={3, 4, 5})

