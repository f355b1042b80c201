"""What the card must hold, predicted against measured: allocated, reserved and device bytes per GPU run.

For every finished CUDA run (status ok) with a prediction of its configuration, one row: the predicted
allocated peak (`total_bytes`), reserved bytes (the caching allocator model, harness.predict.allocator,
or the analytic method's calibrated ratio) and device bytes (reserved plus the context and kernels,
harness.device_memory) beside the record's peak_allocated, peak_reserved and peak_device_used;
and the error the old rule made (allocated + a 0.5 GiB allowance, as the device's use). A row whose run belongs to the subset the device constants were calibrated on says so:
the targets are judged on the others.

Reads only results (run records and predictions); `python -m harness.report.reserved RESULTS PREDICTIONS`
prints the table.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

# The old rule of what a card must hold: the allocated peak and a 0.5 GiB allowance for the CUDA context
# (harness.measure.budget's rule before device bytes were predicted).
OLD_RULE_ALLOWANCE = 512 * 2**20
TARGETS = {"reserved": 0.05, "device": 0.03}  # within 5% of peak_reserved, 3% of peak_device_used
TARGET_SHARE = 0.90
# The runs the outside-allocator constants (and the analytic reserved ratio) were calibrated on
# (harness.device_memory): TinyLlama-1.1B's.
CALIBRATION_MODELS = ("tinyllama-1.1b",)
MATCH_KEYS = ("experiment", "model", "seq_len", "micro_batch", "grad_accum", "gradient_checkpointing")


def _error(predicted, measured) -> float | None:
    return None if predicted is None or not measured else predicted / measured - 1


def _run_key(record: dict) -> tuple:
    config = record.get("config") or {}
    return (config.get("name", record.get("experiment")), record.get("model"), config.get("seq_len"),
            config.get("micro_batch"), config.get("grad_accum", 1), config.get("gradient_checkpointing", False))


def _prediction_key(prediction: dict) -> tuple:
    return tuple(prediction.get(key) for key in MATCH_KEYS)


def check_rows(records: list[dict], predictions: list[dict]) -> list[dict]:
    """One row per ok CUDA run with a CUDA prediction of its configuration (simulated preferred)."""
    by_key: dict[tuple, dict] = {}
    for prediction in predictions:
        if prediction.get("device_type") != "cuda" or prediction.get("reserved_bytes") is None:
            continue
        key = _prediction_key(prediction)
        if key not in by_key or (prediction.get("method") == "simulated" != by_key[key].get("method")):
            by_key[key] = prediction
    rows = []
    for record in records:
        memory = record.get("memory") or {}
        if record.get("status") != "ok" or memory.get("source") != "cuda" or not memory.get("peak_reserved"):
            continue
        prediction = by_key.get(_run_key(record))
        if prediction is None:
            continue
        measured = {"allocated": memory["peak_allocated"], "reserved": memory["peak_reserved"],
                    "device": memory.get("peak_device_used")}
        predicted = {"allocated": prediction["total_bytes"], "reserved": prediction["reserved_bytes"],
                     "device": prediction.get("device_bytes")}
        # a budget run is capped: its allocator freed its cache and retried where the cap was reached, so it
        # is compared with the replay under the same cap, where the prediction has one
        capped = prediction.get("budget_replay") or {}
        under_cap = bool(capped) and capped.get("cap_bytes") == (record.get("budget") or {}).get("cap_bytes")
        if under_cap and not capped.get("oom"):
            outside = (predicted["device"] or 0) - predicted["reserved"]
            predicted["reserved"] = capped["peak_reserved"]
            predicted["device"] = capped["peak_reserved"] + outside if predicted["device"] is not None else None
        old_rule = measured["allocated"] + OLD_RULE_ALLOWANCE
        rows.append({
            "run": record.get("file") or record.get("_file") or f"{record.get('experiment')}@{record.get('model')}",
            "experiment": _run_key(record)[0], "model": record.get("model"),
            "seq_len": _run_key(record)[2], "micro_batch": _run_key(record)[3],
            "method": prediction.get("method"), "allocator": prediction.get("allocator"), "under_cap": under_cap,
            "calibration": record.get("model") in CALIBRATION_MODELS,
            **{f"predicted_{k}": v for k, v in predicted.items()}, **{f"measured_{k}": v for k, v in measured.items()},
            **{f"{k}_error": _error(predicted[k], measured[k]) for k in measured},
            "old_rule_bytes": old_rule, "old_rule_device_error": _error(old_rule, measured["device"]),
        })
    return rows


_OOM_FIGURES = {"requested": r"Tried to allocate ([0-9.]+) (GiB|MiB)",
                "allocated": r"([0-9.]+) (GiB|MiB) is allocated by PyTorch",
                "unusable": r"([0-9.]+) (GiB|MiB) is reserved by PyTorch but unallocated"}


def _oom_figures(message: str) -> dict[str, int | None]:
    """The figures torch's OutOfMemoryError states (rounded to 0.01 GiB by torch's format_size)."""
    found = {}
    for name, pattern in _OOM_FIGURES.items():
        match = re.search(pattern, message or "")
        found[name] = None if match is None else int(float(match[1]) * (2**30 if match[2] == "GiB" else 2**20))
    return found


def oom_rows(records: list[dict], predictions: list[dict]) -> list[dict]:
    """Budget runs that ran out of memory beside the allocator replayed under the same cap: whether it runs
    out too, and the request it fails on, what was allocated and what was reserved but unusable."""
    by_key = {_prediction_key(p): p for p in predictions if p.get("budget_replay")}
    rows = []
    for record in records:
        budget = record.get("budget") or {}
        prediction = by_key.get(_run_key(record))
        if record.get("status") != "oom" or prediction is None or not budget.get("cap_bytes"):
            continue
        replay = prediction["budget_replay"]
        if replay.get("cap_bytes") != budget["cap_bytes"]:
            continue
        measured = _oom_figures((record.get("error") or {}).get("message", ""))
        oom = replay.get("oom")
        predicted = {"requested": oom and oom["requested"], "allocated": oom and oom["allocated"],
                     "unusable": oom and oom["reserved"] - oom["allocated"]}
        rows.append({"run": record.get("file") or record.get("_file"), "cap_bytes": budget["cap_bytes"],
                     "predicted_oom": bool(oom),
                     **{f"predicted_{k}": v for k, v in predicted.items()},
                     **{f"measured_{k}": v for k, v in measured.items()}})
    return rows


def summary(rows: list[dict]) -> dict:
    """Share of rows within each target, on the check rows (not calibration) and on all."""
    result = {}
    for subset, chosen in (("check", [r for r in rows if not r["calibration"]]), ("all", rows)):
        entry = {"rows": len(chosen)}
        for what, tolerance in TARGETS.items():
            errors = [r[f"{what}_error"] for r in chosen if r[f"{what}_error"] is not None]
            entry[f"{what}_within"] = sum(abs(e) <= tolerance for e in errors)
            entry[f"{what}_share"] = entry[f"{what}_within"] / len(errors) if errors else None
            entry[f"{what}_median_abs_error"] = statistics.median(abs(e) for e in errors) if errors else None
        old = [r["old_rule_device_error"] for r in chosen if r["old_rule_device_error"] is not None]
        entry["old_rule_device_within"] = sum(abs(e) <= TARGETS["device"] for e in old)
        entry["old_rule_median_device_error"] = statistics.median(old) if old else None
        entry["meets_target"] = all((entry[f"{what}_share"] or 0) >= TARGET_SHARE for what in TARGETS)
        result[subset] = entry
    return result


def markdown(rows: list[dict]) -> str:
    gib = 2**30

    def cell(value, percent=False):
        if value is None:
            return ""
        return f"{value * 100:+.1f}%" if percent else f"{value / gib:.2f}"
    head = ("| run | method | calibration | alloc pred | alloc meas | reserved pred | reserved meas | err "
            "| device pred | device meas | err | old rule (alloc+0.5 GiB) err |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['run']}{' (under its cap)' if r['under_cap'] else ''} | {r['method']} | {'yes' if r['calibration'] else ''} "
                     f"| {cell(r['predicted_allocated'])} | {cell(r['measured_allocated'])} "
                     f"| {cell(r['predicted_reserved'])} | {cell(r['measured_reserved'])} | {cell(r['reserved_error'], True)} "
                     f"| {cell(r['predicted_device'])} | {cell(r['measured_device'])} | {cell(r['device_error'], True)} "
                     f"| {cell(r['old_rule_device_error'], True)} |")
    return "\n".join(lines)


def table(rows: list[dict]):
    """The rows as the report's table (harness.report.tables.Table)."""
    from harness.report.tables import Cell, Table

    def gib(value) -> Cell:
        return Cell("" if value is None else f"{value / 2**30:.2f}")

    def percent(value) -> Cell:
        return Cell("" if value is None else f"{value * 100:+.1f}%")
    lines = [[Cell(r["run"], ("calibration run; " if r["calibration"] else "")
                   + (f"{r['method']}" + (", under its cap" if r["under_cap"] else ""))),
              gib(r["predicted_allocated"]), gib(r["measured_allocated"]),
              gib(r["predicted_reserved"]), gib(r["measured_reserved"]), percent(r["reserved_error"]),
              gib(r["predicted_device"]), gib(r["measured_device"]), percent(r["device_error"]),
              percent(r["old_rule_device_error"])] for r in rows]
    return Table(["run", "allocated, predicted (GiB)", "measured", "reserved, predicted", "measured", "error",
                  "device, predicted", "measured (NVML)", "error", "old rule's error (allocated + 0.5 GiB)"],
                 lines, numeric=set(range(1, 10)),
                 note=("Predicted: the simulation's tensor peak, the caching allocator replayed over its step "
                       "(reserved) and the CUDA context, kernels and unified memory beside it (device); analytic where the step "
                       "cannot be simulated. Calibration runs: the TinyLlama runs the device constants were fitted on."))


def text(rows: list[dict]) -> str:
    """One sentence of where the predictions stand against the targets."""
    result = summary(rows)["check"]
    if not result["rows"]:
        return "No run outside the calibration subset has a prediction with reserved bytes."
    return (f"Outside the calibration subset ({result['rows']} runs): reserved within 5% of the allocator's peak "
            f"for {result['reserved_within']}, device bytes within 3% of NVML's device-used for "
            f"{result['device_within']} (target: 90% each); the old rule (allocated + 0.5 GiB) is within 3% "
            f"for {result['old_rule_device_within']}, its median error {result['old_rule_median_device_error'] * 100:+.1f}%.")


def _read_json(folder: Path, pattern: str) -> list[dict]:
    found = []
    for path in sorted(folder.rglob(pattern)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append({**data, "file": path.name})
    return found


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m harness.report.reserved RUN_RECORDS_DIR PREDICTIONS_DIR")
    records = [r for r in _read_json(Path(argv[0]), "*.json") if r.get("status")]
    predictions = [p for p in _read_json(Path(argv[1]), "*.json") if p.get("kind") == "prediction"]
    rows = check_rows(records, predictions)
    print(markdown(rows))
    print(json.dumps(summary(rows), indent=1))
    for row in oom_rows(records, predictions):
        print(oom_sentence(row))


def oom_sentence(row: dict) -> str:
    """A budget run that ran out of memory against the allocator replayed under its cap, in one sentence."""
    return (f"{row['run']} ran out of memory under its cap of {row['cap_bytes'] / 2**30:.2f} GiB; the simulated step, "
            f"the caching allocator replayed under the same cap, {'runs out' if row['predicted_oom'] else 'does not run out'}"
            + ("" if not row["predicted_oom"] else ": " + ", ".join(
                f"{k} predicted {(row['predicted_' + k] or 0) / 2**30:.2f} GiB, measured "
                f"{(row['measured_' + k] or 0) / 2**30:.2f} GiB" for k in _OOM_FIGURES)) + ".")


if __name__ == "__main__":
    main(sys.argv[1:])
