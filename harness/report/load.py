"""Read results/ into plain records and pandas frames: runs, predictions, probes, micro-benchmarks.

Only JSON is read; nothing is imported from the code that produced it. A file that cannot be
read is listed in `Results.skipped` with the reason, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

CATEGORIES = ("weights", "quant_constants", "gradients", "optimizer_state", "activations", "other")
PERSISTENT = ("weights", "quant_constants", "gradients", "optimizer_state")
NOT_RUN_FOLDERS = {"logs", "predictions", "probes", "microbench", "base", "attempts", ".locks"}


@dataclass
class Results:
    root: Path
    records: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    probes: dict[str, dict] = field(default_factory=dict)
    microbench: list[dict] = field(default_factory=list)  # {"file", "device", "data"}
    bases: list[dict] = field(default_factory=list)  # pretraining records of the lab's own base models
    # Attempts that measured nothing, kept beside a cell's ok/oom record: {record file: count}.
    attempts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _read_json(path: Path, skipped: list[str], root: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        skipped.append(f"{path.relative_to(root)}: {type(error).__name__}: {error}")
        return None
    if not isinstance(data, dict):
        skipped.append(f"{path.relative_to(root)}: not a JSON object")
        return None
    return data


def load_results(root: str | Path) -> Results:
    root = Path(root)
    results = Results(root=root)
    if not root.is_dir():
        return results
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_RUN_FOLDERS):
        for path in sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")):
            record = _read_json(path, results.skipped, root)
            if record is None:
                continue
            if "status" not in record or "experiment" not in record:
                results.skipped.append(f"{path.relative_to(root)}: not a run record")
                continue
            record["_file"] = str(path.relative_to(root))
            record["_slug"] = folder.name
            results.records.append(record)
    for path in sorted((root / "attempts").glob("*/*.json")):  # <slug>/<record stem>.<attempt id>.json
        key = f"{path.parent.name}/{path.name.rsplit('.', 2)[0]}.json"
        results.attempts[key] = results.attempts.get(key, 0) + 1
    for record in results.records:
        record["_attempts"] = results.attempts.get(record["_file"], 0)
    for path in sorted((root / "predictions").glob("*.json")):
        prediction = _read_json(path, results.skipped, root)
        if prediction is not None and prediction.get("kind") == "prediction":
            prediction["_file"] = str(path.relative_to(root))
            results.predictions.append(prediction)
    for path in sorted((root / "probes").glob("*.json")):
        probe = _read_json(path, results.skipped, root)
        if probe is not None and probe.get("kind") == "probe" and probe.get("probe"):
            probe["_file"] = str(path.relative_to(root))
            results.probes[probe["probe"]] = probe
    for path in sorted((root / "base").glob("*.json")):
        base = _read_json(path, results.skipped, root)
        if base is not None and base.get("kind") == "base":
            base["_file"] = str(path.relative_to(root))
            results.bases.append(base)
    for path in sorted((root / "microbench").glob("*.json")):
        data = _read_json(path, results.skipped, root)
        if data is None or not isinstance(data.get("benchmarks"), list):
            continue
        devices = sorted({str(b.get("extra_info", {}).get("device")) for b in data["benchmarks"]})
        results.microbench.append({"file": str(path.relative_to(root)), "device": ", ".join(devices), "data": data})
    return results


def _get(data: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return default
        data = data[key]
    return data


def is_gpu_record(record: dict) -> bool:
    """Measured GPU evidence: a CUDA run (an OOM record may have no memory section)."""
    return _get(record, "environment", "device_type") == "cuda" or _get(record, "memory", "source") == "cuda"


def device_label(record: dict) -> str:
    name = _get(record, "environment", "device_name") or record.get("_slug", "?")
    return name if is_gpu_record(record) else f"{name}, tracked tensor bytes"


def run_row(record: dict) -> dict:
    config = record.get("config") or {}
    memory = record.get("memory") or {}
    throughput = record.get("throughput") or {}
    row = {
        "file": record.get("_file"), "device_slug": record.get("_slug"),
        "device_type": _get(record, "environment", "device_type") or ("cuda" if is_gpu_record(record) else "cpu"),
        "device_name": _get(record, "environment", "device_name") or record.get("_slug"),
        "memory_source": memory.get("source"),
        "experiment": record.get("experiment"), "model": record.get("model"),
        "technique": config.get("technique"),
        "seq_len": config.get("seq_len"), "micro_batch": config.get("micro_batch"),
        "grad_accum": config.get("grad_accum"), "gradient_checkpointing": config.get("gradient_checkpointing"),
        "steps": config.get("steps"),
        "budget_gb": _get(record, "budget", "budget_gb", default=config.get("budget_gb")),
        "status": record.get("status"),
        "peak_allocated": memory.get("peak_allocated"), "peak_reserved": memory.get("peak_reserved"),
        "peak_device_used": memory.get("peak_device_used"),
        "device_used_before_load": memory.get("device_used_before_load"),
        "tracked_step_peak": memory.get("tracked_step_peak"),
        "quantization": config.get("quantization"),
        "shared_gpu": record.get("shared_gpu"),
        "failed_attempts": record.get("_attempts", 0),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "mfu": _get(throughput, "mfu", "mfu"),
        "final_loss": _get(record, "loss", "final"), "eval_final": _get(record, "loss", "eval_final"),
        "trainable_pct": _get(record, "parameters", "trainable_pct"),
        "parameters_total": _get(record, "parameters", "total"),
        "parameters_trainable": _get(record, "parameters", "trainable"),
        "random_init": record.get("random_init"),
        "error_phase": _get(record, "error", "phase"), "error_type": _get(record, "error", "type"),
        "error_message": _get(record, "error", "message"),
        "memory_reached": _get(record, "error", "memory_reached_bytes"),
        "commit": _get(record, "environment", "git", "commit"), "dirty": _get(record, "environment", "git", "dirty"),
        "started_at": record.get("started_at"),
    }
    return _with_categories(row, memory.get("breakdown_at_peak"), memory.get("persistent"))


def runs_frame(results: Results) -> pd.DataFrame:
    rows = [run_row(r) for r in results.records]
    columns = list(run_row({}).keys())
    return pd.DataFrame(rows, columns=columns)


def prediction_row(prediction: dict) -> dict:
    row = {key: prediction.get(key) for key in ("method", "experiment", "model", "seq_len", "micro_batch",
                                                   "grad_accum", "gradient_checkpointing", "device_type",
                                                   "total_bytes", "seconds")}
    row["file"] = prediction.get("_file")
    row["parameters_total"] = _get(prediction, "parameters", "total")
    row["parameters_trainable"] = _get(prediction, "parameters", "trainable")
    return _with_categories(row, prediction.get("categories"), prediction.get("persistent"))


def _with_categories(row: dict, at_peak: dict | None, persistent: dict | None) -> dict:
    """peak_<category> and persistent_<category> columns (None where absent)."""
    for name in CATEGORIES:
        row[f"peak_{name}"] = _get(at_peak, name)
    for name in PERSISTENT:
        row[f"persistent_{name}"] = _get(persistent, name)
    return row


def predictions_frame(results: Results) -> pd.DataFrame:
    columns = list(prediction_row({}).keys())
    return pd.DataFrame([prediction_row(p) for p in results.predictions], columns=columns)
