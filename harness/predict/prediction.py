"""One prediction of a step's memory: an experiment file at a model, sequence length and micro-batch,
by either method (analytic or simulated), as the record the command line prints or saves and the
searches of harness.predict.solve and harness.predict.gpus compare."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from harness import env, schema
from harness.config import resolve
from harness.imports import source_files
from harness.predict.allocator import SETTINGS as ALLOCATORS

# The source files whose code decides a prediction (this module's and every harness module it imports):
# a saved prediction made by other code is made again.
PREDICTOR_MODULES = source_files(__name__)


def predict(experiment: Path, model: str, seq_len: int, batch: int, method: str,
            device_type: str = "cuda", overrides: dict | None = None, allocator: str = "default",
            cap_bytes: int | None = None, gpu: str | None = None,
            random_weights: bool | None = None) -> schema.Prediction:
    """One prediction for an experiment file at a model, sequence length and micro-batch (and
    any other experiment fields in `overrides`); on CUDA with the reserved and device bytes of the
    caching allocator set as `allocator` says. `cap_bytes`: the simulation also replays the allocator
    under this cap (a budget run's recorded cap; else the experiment's budget_gb gives it), in the
    prediction's `budget_replay`. gpu: a card of harness.cards, whose step time and tokens per second
    the prediction also gives (harness.predict.speed: from the simulated step's kernels; the analytic
    method's from FLOPs alone). random_weights: the step runs on random weights, not trained ones (None: as
    a run of this model does, harness.step.models.ModelSource.random_init)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator: expected one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    from harness.step.models import resolve_source

    config = resolve(experiment, {**(overrides or {}), "model": model, "seq_len": seq_len, "micro_batch": batch,
                                  "device": "cpu"})
    cfg, technique = config.experiment, config.technique
    source = resolve_source(model, cfg.trust_remote_code, device_type)
    random_weights = source.random_init if random_weights is None else random_weights
    started = time.perf_counter()
    if method == "analytic":
        from harness.predict.analytic import predict as analytic_predict

        result = analytic_predict(source.config, technique, cfg, seq_len, batch, device_type, random_weights)
        if device_type == "cuda":
            from harness.device_memory import analytic_device

            reserved, device = analytic_device(result, technique, allocator)
            result.update(reserved_bytes=reserved, device_bytes=device, allocator=allocator)
        if gpu:
            from harness.predict.speed import analytic_speed

            result["speed"] = analytic_speed(source.config, technique, seq_len, batch, cfg.grad_accum, gpu,
                                             parameters=result["parameters"],
                                             gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        from harness.predict.kernels import KernelRecorder
        from harness.predict.simulate import simulate_step

        recorder = KernelRecorder() if gpu else None
        result = simulate_step(source, technique, cfg, seq_len, batch, device_type,
                               expandable_segments=allocator == "expandable_segments", cap_bytes=cap_bytes,
                               recorder=recorder, random_weights=random_weights)
        if gpu:
            from harness.predict.speed import kernel_speed

            result["speed"] = kernel_speed(recorder.kernels, seq_len * batch * cfg.grad_accum, gpu)
    result["seconds"] = time.perf_counter() - started
    return schema.from_dict({
        "kind": schema.Prediction.KIND, "method": method, "experiment": config.name, "model": model,
        "seq_len": seq_len, "micro_batch": batch, "grad_accum": cfg.grad_accum,
        "gradient_checkpointing": cfg.gradient_checkpointing, "world_size": cfg.world_size,
        "technique": {k: v for k, v in dataclasses.asdict(technique).items() if k != "summary"},
        "versions": env.software_versions(), "predictor": env.code_digest(PREDICTOR_MODULES), **result,
        "device_type": device_type}, f"<prediction of {config.name}>")


def fits(prediction: schema.Prediction, card_gb: float) -> bool:
    """Whether a predicted step fits a card of this nominal size (harness.measure.budget.card_bytes): its
    device bytes where predicted (CUDA), else its tensor bytes (a CPU has no allocator or context)."""
    from harness.cards import card_bytes

    held = prediction.device_bytes if prediction.device_bytes is not None else prediction.total_bytes
    return held <= card_bytes(card_gb)
