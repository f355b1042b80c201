"""Read results/ into records and pandas frames: runs, predictions, probes, micro-benchmarks.

Records are read through harness.schema (kind and version checked); nothing is imported
from the code that produced them. A file that cannot be read is listed in `Results.skipped`
with the reason, never fatal. Where one configuration has several records (a base model
pretrained again, on another machine; a rerun under a new commit), the newest speaks for it,
`Results.folded` counts the others and `Results.folded_records` keeps them: a folded run on the
same base is still the reference of a loss comparison (harness.report.loss), and a folded run on the
same machine the reference of a run in another loop (harness.report.engines), whose records are kept one
per machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import schema
from harness.presets import PRESETS
from harness.schema import ADDED_LATER, CATEGORIES, PERSISTENT

LAB_ENGINE = ADDED_LATER[(None, "engine")]  # the lab's own loop, the engine of every earlier record


@dataclass
class Results:
    root: Path
    records: list[dict] = field(default_factory=list)  # runs in the lab's own training loop
    # Runs of the same configurations in another training loop (Trainer, SFTTrainer: harness.engines),
    # compared with the lab's (harness.report.engines) and kept out of every other table and figure.
    engine_records: list[dict] = field(default_factory=list)
    # GPU runs under a caching allocator setting of their own (PYTORCH_CUDA_ALLOC_CONF: `allocator:` in a plan),
    # which only the boundary table reads, beside the fit answers with that setting; every other table and
    # figure is of torch's default allocator, which the predictions replay.
    allocator_records: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    # Speed predicted for each measured run, by its record's file (harness predict --speed-of-runs).
    speed_predictions: dict[str, dict] = field(default_factory=dict)
    probes: dict[str, dict] = field(default_factory=dict)
    microbench: list[dict] = field(default_factory=list)  # {"file", "device", "data"}
    bases: list[dict] = field(default_factory=list)  # pretraining records of the lab's own base models
    fits: dict | None = None  # what fits each card, predicted (harness predict --claims)
    gpus: dict | None = None  # how many GPUs, predicted per rank (harness predict --claims)
    # Attempts that measured nothing, kept beside a cell's ok/oom record: {record file: count}.
    attempts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    folded: int = 0  # older records of a configuration that a newer record of it replaced
    folded_records: list[dict] = field(default_factory=list)  # those records (lab's loop only)


def _read(path: Path, kind: str, skipped: list[str], root: Path) -> dict | None:
    """A record as the report reads it: checked by the schema, every field present."""
    try:
        record = schema.read(path, kind)
    except (OSError, schema.RecordError) as error:
        skipped.append(f"{path.relative_to(root)}: {error}")
        return None
    problems = schema.value_problems(record)
    if problems:  # wrong types, NaN, an unknown status: listed, never rendered as if measured
        skipped.append(f"{path.relative_to(root)}: {'; '.join(problems)[:500]}")
        return None
    data = schema.to_dict(record)
    data["_file"] = str(path.relative_to(root))
    return data


def load_results(root: str | Path) -> Results:
    root = Path(root)
    results = Results(root=root)
    if not root.is_dir():
        return results
    newest: dict[str, dict] = {}
    folded: list[dict] = []
    for path in schema.find_records(root):
        record = _read(path, "run", results.skipped, root)
        if record is None:
            continue
        record["_slug"] = path.parent.name
        key = schema.configuration_key(record, path.parent.name)
        if engine_of(record) != LAB_ENGINE:  # kept one per machine: each is divided by the lab's run on its own
            key += json.dumps(machine(record))
        if allocator_setting(record):  # the same configuration under another allocator setting is another run
            key += json.dumps(allocator_setting(record))
        kept = newest.get(key)
        if kept is not None:  # one configuration measured twice: the newest record speaks for it
            results.folded += 1
            if (kept.get("finished_at") or "") > (record.get("finished_at") or ""):
                folded.append(record)
                continue
            folded.append(kept)
        newest[key] = record
    lab = [r for r in newest.values() if engine_of(r) == LAB_ENGINE]
    results.folded_records = [r for r in folded if engine_of(r) == LAB_ENGINE and not allocator_setting(r)]
    results.records = [r for r in lab if not allocator_setting(r)]
    results.allocator_records = [r for r in lab if allocator_setting(r)]
    results.engine_records = [r for r in newest.values() if engine_of(r) != LAB_ENGINE]
    for path in sorted((root / schema.ATTEMPTS_FOLDER).glob("*/*.json")):  # <slug>/<record stem>.<id>.json
        key = f"{path.parent.name}/{path.name.rsplit('.', 2)[0]}.json"
        results.attempts[key] = results.attempts.get(key, 0) + 1
    for record in results.records + results.engine_records + results.allocator_records:
        record["_attempts"] = results.attempts.get(record["_file"], 0)
    _name_unrecorded_devices(results.records + results.engine_records + results.allocator_records + folded)
    for path in sorted((root / schema.PREDICTIONS_FOLDER).glob("*.json")):
        prediction = _read(path, "prediction", results.skipped, root)
        if prediction is not None:
            results.predictions.append(prediction)
    speed_folder = root / schema.PREDICTIONS_FOLDER / schema.SPEED_FOLDER
    for path in sorted(speed_folder.glob("*/*.json")):  # <device slug>/<record file>
        prediction = _read(path, "prediction", results.skipped, root)
        if prediction is not None:
            results.speed_predictions[str(path.relative_to(speed_folder))] = prediction
    for path in sorted((root / schema.PROBES_FOLDER).glob("*.json")):
        probe = _read(path, "probe", results.skipped, root)
        if probe is not None:
            results.probes[probe["probe"]] = probe
    for path in sorted((root / schema.BASE_FOLDER).glob("*.json")):
        base = _read(path, "base", results.skipped, root)
        if base is not None:
            results.bases.append(base)
    if schema.fit_table_path(root).exists():
        results.fits = _read(schema.fit_table_path(root), "fit_table", results.skipped, root)
    if schema.gpu_table_path(root).exists():
        results.gpus = _read(schema.gpu_table_path(root), "gpu_count_table", results.skipped, root)
    for path in sorted((root / schema.MICROBENCH_FOLDER).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as error:
            results.skipped.append(f"{path.relative_to(root)}: {error}")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            continue
        devices = sorted({str(b.get("extra_info", {}).get("device")) for b in data["benchmarks"]})
        results.microbench.append({"file": str(path.relative_to(root)), "device": ", ".join(devices), "data": data})
    return results


def _name_unrecorded_devices(records: list[dict]) -> None:
    """A record without an environment (the runner's record of a process that died) is named by the device
    the other records of its folder recorded, where they name one alone: `_device_name`."""
    names: dict[str, set[str]] = {}
    for record in records:
        name = _get(record, "environment", "device_name")
        if name:
            names.setdefault(record.get("_slug"), set()).add(name)
    for record in records:
        found = names.get(record.get("_slug"), set())
        if not _get(record, "environment", "device_name") and len(found) == 1:
            record["_device_name"] = next(iter(found))


def device_name(record: dict) -> str | None:
    """The device a run measured on, as its record names it, else as its folder's other records do, else the
    folder's slug."""
    return _get(record, "environment", "device_name") or record.get("_device_name") or record.get("_slug")


def random_init(record: dict) -> bool | None:
    """Whether a run trains random weights. Its record says so once the model is built; a run that died before
    (the runner's record of a killed process) is known by the model its configuration gave: a preset or a
    config file has no weights to load (harness.step.models.ModelSource.random_init); anything else: None."""
    if record.get("random_init") is not None:
        return record["random_init"]
    model = (record.get("config") or {}).get("model")
    if model in PRESETS or str(model).endswith(".json"):
        return True
    return None


def predictions_by_kind(results: Results) -> dict[str, list[dict]]:
    """Every file of predictions, by what it predicts (one noun each, for counts that say what they count)."""
    return {"memory prediction": results.predictions,
            "fit table": [table for table in (results.fits, results.gpus) if table],
            "speed prediction": list(results.speed_predictions.values())}


def count_predictions(results: Results, group, counted=lambda kind, prediction: kind) -> dict:
    """{group(prediction): {counted(kind, prediction): files}} over every file of predictions (predictions_by_kind):
    by default how many of each kind, grouped as the caller groups them."""
    found: dict = {}
    for kind, files in predictions_by_kind(results).items():
        for prediction in files:
            counts = found.setdefault(group(prediction), {})
            key = counted(kind, prediction)
            counts[key] = counts.get(key, 0) + 1
    return found


def allocator_setting(record: dict) -> str | None:
    """The PYTORCH_CUDA_ALLOC_CONF a GPU run trained under (harness.env records it), None for torch's default."""
    return _get(record, "environment", "cuda_alloc_conf") or None


def engine_of(record: dict) -> str:
    """The training loop a run was measured in (records from before engines existed: the lab's)."""
    return (record.get("config") or {}).get("engine") or LAB_ENGINE


def _get(data: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return default
        data = data[key]
    return data


def is_gpu_record(record: dict) -> bool:
    """Measured GPU evidence: a CUDA run (an OOM record may have no memory section, and the record of a
    process that died, written by the runner, no environment: then its configuration's device says)."""
    device_type = (_get(record, "environment", "device_type") or _get(record, "memory", "source")
                   or _get(record, "config", "device"))
    return device_type == "cuda"


def machine(record: dict) -> tuple:
    """What two runs' speeds must share to be divided: the device, and on a CPU the instruction set its
    kernels ran with (one processor under AVX2 emulates bf16, the same under AVX-512 may not)."""
    return (_get(record, "environment", "device_name") or record.get("_slug"),
            None if is_gpu_record(record) else _get(record, "environment", "cpu", "capability"))


def device_label(record: dict) -> str:
    name = device_name(record) or "?"
    return name if is_gpu_record(record) else f"{name}, tracked tensor bytes"


def budget_card_bytes(record: dict) -> int | None:
    """The card a budget run emulated, in bytes. A record says so (`budget.card_bytes`); one written when
    `budget_gb` counted 1e9 bytes and the cap left a 0.5 GiB allowance says its cap and that allowance."""
    budget = record.get("budget") or {}
    if budget.get("card_bytes") is not None:
        return budget["card_bytes"]
    if budget.get("cap_bytes") is not None and budget.get("context_allowance_bytes") is not None:
        return budget["cap_bytes"] + budget["context_allowance_bytes"]
    budget_gb = budget.get("budget_gb", (record.get("config") or {}).get("budget_gb"))
    if budget_gb is None:
        return None
    from harness.cards import card_bytes

    return card_bytes(budget_gb)


def run_row(record: dict) -> dict:
    config = record.get("config") or {}
    memory = record.get("memory") or {}
    throughput = record.get("throughput") or {}
    row = {
        "file": record.get("_file"), "device_slug": record.get("_slug"),
        "device_type": _get(record, "environment", "device_type") or ("cuda" if is_gpu_record(record) else "cpu"),
        "device_name": device_name(record),
        "memory_source": memory.get("source"),
        "experiment": record.get("experiment"), "model": record.get("model"),
        "technique": config.get("technique"), "engine": engine_of(record),
        "seq_len": config.get("seq_len"), "micro_batch": config.get("micro_batch"),
        "grad_accum": config.get("grad_accum"), "gradient_checkpointing": config.get("gradient_checkpointing"),
        "world_size": config.get("world_size", 1), "steps": config.get("steps"),
        "budget_gb": _get(record, "budget", "budget_gb", default=config.get("budget_gb")),
        "budget_card_bytes": budget_card_bytes(record), "budget_cap_bytes": _get(record, "budget", "cap_bytes"),
        "status": record.get("status"),
        "peak_allocated": memory.get("peak_allocated"), "peak_reserved": memory.get("peak_reserved"),
        "peak_device_used": memory.get("peak_device_used"),
        "device_used_before_load": memory.get("device_used_before_load"),
        "tracked_step_peak": memory.get("tracked_step_peak"),
        "quantization": config.get("quantization"),
        "shared_gpu": record.get("shared_gpu"),
        "cuda_alloc_conf": allocator_setting(record),
        "emulated": record.get("emulated"),
        "cpu_capability": _get(record, "environment", "cpu", "capability"),
        "bf16_native": _get(record, "environment", "cpu", "bf16_native"),
        "failed_attempts": record.get("_attempts", 0),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "mfu": _get(throughput, "mfu", "mfu"),
        "final_loss": _get(record, "loss", "final"), "eval_final": _get(record, "loss", "eval_final"),
        "trainable_pct": _get(record, "parameters", "trainable_pct"),
        "parameters_total": _get(record, "parameters", "total"),
        "parameters_trainable": _get(record, "parameters", "trainable"),
        "random_init": random_init(record),
        "error_phase": _get(record, "error", "phase"), "error_step": _get(record, "error", "step"),
        "error_type": _get(record, "error", "type"),
        "error_message": _get(record, "error", "message"),
        "memory_reached": _get(record, "error", "memory_reached_bytes"),
        "commit": _get(record, "environment", "git", "commit"), "dirty": _get(record, "environment", "git", "dirty"),
        "started_at": record.get("started_at"),
    }
    return _with_categories(row, memory.get("breakdown_at_peak"), memory.get("persistent"))


def runs_frame(results: Results, engines: bool = False) -> pd.DataFrame:
    """The lab's own runs, one row each (engines: the runs in other training loops instead)."""
    return records_frame(results.engine_records if engines else results.records)


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Run records, one row each (run_row's columns, also where there are none)."""
    return pd.DataFrame([run_row(r) for r in records], columns=list(run_row({}).keys()))


def prediction_row(prediction: dict) -> dict:
    row = {key: prediction.get(key) for key in ("method", "experiment", "model", "seq_len", "micro_batch",
                                                   "grad_accum", "gradient_checkpointing", "device_type",
                                                   "total_bytes", "seconds", "host_bytes", "reserved_bytes",
                                                   "device_bytes", "allocator")}
    row["world_size"] = prediction.get("world_size", 1)  # one rank unless sharded
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


def gpu_measurement(runs: pd.DataFrame, experiment: str, model: str, seq_len: int, micro_batch: int) -> dict:
    """The peak a finished GPU run of the cell measured, and its device: {measured, device} (empty if none)."""
    if not len(runs):
        return {}
    # like with like: a single step (no accumulation) on one GPU with the whole card
    measured = runs[(runs["experiment"] == experiment) & (runs["model"] == model) & (runs["seq_len"] == seq_len)
                    & (runs["micro_batch"] == micro_batch) & (runs["device_type"] == "cuda")
                    & (runs["status"] == "ok") & (runs["grad_accum"].fillna(1) == 1)
                    & (runs["world_size"].fillna(1) == 1) & runs["budget_gb"].isna()]
    if not len(measured):
        return {}
    return {"measured": measured.iloc[0]["peak_allocated"], "device": measured.iloc[0]["device_name"]}
