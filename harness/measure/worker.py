"""One run, inside its own process: build, train, measure, write the record.

Started by harness.lab.runner as `python -m harness.measure.worker CONFIG.json RECORD.json`. Whatever
happens, the record says it: `ok`, `oom` (with the phase, step and memory reached) or
`failed` (with the error). Steps: warm-up (untimed), timed steps, then one tracked step
whose tensors are counted by category (untimed, because counting slows every operator). The
loop that runs them is the experiment's engine (harness.engines); what is measured, in whichever
loop, is harness.measure.session's.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from harness import env, schema
from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.blocks.training import BLOCKS, SHARDINGS
from harness.config import ResolvedConfig
from harness.engines import ENGINES, EngineRun
from harness.engines.arguments import NotMapped
from harness.measure import ranks
from harness.cards import card_bytes
from harness.measure.budget import budget_cap_bytes
from harness.measure.memory import CudaMeter, TensorTracker
from harness.measure.session import Session
from harness.measure.throughput import mfu, step_time_stats
from harness.step.data import DATA_PACKAGE, load_batches
from harness.step.models import parameter_counts, resolve_source
from harness.step.sharding import rank_and_world
from harness.step.train import Progress
from harness.techniques import Technique, cuda_only


def _optional_packages() -> dict[str, str]:
    """Each package a building block, an engine or a data source imports that a machine may lack, as its
    descriptor names it, with what needs it: its absence makes the run `skipped` (with the reason), never
    a failure."""
    users = [*((f"optimizer {name}", optimizer) for name, optimizer in OPTIMIZERS.items()),
             *((f"quantization {name}", quantization) for name, quantization in QUANTIZATIONS.items() if quantization),
             *BLOCKS.items(), *((f"sharding {way}", block) for way, block in SHARDINGS.items()),
             *((f"engine {name}", engine) for name, engine in ENGINES.items())]
    needed: dict[str, list[str]] = {}
    for user, descriptor in users:
        if descriptor.package:
            needed.setdefault(descriptor.package, []).append(user)
    needed.setdefault(DATA_PACKAGE, []).append("local text files and hub datasets as data")
    return {package: ", ".join(names) for package, names in needed.items()}


OPTIONAL_PACKAGES = _optional_packages()


class NotOnThisDevice(Exception):
    """A building block this device cannot run (techniques.cuda_only): the run is skipped, saying why."""


def pick_device(choice: str) -> torch.device:
    if env.resolve_device(choice) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _adapter_bytes(model) -> int | None:
    if not hasattr(model, "peft_config"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, state_dict=_full_trainable_state(model))
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _full_trainable_state(model) -> dict | None:
    """A sharded model's trainable tensors, gathered whole (every rank takes part), for peft to save as
    an unsharded model's; None (peft's own state dict) for a model that is not sharded."""
    from torch.distributed.tensor import DTensor

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = {name: value for name, value in model.state_dict().items() if name in trainable}
    if not any(isinstance(value, DTensor) for value in state.values()):
        return None
    return {name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in state.items()}


def _memory_reached(device: torch.device, tracker: TensorTracker | None) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return tracker.peak if tracker is not None else None


def run(config: dict, record_path: str | Path) -> schema.RunRecord:
    """Run a resolved config (the dict form it crossed processes in, which the record keeps as it came)."""
    resolved = ResolvedConfig.from_dict(config)
    cfg, technique = resolved.experiment, resolved.technique
    record = schema.RunRecord(status="failed", experiment=resolved.name, model=cfg.model, config=config,
                              config_hash=resolved.config_hash, started_at=env.now())
    progress = Progress()
    tracker = None
    device = torch.device("cpu")
    rank, world = rank_and_world()  # torchrun's, whatever happens next: the record's file depends on it
    started = time.perf_counter()
    try:
        device = pick_device(cfg.device)
        needs_cuda = cuda_only(cfg)
        if needs_cuda and device.type != "cuda":
            raise NotOnThisDevice("; ".join(needs_cuda))
        if device.type == "cpu":
            # Code compiled with torch.compile (torchao's optimizer step) runs eager on a CPU: compiling
            # takes longer than the run here, and a CPU's speed is no GPU's anyway.
            torch.compiler.set_stance("force_eager")
        ranks.join(cfg, device)
        record.environment = environment = env.run_environment(device)
        record.fingerprint = env.fingerprint(environment)
        torch.manual_seed(cfg.seed)
        cap = budget_cap_bytes(cfg.budget_gb, device.type, technique) if cfg.budget_gb else None
        record.budget = _apply_budget(cfg.budget_gb, cap, device, technique)

        source = resolve_source(cfg.model, cfg.trust_remote_code, device.type, run_code=True)
        if cfg.trust_remote_code and getattr(source.config, "auto_map", None):
            record.remote_code = {"source": cfg.model, "auto_map": dict(source.config.auto_map)}
        batches, tokenizer, record.data = load_batches(cfg.data, source, cfg.seq_len, cfg.micro_batch,
                                                          cfg.grad_accum, cfg.seed)
        batches = batches.for_rank(rank, world)
        held_out = None
        if cfg.eval_every:
            held_out = load_batches(cfg.data, source, cfg.seq_len, cfg.eval_sequences, 1, cfg.seed,
                                    split=cfg.data.eval_split, tokenizer=tokenizer)[0].step(0, device)[0]

        # CPU: the tracker is the memory meter (always on when a budget must bind).
        on_cpu = device.type == "cpu"
        session = Session(cfg, technique.autocast, device, TensorTracker(cap) if on_cpu else None,
                          CudaMeter(device) if device.type == "cuda" else None, held_out, progress)
        if session.cuda_meter is not None:
            torch.cuda.reset_peak_memory_stats(device)
            context_bytes = session.cuda_meter.device_used()
        engine = EngineRun(cfg, technique, source, batches, tokenizer, device, session)
        try:
            record.engine = ENGINES[cfg.engine].train(engine)
            record.sharded_by = ranks.sharded_by(cfg, technique, source.config, device.type)
        finally:
            session.close()
            tracker = session.tracker  # what an oom reached
            if session.model is not None:
                record.parameters = schema.Parameters(**parameter_counts(session.model))
                record.random_init = source.random_init
        model, cuda_meter, times = session.model, session.cuda_meter, session.times

        tokens_per_step = cfg.micro_batch * cfg.seq_len * cfg.grad_accum
        stats = step_time_stats(times)
        tokens_per_s = tokens_per_step / stats["median"]
        record.memory = _memory_section(device, tracker, cuda_meter, context_bytes if cuda_meter else None)
        if held_out is not None:  # after the peaks are read: evaluation never counts in them
            session.evaluate_held_out(session.steps_in_all)
        record.throughput = schema.Throughput(
            tokens_per_step=tokens_per_step, step_time_s=stats, tokens_per_s=tokens_per_s,
            load_seconds=session.load_seconds, timed_steps=len(times), warmup_steps=cfg.warmup_steps,
            timing_includes_tracking=on_cpu and cap is not None,
            mfu=mfu(source.config, cfg.seq_len, tokens_per_s, technique.adapter == "none",
                    environment["device_name"], technique.compute_dtype) if device.type == "cuda" else None)
        record.adapter_bytes_on_disk = _adapter_bytes(model)
        record.status = "ok"
    except torch.OutOfMemoryError as error:
        record.status = "oom"
        record.error = schema.RunError("OutOfMemoryError", str(error).splitlines()[0][:500], progress.phase,
                                       progress.step, memory_reached_bytes=_memory_reached(device, tracker))
    except NotOnThisDevice as error:
        record.status = "skipped"
        record.error = schema.RunError("NotOnThisDevice", f"needs a CUDA device: {error}", progress.phase)
    except NotMapped as error:  # this engine cannot express the experiment: say why, approximate nothing
        record.status = "skipped"
        record.error = schema.RunError("NotMapped", f"engine {cfg.engine}: {error}", progress.phase)
    except Exception as error:  # any other failure is a result too
        if isinstance(error, ModuleNotFoundError) and error.name in OPTIONAL_PACKAGES:
            # This machine cannot run the technique; another can. Not a failure of the run.
            record.status = "skipped"
            record.error = schema.RunError(
                "MissingPackage", f"{error.name} is not installed here ({OPTIONAL_PACKAGES[error.name]}); "
                "install it to run this experiment", progress.phase, package=error.name)
        else:
            record.status = "failed"
            record.error = schema.RunError(type(error).__name__, str(error)[:2000], progress.phase, progress.step,
                                           traceback=traceback.format_exc()[-4000:])
    record.loss = schema.Loss(per_step=progress.losses, final=progress.losses[-1] if progress.losses else None,
                              warmup_steps=cfg.warmup_steps, eval=progress.evaluations,
                              eval_final=progress.evaluations[-1]["loss"] if progress.evaluations else None)
    # Host memory matters where tensors leave the device (paged optimizers) and on CPU runs.
    record.host_peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record.finished_at = env.now()
    record.duration_s = time.perf_counter() - started
    ranks.write(record, record_path, rank, world)
    return record


def _apply_budget(budget_gb, cap, device: torch.device, technique: Technique) -> dict | None:
    if cap is None:
        return None
    budget = {"budget_gb": budget_gb, "card_bytes": card_bytes(budget_gb), "cap_bytes": cap}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
        # the card less what lives outside the allocator (harness.device_memory)
        budget["outside_allocator_bytes"] = budget["card_bytes"] - cap
        budget["enforced_by"] = "torch.cuda.set_per_process_memory_fraction"
        if OPTIMIZERS[technique.optimizer].paged:
            budget["note"] = ("paged optimizer state lives in CUDA unified memory outside the torch "
                              "allocator: the cap does not bind it; see NVML device-used")
    else:
        budget["enforced_by"] = "tracked tensor bytes (CPU has no allocator cap)"
    return budget


def _memory_section(device, tracker: TensorTracker, cuda_meter, context_bytes) -> schema.Memory:
    tracked = dict(unit="bytes", breakdown_at_peak=tracker.breakdown_at_peak(),
                   persistent=tracker.totals_by_category(), tracked_step_peak=tracker.peak,
                   tracked_phase_peaks=dict(tracker.phase_peaks))
    if cuda_meter is not None:
        phases = cuda_meter.phases
        return schema.Memory(
            **tracked, source="cuda",
            note="peaks from torch.cuda.max_memory_allocated/reserved per phase; device-used from NVML "
                 "at the end of each phase (includes the CUDA context)",
            peak_allocated=max(p["peak_allocated"] for p in phases.values()),
            peak_reserved=max(p["peak_reserved"] for p in phases.values()),
            peak_device_used=max(p["peak_device_used"] for p in phases.values()) or None,
            device_used_before_load=context_bytes, host_peak=tracker.host_peak or None,
            phases=phases)
    return schema.Memory(
        **tracked, source="cpu-tracked-tensors",
        note="CPU run: live tensor storage bytes counted by a TorchDispatchMode stand in for device "
             "memory (no allocator cache, no fragmentation, no CUDA context); not a GPU figure",
        peak_allocated=max(tracker.phase_peaks.values()),
        phases={name: {"peak_allocated": value} for name, value in tracker.phase_peaks.items()})


def main() -> None:
    config_path, record_path = sys.argv[1], sys.argv[2]  # "-": the config comes on standard input
    if ranks.under_torchrun():
        ranks.die_with_launcher()
    config = json.loads(sys.stdin.read() if config_path == "-" else Path(config_path).read_text())
    record = run(config, record_path)
    sys.exit(0 if record.status in schema.FINISHED else 1)


if __name__ == "__main__":
    main()
