"""`harness predict --solve seq_len|micro_batch`: the longest sequence, or the largest micro-batch, whose training
step fits a card.

The analytic device bytes are searched first (harness.predict.search: instant). The simulation (the runner's own
step under fake tensors, the allocator replayed under the card) then checks that answer as the fit table's are
checked, by the one search of harness.predict.confirm: where the step fits, the answer stands; where it runs out,
the search goes below it until the longest value simulated to fit is within 1% of the shortest simulated to run
out. A step the fit table holds a current confirmation of is read from it, not searched again, so `--solve` and
the report give one answer. The answer names the method that decided it.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness.cards import card_bytes
from harness.predict.confirm import Target, settle
from harness.predict.search import ALLOCATOR_WORDS, Answer, limited_by, setup

AXES = ("seq_len", "micro_batch")


def solve(experiment: Path, model: str, card_gb: float, axis: str, *, seq_len: int = 512, micro_batch: int = 1,
          overrides: dict | None = None, device_type: str = "cuda", simulate: bool = True,
          allocator: str = "default", out_dir: Path | None = None) -> dict:
    """Solve one axis for an experiment file and a model on a card, its caching allocator set as `allocator` says
    (harness.predict.allocator.SETTINGS); the other axis stays fixed. Simulated, the answer is the fit table's
    where it is the same step (harness.predict.confirm.settle: a current confirmation under `out_dir` is read)."""
    if axis not in AXES:
        raise ValueError(f"--solve: expected one of {', '.join(AXES)}, got {axis!r}")
    started = time.perf_counter()
    found_setup = setup(experiment, model, overrides, device_type, allocator)
    config, context = found_setup.config, found_setup.context
    cap = card_bytes(card_gb)  # what the predicted device bytes must fit
    target = Target(Path(experiment), model, overrides or {}, card_gb, micro_batch, allocator,
                    None if axis == "seq_len" else seq_len)
    found = target.analytic(found_setup)
    result = {
        "axis": axis, "experiment": config.name, "model": model, "card_gb": card_gb,
        "card_bytes": cap, "cap_bytes": cap, "device_type": device_type, "allocator": allocator,
        "gradient_checkpointing": config.experiment.gradient_checkpointing,
        "fixed": {"micro_batch": micro_batch} if axis == "seq_len" else {"seq_len": seq_len},
        "analytic": _answer_dict(found, axis, context),
    }
    decided, confirmation, read_from = found, None, None
    if simulate:
        # the confirmations under out_dir are CUDA steps': a CPU step is searched
        decided, confirmation, read_from = settle(found_setup, target, found, out_dir if device_type == "cuda" else None,
                                                  device_type)
    # nothing to confirm, or nothing simulated to fit: `decided` is the formula's answer, said as such
    if confirmation is not None and confirmation["resolved"]:
        result["simulated"] = {**_answer_dict(decided, axis, context), "fails_at": confirmation["fails_at"],
                               "read_from": None if read_from is None else str(read_from)}
    method = "simulated" if "simulated" in result else "analytic"
    result.update({"method": method, f"max_{axis}": decided.value,
                   **{k: v for k, v in result[method].items() if k not in ("value", "fails_at", "read_from")},
                   "device_bytes": decided.peak_bytes,
                   "margin_bytes": None if decided.peak_bytes is None else cap - decided.peak_bytes,
                   "seconds": time.perf_counter() - started})
    return result


def _answer_dict(answer: Answer, axis: str, context: int | None) -> dict:
    return {"value": answer.value, "peak_bytes": answer.peak_bytes, "next_peak_bytes": answer.next_peak_bytes,
            "limited_by": limited_by(answer, axis, context), "evaluations": answer.evaluations}


def describe(result: dict) -> str:
    axis, value = result["axis"], result[f"max_{result['axis']}"]
    unit = "tokens" if axis == "seq_len" else "sequences"
    fixed = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in result["fixed"].items())
    what = "longest sequence" if axis == "seq_len" else "largest micro-batch"
    head = (f"{result['experiment']} @ {result['model']}{' (gradient checkpointing)' if result['gradient_checkpointing'] else ''}"
            f" on a {result['card_gb']:g} GB card ({result['card_bytes'] / 2**30:.1f} GiB; predicted device bytes: "
            f"the allocator's reserved segments, the CUDA context, kernels and unified memory"
            f"{ALLOCATOR_WORDS.get(result.get('allocator'), '')}):")
    if value == 0:
        return (f"{head}\n  does not fit even at 1 {unit[:-1]} ({fixed}): device "
                f"{result['next_peak_bytes'] / 2**30:.2f} GiB ({result['method']})")
    lines = [head, f"  {what} that fits, at {fixed}: {value:,} {unit} (device {result['peak_bytes'] / 2**30:.2f} GiB, "
                   f"{result['margin_bytes'] / 2**30:.2f} GiB to spare, {result['method']})"]
    analytic, simulated = result["analytic"], result.get("simulated")
    if simulated and simulated["fails_at"] is not None:
        lines.append(f"  {simulated['fails_at']:,} {unit}: runs out of the card (simulated)")
    elif analytic["value"] == value and analytic["next_peak_bytes"] is not None:
        lines.append(f"  {value + 1:,} {unit}: {analytic['next_peak_bytes'] / 2**30:.2f} GiB, does not fit (analytic)")
    elif result["limited_by"] == "context":
        lines.append(f"  (the model's context, {value:,} tokens, is reached before the card is full)")
    else:
        lines.append(f"  (the search stopped at {value:,}: the card is still not full)")
    if simulated:
        how = (f"the fit table's confirmation, {simulated['read_from']}" if simulated["read_from"] else
               f"{simulated['evaluations']} simulated step{'s' * (simulated['evaluations'] != 1)}, "
               f"{result['seconds']:.0f} s")
        lines.append(f"  analytic formula: {analytic['value']:,} {unit}; {how}")
    return "\n".join(lines)
