"""One prediction of a step's memory: an experiment file at a model, sequence length and micro-batch,
by either method (analytic or simulated), as the record the command line prints or saves and the
searches of harness.predict.solve and harness.predict.gpus compare."""

from __future__ import annotations

import time
from pathlib import Path

from harness import env, schema
from harness.config import experiment_of, prepare, resolve_technique
from harness.imports import source_files

# The source files whose code decides a prediction (this module's and every harness module it imports):
# a saved prediction made by other code is made again.
PREDICTOR_MODULES = source_files(__name__)


def predict(experiment: Path, model: str, seq_len: int, batch: int, method: str,
            device_type: str = "cuda", overrides: dict | None = None) -> schema.Prediction:
    """One prediction for an experiment file at a model, sequence length and micro-batch (and
    any other experiment fields in `overrides`)."""
    from harness.step.models import resolve_source
    from harness.techniques import Technique

    config = prepare(experiment, {**(overrides or {}), "model": model, "seq_len": seq_len, "micro_batch": batch,
                                  "device": "cpu"})
    cfg = experiment_of(config)
    technique = resolve_technique(cfg)
    source = resolve_source(model, cfg.trust_remote_code, device_type)
    started = time.perf_counter()
    if method == "analytic":
        from harness.predict.analytic import predict as analytic_predict

        result = analytic_predict(source.config, technique, cfg, seq_len, batch, device_type)
    else:
        from harness.predict.simulate import simulate_step

        result = simulate_step(source, technique, cfg, seq_len, batch, device_type)
    result["seconds"] = time.perf_counter() - started
    return schema.from_dict({
        "kind": schema.Prediction.KIND, "method": method, "experiment": config["name"], "model": model,
        "seq_len": seq_len, "micro_batch": batch, "grad_accum": config["grad_accum"],
        "gradient_checkpointing": config["gradient_checkpointing"], "world_size": config["world_size"],
        "technique": {k: config[k] for k in Technique.__dataclass_fields__ if k != "summary"},
        "versions": env.software_versions(), "predictor": env.code_digest(PREDICTOR_MODULES), **result,
        "device_type": device_type}, f"<prediction of {config['name']}>")


def fits(total_bytes: int, budget_gb: float, device_type: str = "cuda") -> bool:
    """Whether a predicted peak fits what an N GB card leaves to the allocator."""
    from harness.measure.budget import budget_cap_bytes

    return total_bytes <= budget_cap_bytes(budget_gb, device_type)


