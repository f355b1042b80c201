"""The optimisation ladder: one technique at a time, from pure bf16 full fine-tuning to QLoRA, at
the configuration torchtune publishes its own ladder for (Llama-3.2-3B, micro-batch 2 of
4,096-token sequences), with torchtune's figures beside the lab's.

Each rung is a row of the second ledger (published.yaml): torchtune's figure, and the lab's
experiment for the same step (a cell of the cuda plan's ladder block), predicted by `harness
predict --claims` and measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.claims import PUBLISHED_FILE, load_claims
from harness.report.load import gpu_measurement
from harness.report.tables import Cell, Table
from harness.report.units import CATEGORY_WORDS, GIB, fmt_bytes

MODEL, SEQ_LEN, MICRO_BATCH = "llama-3.2-3b", 4096, 2
TORCHTUNE = "torchtune's ladder (README, peak active, A100)"


@dataclass(frozen=True)
class Rung:
    label: str
    claim: str | None   # torchtune's figure for the same step: an ID of the second ledger (published.yaml)
    experiment: str | None = None  # the lab's step where torchtune publishes none (its claim names it otherwise)
    missing: str = ""   # why torchtune has no figure for it


# Each rung adds one technique to the one before; where torchtune publishes the step, the second
# ledger's row for it names our experiment.
RUNGS = [
    Rung("bf16 full fine-tuning, packed", "TT-3b-packed"),
    Rung("+ activation checkpointing", "TT-3b-gc"),
    Rung("+ optimizer step in backward", "TT-3b-optim-in-bwd"),
    Rung("+ activation offloading", "TT-3b-offload"),
    Rung("+ 8-bit AdamW", "TT-3b-8bit"),
    Rung("+ lean loss (Liger's fused linear cross-entropy)", None, "bf16-adamw8bit-gc-optim-in-bwd-offload-liger",
         missing="torchtune chunks its cross-entropy earlier in its ladder (42.9 GiB, compiled, before checkpointing): "
                 "no figure for this step"),
    Rung("LoRA", "TT-3b-lora"),
    Rung("QLoRA", "TT-3b-qlora"),
]


def ladder_rows(predictions: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per rung: the predicted peak and its categories (simulated, else analytic), the
    measured peak where a GPU run exists, and torchtune's figure with how the two steps differ."""
    published = {claim.id: claim for claim in load_claims(PUBLISHED_FILE)}
    rows = []
    for rung in RUNGS:
        claim = published.get(rung.claim)
        experiment = claim.evidence["experiment"] if claim else rung.experiment
        row = {"label": rung.label, "experiment": experiment,
               "theirs_gib": claim.figure_value / GIB if claim else None,
               "comparison": (claim.explain or claim.caveat or "") if claim else rung.missing,
               "method": None, "predicted": None, "measured": None, "device": None}
        if experiment is not None and len(predictions):
            chosen = predictions[(predictions["experiment"] == experiment) & (predictions["model"] == MODEL)
                                 & (predictions["seq_len"] == SEQ_LEN) & (predictions["micro_batch"] == MICRO_BATCH)
                                 & (predictions["device_type"] == "cuda")]
            for method in ("simulated", "analytic"):
                found = chosen[chosen["method"] == method]
                if len(found):
                    best = found.iloc[0]
                    row.update(method=method, predicted=best["total_bytes"],
                               **{name: best[f"peak_{name}"] for name in CATEGORY_WORDS})
                    break
        if experiment is not None:
            row.update(gpu_measurement(runs, experiment, MODEL, SEQ_LEN, MICRO_BATCH))
        rows.append(row)
    return pd.DataFrame(rows)


def not_monotone(rows: pd.DataFrame) -> list[str]:
    """Rungs whose peak, predicted or measured, is above the rung before them (each should lower it), with
    the prediction and the measurement side by side wherever both exist: the text says what the records
    say, and a prediction's rise that the GPU does not show is said to be the prediction's."""
    lines = []
    for position in range(1, len(rows)):
        predicted, measured = _change(rows, position, "predicted"), _change(rows, position, "measured")
        if not any(change and change[0] > change[1] for change in (predicted, measured)):
            continue
        said = [f"{name} {_words(change)}" for name, change in (("predicted", predicted), ("measured", measured))
                if change]
        if predicted and measured and predicted[0] > predicted[1] and measured[0] <= measured[1]:
            said.append("the GPU does not show the predicted rise")
        lines.append(f"{rows.iloc[position]['label']} ({'; '.join(said)})")
    return lines


def _change(rows: pd.DataFrame, position: int, column: str) -> tuple[float, float, str] | None:
    """A rung's peak in `column` and that of the nearest rung above it that has one (a rung may be
    predicted but not measured): (peak, peak before, label before), or None where either is missing."""
    if pd.isna(rows.iloc[position].get(column)):
        return None
    earlier = rows.iloc[:position]
    earlier = earlier[earlier[column].notna()] if column in earlier else earlier.iloc[:0]
    if not len(earlier):
        return None
    return rows.iloc[position][column], earlier.iloc[-1][column], earlier.iloc[-1]["label"]


def _words(change: tuple[float, float, str]) -> str:
    value, before, label = change
    relation = "above" if value > before else "below" if value < before else "equal to"
    return f"{fmt_bytes(value)}, {relation} {fmt_bytes(before)} at '{label}'"


def ladder_table(rows: pd.DataFrame) -> Table:
    lines = []
    for _, row in rows.iterrows():
        experiment = row["experiment"] if isinstance(row["experiment"], str) else None
        if experiment is None:
            ours, measured = Cell("-", "no counterpart in the lab"), Cell("-")
        elif pd.isna(row["predicted"]):
            ours, measured = Cell("-", "`python -m harness predict --claims` predicts it"), Cell("-")
        else:
            biggest = max(CATEGORY_WORDS, key=lambda name: 0 if pd.isna(row[name]) else row[name])
            ours = Cell(f"{row['predicted'] / GIB:.1f}", f"{row['method']}; largest: {CATEGORY_WORDS[biggest]} "
                                                           f"{row[biggest] / GIB:.1f}")
            measured = (Cell(f"{row['measured'] / GIB:.1f}", row["device"]) if not pd.isna(row["measured"])
                        else Cell("-"))
        theirs = Cell("-") if pd.isna(row["theirs_gib"]) else Cell(f"{row['theirs_gib']:.1f}")
        ratio = ("" if pd.isna(row["predicted"]) or pd.isna(row["theirs_gib"])
                 else f"{row['theirs_gib'] * GIB / row['predicted']:.2f}")
        lines.append([Cell(row["label"], experiment or ""), ours, measured, theirs, Cell(ratio),
                      Cell(row["comparison"])])
    note = (f"{MODEL}, micro-batch {MICRO_BATCH} x {SEQ_LEN:,} tokens, on the CUDA code path; peaks in GiB "
            f"(2^30 bytes). Ours: predicted (simulated where it ran, else analytic), measured where a GPU run "
            f"exists. Theirs: {TORCHTUNE}. Ratio: theirs over our prediction.")
    return Table(["Rung", "Ours, predicted GiB", "Ours, measured GiB", "torchtune GiB", "Ratio", "How they differ"],
                 lines, note=note, css="ladder", numeric={1, 2, 3, 4})
