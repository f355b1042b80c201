"""Every technique at the 7B shape and a 2,048-token sequence: the documents' techniques and those
beyond them (GaLore, torchao's low-bit AdamW, offloading, selective checkpointing, Liger, ...),
side by side, predicted by both methods and measured where a GPU run exists."""

from __future__ import annotations

import pandas as pd

from harness.report.load import gpu_measurement
from harness.report.tables import PREDICTIONS_AGREE, Cell, Table
from harness.report.units import CATEGORY_WORDS, GIB

MODEL, SEQ_LEN, MICRO_BATCH = "llama-2-7b", 2048, 1


def technique_rows(predictions: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment predicted at the shape: both methods' peaks (the simulation's first,
    where it ran), its categories, the host bytes offloading uses, the GPU measurement if any;
    smallest predicted peak first."""
    if not len(predictions):
        return pd.DataFrame()
    at = predictions[(predictions["model"] == MODEL) & (predictions["seq_len"] == SEQ_LEN)
                     & (predictions["micro_batch"] == MICRO_BATCH) & (predictions["device_type"] == "cuda")]
    rows = []
    for experiment, chosen in at.groupby("experiment"):
        by_method = {row["method"]: row for _, row in chosen.iterrows()}
        best = by_method.get("simulated", by_method.get("analytic"))
        row = {"experiment": experiment, "method": best["method"], "predicted": best["total_bytes"],
               "analytic": by_method["analytic"]["total_bytes"] if "analytic" in by_method else None,
               "host": best.get("host_bytes"), "measured": None, "device": None,
               **{name: best[f"peak_{name}"] for name in CATEGORY_WORDS}}
        row.update(gpu_measurement(runs, experiment, MODEL, SEQ_LEN, MICRO_BATCH))
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values("predicted", kind="stable").reset_index(drop=True)


def technique_table(rows: pd.DataFrame) -> Table:
    lines = []
    for _, row in rows.iterrows():
        detail = row["method"]
        if row["method"] == "simulated" and not pd.isna(row["analytic"]):
            if abs(row["analytic"] / row["predicted"] - 1) > PREDICTIONS_AGREE:
                detail += f"; analytic {row['analytic'] / GIB:.1f}"
            else:
                detail = "both methods"
        biggest = max(CATEGORY_WORDS, key=lambda name: 0 if pd.isna(row[name]) else row[name])
        host = "" if pd.isna(row["host"]) or not row["host"] else f"{row['host'] / GIB:.1f}"
        measured = Cell("-") if pd.isna(row["measured"]) else Cell(f"{row['measured'] / GIB:.1f}", row["device"])
        lines.append([Cell(row["experiment"]), Cell(f"{row['predicted'] / GIB:.1f}", detail),
                      Cell(f"{CATEGORY_WORDS[biggest]} {row[biggest] / GIB:.1f}"), Cell(host), measured])
    note = (f"{MODEL}, micro-batch {MICRO_BATCH} x {SEQ_LEN:,} tokens, on the CUDA code path; peaks in GiB (2^30 "
            "bytes), smallest first. Predicted: simulated where a simulation is saved (Liger's Triton kernels by "
            "stand-ins for their autograd Functions), both methods when they agree within 1%. Host: host memory "
            "the offloaded activations take, beside the GPU's. torch.compile is predicted as the eager step.")
    return Table(["Experiment", "Predicted GiB", "Largest part", "Host GiB", "Measured GiB"], lines, note=note,
                 css="beyond", numeric={1, 3, 4})
