"""One run, inside its own process: build, train, measure, write the record.

Started by harness.runner as `python -m harness.worker CONFIG.json RECORD.json`. Whatever
happens, the record says it: `ok`, `oom` (with the phase, step and memory reached) or
`failed` (with the error). Steps: warm-up (untimed), timed steps, then one tracked step
whose tensors are counted by category (untimed, because counting slows every operator).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from harness import records
from harness.budget import CUDA_CONTEXT_ALLOWANCE, budget_cap_bytes
from harness.data import load_batches
from harness.memory import (CudaMeter, TensorTracker, label_gradients, label_model, tracker_phase)
from harness.models import parameter_counts, resolve_source
from harness.techniques import PAGED_OPTIMIZERS, Technique
from harness.throughput import mfu, step_time_stats
from harness.train import Progress, build_training, evaluate, no_phase, train_step

# Packages a technique or data source may need that a machine may lack: their absence makes
# the run `skipped` (with the reason), never a failure.
OPTIONAL_PACKAGES = {"bitsandbytes": "int8/NF4 quantization and 8-bit optimizers",
                     "datasets": "local text files and hub datasets as data"}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_environment(device: torch.device) -> dict:
    environment = {"device_type": device.type, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "versions": records.software_versions(),
                   "git": records.git_state()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        environment.update(device_total_bytes=props.total_memory,
                           cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
        try:
            import pynvml

            pynvml.nvmlInit()
            environment["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            environment["driver"] = None
    environment["device_name"] = records.device_name(device.type)
    return environment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adapter_bytes(model) -> int | None:
    if not hasattr(model, "peft_config"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _memory_reached(device: torch.device, tracker: TensorTracker | None) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return tracker.peak if tracker is not None else None


def run(config: dict, record_path: str | Path) -> dict:
    cfg = SimpleNamespace(**{**config, "lora": SimpleNamespace(**config["lora"]),
                             "optim": SimpleNamespace(**config["optim"]), "data": SimpleNamespace(**config["data"])})
    technique = Technique(**{k: config[k] for k in Technique.__dataclass_fields__})
    record = {"schema_version": records.SCHEMA_VERSION, "status": None, "experiment": cfg.name,
              "model": cfg.model, "config": config, "config_hash": config["config_hash"],
              "started_at": records.now()}
    progress = Progress()
    tracker = None
    device = torch.device("cpu")
    started = time.perf_counter()
    try:
        device = pick_device(cfg.device)
        record["environment"] = environment = describe_environment(device)
        record["fingerprint"] = records.fingerprint(environment)
        torch.manual_seed(cfg.seed)
        cap = budget_cap_bytes(cfg.budget_gb, device.type) if cfg.budget_gb else None
        record["budget"] = _apply_budget(cfg.budget_gb, cap, device, technique)

        source = resolve_source(cfg.model, cfg.trust_remote_code, device.type)
        batches, tokenizer, record["data"] = load_batches(cfg.data, source, cfg.seq_len, cfg.micro_batch,
                                                          cfg.grad_accum, cfg.seed)
        held_out = None
        if cfg.eval_every:
            held_out = load_batches(cfg.data, source, cfg.seq_len, cfg.eval_sequences, 1, cfg.seed,
                                    split=cfg.data.eval_split, tokenizer=tokenizer)[0].step(0, device)[0]

        # CPU: the tracker is the memory meter (always on when a budget must bind).
        on_cpu = device.type == "cpu"
        tracker = TensorTracker(cap if on_cpu else None) if on_cpu else None
        cuda_meter = CudaMeter(device) if device.type == "cuda" else None
        if cuda_meter is not None:
            torch.cuda.reset_peak_memory_stats(device)
            context_bytes = cuda_meter.device_used()
        load_started = time.perf_counter()
        with (tracker or nullcontext()), (cuda_meter.phase("load") if cuda_meter else nullcontext()):
            model, optimizer, scaler = build_training(source, technique, cfg, device)
        load_seconds = time.perf_counter() - load_started
        record["parameters"] = parameter_counts(model)
        record["random_init"] = source.random_init

        budget_binds_on_cpu = on_cpu and cap is not None
        step_phase = cuda_meter.phase if cuda_meter else no_phase
        times: list[float] = []
        total_steps = cfg.warmup_steps + cfg.steps

        def evaluate_held_out(steps_done: int) -> None:  # between steps, never inside a timed one
            loss = evaluate(model, held_out, technique.autocast, cfg.micro_batch)
            progress.evaluations.append({"step": steps_done, "loss": loss})

        if held_out is not None:
            evaluate_held_out(0)
        for step in range(total_steps):
            progress.step = step
            micro_batches = batches.step(step, device)
            with (tracker if budget_binds_on_cpu else nullcontext()):
                phase = (lambda name: tracker_phase(tracker, name)) if budget_binds_on_cpu else step_phase
                _sync(device)
                t0 = time.perf_counter()
                loss = train_step(model, optimizer, micro_batches, technique.autocast, scaler, progress, phase)
                _sync(device)
            if step >= cfg.warmup_steps:
                times.append(time.perf_counter() - t0)
            progress.losses.append(float(loss))
            if held_out is not None and (step + 1) % cfg.eval_every == 0:
                evaluate_held_out(step + 1)

        # The tracked step: count every tensor by category (slow, so never timed).
        progress.step = total_steps
        tracker = tracker or TensorTracker()
        micro_batches = batches.step(total_steps, device)
        with tracker:
            label_model(tracker, model, optimizer)
            tracker.reset_peak()
            loss = train_step(model, optimizer, micro_batches, technique.autocast, scaler, progress,
                              lambda name: tracker_phase(tracker, name),
                              after_backward=lambda: label_gradients(tracker, model))
        progress.losses.append(float(loss))

        tokens_per_step = cfg.micro_batch * cfg.seq_len * cfg.grad_accum
        stats = step_time_stats(times)
        tokens_per_s = tokens_per_step / stats["median"]
        compute_dtype = technique.autocast if technique.autocast != "none" else technique.weights
        record["memory"] = _memory_section(device, tracker, cuda_meter, context_bytes if cuda_meter else None)
        if held_out is not None:  # after the peaks are read: evaluation never counts in them
            evaluate_held_out(total_steps + 1)
        record["throughput"] = {
            "tokens_per_step": tokens_per_step, "step_time_s": stats, "tokens_per_s": tokens_per_s,
            "load_seconds": load_seconds, "timed_steps": len(times), "warmup_steps": cfg.warmup_steps,
            "timing_includes_tracking": budget_binds_on_cpu,
            "mfu": mfu(source.config, cfg.seq_len, tokens_per_s, technique.adapter == "none",
                       environment["device_name"], compute_dtype) if device.type == "cuda" else None,
        }
        record["adapter_bytes_on_disk"] = _adapter_bytes(model)
        record["status"] = "ok"
    except torch.OutOfMemoryError as error:
        record["status"] = "oom"
        record["error"] = {"type": "OutOfMemoryError", "message": str(error).splitlines()[0][:500],
                           "phase": progress.phase, "step": progress.step,
                           "memory_reached_bytes": _memory_reached(device, tracker)}
    except Exception as error:  # any other failure is a result too
        if isinstance(error, ModuleNotFoundError) and error.name in OPTIONAL_PACKAGES:
            # This machine cannot run the technique; another can. Not a failure of the run.
            record["status"] = "skipped"
            record["error"] = {"type": "MissingPackage", "package": error.name, "phase": progress.phase,
                               "message": f"{error.name} is not installed here ({OPTIONAL_PACKAGES[error.name]}); "
                                          "install it to run this experiment"}
        else:
            record["status"] = "failed"
            record["error"] = {"type": type(error).__name__, "message": str(error)[:2000],
                               "phase": progress.phase, "step": progress.step,
                               "traceback": traceback.format_exc()[-4000:]}
    record["loss"] = {"per_step": progress.losses, "final": progress.losses[-1] if progress.losses else None,
                      "warmup_steps": cfg.warmup_steps, "eval": progress.evaluations,
                      "eval_final": progress.evaluations[-1]["loss"] if progress.evaluations else None}
    # Host memory matters where tensors leave the device (paged optimizers) and on CPU runs.
    record["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["finished_at"] = records.now()
    record["duration_s"] = time.perf_counter() - started
    records.write_atomic(record_path, record)
    return record


def _apply_budget(budget_gb, cap, device: torch.device, technique: Technique) -> dict | None:
    if cap is None:
        return None
    budget = {"budget_gb": budget_gb, "cap_bytes": cap}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
        budget["context_allowance_bytes"] = CUDA_CONTEXT_ALLOWANCE
        budget["enforced_by"] = "torch.cuda.set_per_process_memory_fraction"
        if technique.optimizer in PAGED_OPTIMIZERS:
            budget["note"] = ("paged optimizer state lives in CUDA unified memory outside the torch "
                              "allocator: the cap does not bind it; see NVML device-used")
    else:
        budget["enforced_by"] = "tracked tensor bytes (CPU has no allocator cap)"
    return budget


def _memory_section(device, tracker: TensorTracker, cuda_meter, context_bytes) -> dict:
    breakdown = tracker.breakdown_at_peak()
    section = {
        "unit": "bytes",
        "breakdown_at_peak": breakdown,
        "persistent": tracker.totals_by_category(),
        "tracked_step_peak": tracker.peak,
        "tracked_phase_peaks": dict(tracker.phase_peaks),
    }
    if cuda_meter is not None:
        phases = cuda_meter.phases
        section.update(
            source="cuda",
            note="peaks from torch.cuda.max_memory_allocated/reserved per phase; device-used from NVML "
                 "at the end of each phase (includes the CUDA context)",
            peak_allocated=max(p["peak_allocated"] for p in phases.values()),
            peak_reserved=max(p["peak_reserved"] for p in phases.values()),
            peak_device_used=max(p["peak_device_used"] for p in phases.values()) or None,
            device_used_before_load=context_bytes,
            phases=phases)
    else:
        section.update(
            source="cpu-tracked-tensors",
            note="CPU run: live tensor storage bytes counted by a TorchDispatchMode stand in for device "
                 "memory (no allocator cache, no fragmentation, no CUDA context); not a GPU figure",
            peak_allocated=max(tracker.phase_peaks.values()),
            peak_reserved=None, peak_device_used=None,
            phases={name: {"peak_allocated": value} for name, value in tracker.phase_peaks.items()})
    return section


def main() -> None:
    config_path, record_path = sys.argv[1], sys.argv[2]  # "-": the config comes on standard input
    config = json.loads(sys.stdin.read() if config_path == "-" else Path(config_path).read_text())
    record = run(config, record_path)
    sys.exit(0 if record["status"] in records.FINISHED else 1)


if __name__ == "__main__":
    main()
