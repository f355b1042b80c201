"""Run one experiment in a fresh process and make sure a record comes out of it.

Each run gets its own interpreter, so peak statistics and the CUDA context start clean
and a crash cannot poison the next run. If the process dies without writing its record
(killed, segfault, host out of memory), this side writes a `failed` record for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from harness import records
from harness.base import BASE_SOURCE, base_identity
from harness.config import config_hash, load_experiment, resolved_config

LOG_TAIL_CHARS = 4000


def prepare(path: str | Path, overrides: dict | None = None) -> dict:
    """Validate an experiment file and return its resolved config with its hash (ConfigError if bad)."""
    name, experiment = load_experiment(path, overrides)
    config = resolved_config(name, experiment)
    config["device"] = records.resolve_device(config["device"])  # the hash names the real device
    if config["model"] == BASE_SOURCE:  # which pretrained base: a retrained one is a new configuration
        config["base_checkpoint"] = base_identity(config["device"]) or "not pretrained yet"
    config["config_hash"] = config_hash(config)
    return config


def run_config(config: dict, out_dir: str | Path = "results", repeat: int = 0,
               timeout_s: float | None = None) -> tuple[Path, dict]:
    """Run a resolved config in a child process; returns (record path, record)."""
    out_dir = Path(out_dir)
    path = records.record_path(out_dir, records.device_name(config["device"]), config["name"],
                               config["model"], config["config_hash"], repeat)
    log_path = out_dir / "logs" / path.parent.name / (path.stem + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({**config, "run_id": run_id}, handle)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "harness.worker", handle.name, str(path)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
    finally:
        Path(handle.name).unlink(missing_ok=True)
    record = records.read_record(path) if path.exists() else None
    if record is None or record.get("config", {}).get("run_id") != run_id:
        record = _lost_record(config, returncode, log_path, timeout_s)
        records.write_atomic(path, record)
    return path, record


def _lost_record(config: dict, returncode: int, log_path: Path, timeout_s: float | None) -> dict:
    """The record of a process that ended without writing its own."""
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log_path.exists() else ""
    if returncode < 0:
        how = f"the run's process was killed by signal {-returncode}"
        if -returncode == 9:
            how += " (a time limit, or the host ran out of memory)"
    else:
        how = f"the run's process exited with status {returncode} without writing a record"
    return {"schema_version": records.SCHEMA_VERSION, "status": "failed", "experiment": config["name"],
            "model": config["model"], "config": config, "config_hash": config["config_hash"],
            "finished_at": records.now(),
            "error": {"type": "ProcessDied", "message": how, "returncode": returncode,
                      "timeout_s": timeout_s, "log_tail": tail}}


def summary_line(record: dict) -> str:
    """One line with the headline figures of a record."""
    name = f"{record['experiment']} @ {record['model']}"
    status = record["status"]
    if status == "ok":
        memory = record["memory"]
        return (f"{name}: ok, peak {memory['peak_allocated'] / 2**30:.3f} GiB ({memory['source']}), "
                f"{record['throughput']['tokens_per_s']:.0f} tokens/s, final loss {record['loss']['final']:.4f}")
    error = record.get("error", {})
    if status == "oom":
        reached = error.get("memory_reached_bytes")
        reached_text = f", reached {reached / 2**30:.3f} GiB" if reached else ""
        return f"{name}: OOM in {error.get('phase')} at step {error.get('step')}{reached_text}"
    if status == "skipped":
        return f"{name}: skipped: {error.get('message', '')}"
    return f"{name}: failed: {error.get('type')}: {error.get('message', '')[:200]}"
