"""How close the memory predictions come to what a GPU measured, per run and per memory category.

The predictors must pass this check: the simulation within 3% and the analytic formula within
10% of the allocator's peak (torch.cuda.max_memory_allocated). A run outside gets the reason its
building blocks' descriptors give (harness.blocks), or is flagged as unexplained. Beside the allocator's
peak, each row shows what no tensor-counting predictor sees: the allocator's cache (reserved - allocated),
the CUDA context (NVML device-used before loading) and the whole device's use.
"""

from __future__ import annotations

import math

import pandas as pd

from harness.blocks.quantizations import QUANTIZATIONS
from harness.report.load import CATEGORIES

TOLERANCES = {"simulated": 0.03, "analytic": 0.10}
PREDICTION_KEYS = ["experiment", "model", "seq_len", "micro_batch", "grad_accum", "world_size"]


def known_misses(run) -> list[str]:
    """Why a run's prediction can miss its measurement, as its building blocks' descriptors say."""
    quantization = QUANTIZATIONS.get(run.get("quantization"))
    return [quantization.prediction_miss] if quantization and quantization.prediction_miss else []


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
        reasons = known_misses(run) if outside else []
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
