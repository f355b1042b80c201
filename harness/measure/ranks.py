"""A cell measured by several processes at once (a sharded run under torchrun): one record from them all.

Every rank joins the process group, runs the same steps on its own slice of each global batch
(harness.step.data's `for_rank`), and measures its own peaks, tracked step included (its collectives
need every rank). Then:

- a rank whose run did not end `ok` writes its record to a file of its own beside the attempt
  (`schema.rank_record_path`) and exits; a failed one exits non-zero, so torchrun stops the
  other ranks, and the runner makes the first such record the cell's, naming the rank;
- otherwise rank 0 gathers every rank's record and writes the cell's: its memory figures are the
  highest over ranks, and `ranks` keeps each rank's own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import statistics
from pathlib import Path

import torch

from harness import env, schema
from harness.step import sharding, zero

# A test's fault: the rank this variable names raises as soon as it has joined, as a rank failing
# mid-run would (its peers are then waiting in a collective). Only the tests set it.
FAIL_RANK_VARIABLE = "HARNESS_FAIL_RANK"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class InjectedFailure(RuntimeError):
    """The failure FAIL_RANK_VARIABLE asks for."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> None:
    """A rank dies with torchrun, which started it in a session of its own: killing torchrun (the runner's
    timeout, or the runner's own death) must not leave ranks behind (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # torchrun was gone before the signal was set
        os._exit(1)


def join(cfg, device: torch.device) -> None:
    """Join the ranks of a sharded run. One rank alone (a sharded run at world size 1, outside torchrun)
    gets a process group of its own, with nobody to meet."""
    rank, world = sharding.rank_and_world()
    if not sharding.is_sharded(cfg):
        return
    if world != cfg.world_size:
        raise RuntimeError(f"world_size {cfg.world_size} but {world} processes run this cell "
                           "(several ranks run under torchrun: harness.lab.runner.worker_command)")
    import torch.distributed as dist

    if not under_torchrun() and not dist.is_initialized():
        # what torchrun would say to one rank (DeepSpeed reads it, whoever made the process group)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(sharding.BACKENDS[device.type], store=dist.HashStore(), rank=0, world_size=1)
    if zero.is_zero(cfg) and device.type == "cpu":
        deepspeed_on_gloo()
    sharding.join_ranks(device)
    if os.environ.get(FAIL_RANK_VARIABLE) == str(rank):
        raise InjectedFailure(f"rank {rank} fails on purpose ({FAIL_RANK_VARIABLE})")


def deepspeed_on_gloo() -> None:
    """DeepSpeed's collectives between CPU ranks through gloo, as DeepSpeed itself falls back where its
    shared-memory all-reduce is not compatible. Its CPU accelerator compiles that op
    (`deepspeed_shm_comm`, with g++ and ninja) the first time a process joins: over a minute on 2 cores, once per
    machine and user. The lab's CPU ranks measure what each rank holds, which does not depend on how fast
    a host's ranks reduce; marked not compatible, the op is neither built nor needed (nor is a compiler)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False  # the dict deepspeed.comm reads, probed once


def sharded_by(cfg, technique, model_config, device_type: str) -> dict | None:
    """Which library sharded the run, and how (the record's `sharded_by`)."""
    if zero.is_zero(cfg):
        described = zero.description(technique, cfg, model_config.hidden_size)
        if device_type == "cpu":
            described["collectives"] = "gloo (DeepSpeed's shared-memory all-reduce for CPU ranks left out)"
        return described
    if cfg.sharding == "fsdp2":
        return {"library": "torch", "version": torch.__version__,
                "method": "FSDP2: torch.distributed.fsdp.fully_shard per decoder layer, then the root"}
    return None


def write(record: schema.RunRecord, record_path, rank: int, world: int) -> None:
    """Write what this rank's record becomes (see the module's docstring), and leave the process group."""
    import torch.distributed as dist

    if world == 1:
        schema.write_or_set_aside(record_path, record, env.cache_dir() / schema.UNSAVED_FOLDER)
    elif record.status != "ok":
        if record.error is not None:
            record.error.rank = rank
        schema.write(schema.rank_record_path(Path(record_path), rank), record)
        return  # no goodbye: the peers may be waiting in a collective, and torchrun stops them
    else:
        records = [None] * world if rank == 0 else None
        dist.gather_object(record, records, dst=0)
        if rank == 0:
            schema.write_or_set_aside(record_path, combine(records), env.cache_dir() / schema.UNSAVED_FOLDER)
    if dist.is_initialized():
        dist.destroy_process_group()


def combine(records: list[schema.RunRecord]) -> schema.RunRecord:
    """The cell's record from every rank's (rank i's at index i), all `ok`."""
    first = records[0]
    return dataclasses.replace(
        first, memory=_highest_memory([r.memory for r in records]),
        throughput=_global_throughput([r.throughput for r in records]),
        loss=_mean_loss([r.loss for r in records]),
        host_peak_rss_bytes=max(r.host_peak_rss_bytes for r in records),
        duration_s=max(r.duration_s for r in records),
        ranks=[_rank_figures(rank, r) for rank, r in enumerate(records)])


def _rank_figures(rank: int, record: schema.RunRecord) -> dict:
    memory = {k: v for k, v in dataclasses.asdict(record.memory).items() if k not in ("unit", "source", "note")}
    return {"rank": rank, "memory": memory, "host_peak_rss_bytes": record.host_peak_rss_bytes,
            "tokens_per_s": record.throughput.tokens_per_s, "step_time_s": record.throughput.step_time_s,
            "final_loss": record.loss.final}


# Memory figures that are peaks: the cell's is the highest over ranks (the one that must fit its card).
_PEAKS = ("peak_allocated", "peak_reserved", "peak_device_used", "device_used_before_load", "host_peak")


def _highest_memory(memories: list[schema.Memory]) -> schema.Memory:
    """Peaks: the highest over ranks, phase by phase. The breakdown and persistent bytes: those of the rank
    with the highest tracked peak, so that they still add up to the cell's tracked peak."""
    binding = max(memories, key=lambda m: m.tracked_step_peak)
    peaks = {name: max((getattr(m, name) for m in memories if getattr(m, name) is not None), default=None)
             for name in _PEAKS}
    phases = {phase: {key: max(m.phases.get(phase, {}).get(key) or 0 for m in memories) for key in figures}
              for phase, figures in binding.phases.items()}
    tracked = {phase: max(m.tracked_phase_peaks.get(phase, 0) for m in memories) for phase in binding.tracked_phase_peaks}
    return dataclasses.replace(binding, **peaks, phases=phases, tracked_phase_peaks=tracked)


def _global_throughput(throughputs: list[schema.Throughput]) -> schema.Throughput:
    """Every rank's tokens in a step, at the pace of the slowest rank (a sharded step ends together)."""
    slowest = max(throughputs, key=lambda t: t.step_time_s["median"])
    tokens = sum(t.tokens_per_step for t in throughputs)
    return dataclasses.replace(slowest, tokens_per_step=tokens, tokens_per_s=tokens / slowest.step_time_s["median"],
                               load_seconds=max(t.load_seconds for t in throughputs))


def _mean_loss(losses: list[schema.Loss]) -> schema.Loss:
    """The global batch's loss: the mean of the ranks' (their slices are the same size). Held-out loss is
    every rank's alike (the same sequences, the same model)."""
    per_step = [statistics.fmean(values) for values in zip(*(loss.per_step for loss in losses))]
    return dataclasses.replace(losses[0], per_step=per_step, final=per_step[-1] if per_step else None)
