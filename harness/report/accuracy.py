"""How close the memory predictions come to what a GPU measured, per run and per memory category.

The predictors must pass this check: the simulation within 3% and the analytic formula within
10% of the allocator's peak (torch.cuda.max_memory_allocated). A run outside gets the reason
found for it (RESIDUALS), or is flagged as unexplained. Beside the allocator's peak, each row
shows what no tensor-counting predictor sees: the allocator's cache (reserved - allocated),
the CUDA context (NVML device-used before loading) and the whole device's use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from harness.report.load import CATEGORIES

TOLERANCES = {"simulated": 0.03, "analytic": 0.10}
PREDICTION_KEYS = ["experiment", "model", "seq_len", "micro_batch", "grad_accum", "world_size"]


@dataclass(frozen=True)
class Residual:
    applies: Callable[[pd.Series], bool]
    reason: str


# Why a run's prediction is outside its tolerance, where the cause is known.
RESIDUALS = [
    Residual(lambda run: run["quantization"] == "int8",
             "LLM.int8 on CUDA also keeps, for backward, the input columns that hold an outlier (|x| >= 6, "
             "its threshold) in full precision; which columns do depends on the values, which neither "
             "predictor has (fake tensors carry none). Random-init weights put outliers into the wide "
             "down_proj input of the larger model; pretrained weights concentrate them in a few feature "
             "dimensions. The gap sits in the activations, as the category table shows."),
]


def _error(predicted, measured) -> float | None:
    if predicted is None or measured is None or any(isinstance(v, float) and math.isnan(v)
                                                    for v in (predicted, measured)) or not measured:
        return None
    return predicted / measured - 1


def prediction_errors(runs: pd.DataFrame, predictions: pd.DataFrame, device_type: str = "cuda") -> pd.DataFrame:
    """One row per finished run on the device type that has a prediction of its configuration on the
    same code path (on a CPU, what is measured is the tracked tensor bytes)."""
    measured = runs[(runs["device_type"] == device_type) & (runs["status"] == "ok")]
    same_path = predictions[predictions["device_type"] == device_type]
    rows = []
    for _, run in measured.iterrows():
        row = run.to_dict()
        matching = same_path
        for key in PREDICTION_KEYS:
            matching = matching[matching[key] == run[key]]
        if matching.empty:
            continue
        for method in TOLERANCES:
            chosen = matching[matching["method"] == method]
            prediction = chosen.iloc[0] if len(chosen) else None
            row[f"{method}_total"] = None if prediction is None else prediction["total_bytes"]
            row[f"{method}_error"] = _error(row[f"{method}_total"], run["peak_allocated"])
            for category in CATEGORIES:
                value = None if prediction is None else prediction[f"peak_{category}"]
                row[f"{method}_{category}"] = value
        outside = [method for method, tolerance in TOLERANCES.items()
                   if row[f"{method}_error"] is not None and abs(row[f"{method}_error"]) > tolerance]
        reasons = [residual.reason for residual in RESIDUALS if outside and residual.applies(run)]
        row["outside"] = outside
        row["reason"] = " ".join(reasons) if reasons else ("not explained yet" if outside else "")
        rows.append(row)
    return pd.DataFrame(rows)


def summary(errors: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Largest and median absolute error per method, over the compared runs."""
    result = {}
    for method in TOLERANCES:
        values = errors[f"{method}_error"].dropna().abs() if len(errors) else pd.Series(dtype=float)
        if len(values):
            result[method] = {"runs": int(len(values)), "median": float(values.median()), "max": float(values.max()),
                              "within": int((values <= TOLERANCES[method]).sum())}
    return result
