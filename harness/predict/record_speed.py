"""Speed predicted for every measured CUDA run, on the card it ran on: what the report checks the speed
model against (harness.report.speed).

For each run record whose status is ok and whose device is a card of harness.cards, the run's own
configuration (its record's `config`, the device aside) is simulated with the kernel recorder on,
and the prediction, with its `speed`, is written to results/predictions/speed/<device slug>/<record
file name>. A step with Liger's kernels runs the simulation's stand-ins for them, which record the Triton
kernels they stand for (harness.predict.liger); a family whose Liger patch has no stand-in is costed as its
eager step (its memory figures are then the eager step's too: this prediction is for speed), labelled
`LIGER_NOTE`. Where the simulation cannot run the step at all
(harness.techniques.NotSimulated) the analytic fallback answers, labelled `analytic`. `harness predict --speed-of-runs`
runs this.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from harness import env, schema
from harness.cards import card_in_device_name
from harness.predict.prediction import PREDICTOR_MODULES


def speed_prediction_path(out: Path, record_path: Path) -> Path:
    return Path(out) / schema.PREDICTIONS_FOLDER / schema.SPEED_FOLDER / record_path.parent.name / record_path.name


def measured_cuda_runs(results: Path) -> list[tuple[Path, dict, str]]:
    """(path, record, card) of every ok run on a card the catalogue knows."""
    runs = []
    for path in schema.find_records(results):
        try:
            record = schema.to_dict(schema.read(path, kind="run"))
        except schema.RecordError as error:
            print(f"skipped: {error}", file=sys.stderr)
            continue
        device = (record.get("environment") or {}).get("device_name") or ""
        gpu = card_in_device_name(device)
        if record.get("status") == "ok" and gpu and (record.get("throughput") or {}).get("tokens_per_s"):
            runs.append((path, record, gpu))
    return runs


def predict_run(record: dict, gpu: str) -> schema.Prediction:
    from harness.config import experiment_of, resolve_technique
    from harness.predict.simulate import simulate_step
    from harness.predict.kernels import KernelRecorder
    from harness.predict.speed import LIGER_NOTE, analytic_speed, kernel_speed, without_liger
    from harness.step.models import resolve_source
    from harness.techniques import NotSimulated

    cfg = experiment_of({**record["config"], "device": "cpu"})
    technique = resolve_technique(cfg)
    source = resolve_source(cfg.model, cfg.trust_remote_code, "cuda")
    seq_len, batch = cfg.seq_len, cfg.micro_batch
    started = time.perf_counter()
    recorder = KernelRecorder()
    notes = []
    try:
        try:
            result = simulate_step(source, technique, cfg, seq_len, batch, "cuda", recorder=recorder,
                                   random_weights=source.random_init)
        except NotSimulated:
            if without_liger(cfg) is None:
                raise
            # a family whose Liger patch the simulation does not stand in for: its eager step, labelled
            cfg, notes, recorder = without_liger(cfg), [LIGER_NOTE], KernelRecorder()
            result = simulate_step(source, technique, cfg, seq_len, batch, "cuda", recorder=recorder,
                                   random_weights=source.random_init)
        result["speed"] = kernel_speed(recorder.kernels, seq_len * batch * cfg.grad_accum, gpu)
    except NotSimulated as error:
        from harness.predict.analytic import predict as analytic_predict

        result = analytic_predict(source.config, technique, cfg, seq_len, batch, "cuda", source.random_init)
        result["speed"] = {**analytic_speed(source.config, technique, seq_len, batch, cfg.grad_accum, gpu,
                                            parameters=result["parameters"],
                                            gradient_checkpointing=cfg.gradient_checkpointing),
                           "why": str(error)}
    if cfg.compile:
        notes.append("compiled step costed as the eager one")
    if notes:
        result["speed"]["note"] = "; ".join(notes)
    result["seconds"] = time.perf_counter() - started
    return schema.from_dict({
        "kind": schema.Prediction.KIND, "experiment": record["config"].get("name", record["experiment"]),
        "model": cfg.model, "seq_len": seq_len, "micro_batch": batch, "grad_accum": cfg.grad_accum,
        "gradient_checkpointing": cfg.gradient_checkpointing, "world_size": cfg.world_size,
        "technique": {k: v for k, v in dataclasses.asdict(technique).items() if k != "summary"},
        "versions": env.software_versions(), "predictor": env.code_digest(PREDICTOR_MODULES), **result,
        "device_type": "cuda"}, "<speed prediction>")


def predict_runs(results: Path, out: Path, force: bool = False) -> list[Path]:
    """Write the speed prediction of every measured CUDA run (skipping those already made by this code from
    the micro-benchmark file as it is now)."""
    from harness.predict.speed import is_current

    written = []
    predictor = env.code_digest(PREDICTOR_MODULES)
    for path, record, gpu in measured_cuda_runs(results):
        target = speed_prediction_path(out, path)
        if not force and target.exists():
            try:
                saved = schema.read(target, kind="prediction")
                if saved.predictor == predictor and is_current(saved.speed):
                    continue
            except schema.RecordError:
                pass
        try:
            prediction = predict_run(record, gpu)
        except Exception as error:  # one run's failure must not stop the others; it is reported
            print(f"{path}: not predicted ({type(error).__name__}: {error})", file=sys.stderr)
            continue
        schema.write(target, prediction)
        speed = prediction.speed
        print(f"{path.name}: {speed['method']} {speed['tokens_per_s']:,.0f} tokens/s predicted, "
              f"{record['throughput']['tokens_per_s']:,.0f} measured ({prediction.seconds:.0f} s)", flush=True)
        written.append(target)
    return written
