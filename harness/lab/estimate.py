"""How long a run takes on a GPU, before it runs: the arithmetic of a time-budgeted plan.

GPU time is often lent in short windows, so `harness bench --time-budget` starts no run
whose estimate exceeds what is left. An estimate is the sum of
- a fixed start-up: a fresh interpreter, imports, the CUDA context, batches from the cache;
- the model's build: every parameter materialised (and quantized) on the device;
- every step's matmul FLOPs (harness.measure.throughput's count, with checkpointing's recomputed
  forward) at an assumed sustained throughput for the compute dtype, lower where
  bitsandbytes dequantizes the base in every matmul; the tracked step counts several times,
  as counting every tensor slows every operator.
The figures are assumptions for an H100/H200-class card, on the safe side; a run records
its real duration (`duration_s`), so they can be checked against the records. On one H200
the cells of the evidence plan took 15 to 33 s each (7B builds in seconds; the start-up
and the tracked step dominate), which the constants below follow with some margin.

Torch-free: a dry run on a laptop prints the same plan the GPU machine will run.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import ResolvedConfig
from harness.measure.throughput import model_flops_per_token
from harness.predict.analytic import shape_of

START_SECONDS = 20.0
BUILD_SECONDS_PER_BILLION = {"none": 1.0, "int8": 1.5, "nf4": 1.5}
# Sustained FLOP/s by compute dtype (about a third of an H100's dense peak; fp32 without TF32).
SUSTAINED_FLOPS = {"bf16": 300e12, "fp16": 300e12, "fp32": 40e12}
# Share of that throughput left when bitsandbytes dequantizes every base weight in every matmul.
QUANTIZED_SPEED = {"none": 1.0, "int8": 0.25, "nf4": 0.5}
TRACKED_STEP_COST = 4  # the tracked step, in ordinary steps
CHECKPOINTING_FLOPS = 4 / 3  # one more forward in a forward + backward of three forwards


@dataclass(frozen=True)
class Estimate:
    seconds: float
    build_s: float
    steps_s: float
    flops: float

    def describe(self) -> str:
        return f"~{self.seconds:.0f} s (build {self.build_s:.0f} s, steps {self.steps_s:.0f} s, {self.flops:.2g} FLOPs)"


def estimate_run(config: dict, model_config) -> Estimate:
    """Estimated wall time of one resolved experiment config (its dict form, as a planned run carries it) on a
    GPU (model_config: its transformers config)."""
    resolved = ResolvedConfig.from_dict(config)
    run, technique = resolved.experiment, resolved.technique
    parameters = shape_of(model_config).parameters()["total"]
    build_s = BUILD_SECONDS_PER_BILLION[technique.quantization] * parameters / 1e9
    compute_dtype = technique.autocast if technique.autocast != "none" else technique.weights
    tokens = run.seq_len * run.micro_batch * run.grad_accum
    per_token = model_flops_per_token(model_config, run.seq_len, technique.adapter == "none")
    if run.gradient_checkpointing:
        per_token *= CHECKPOINTING_FLOPS
    steps = run.warmup_steps + run.steps + TRACKED_STEP_COST
    flops = per_token * tokens * steps
    if run.eval_every:  # held-out forwards: a third of a step's FLOPs per sequence
        evaluations = run.steps // run.eval_every + 2
        flops += per_token / 3 * run.seq_len * run.eval_sequences * evaluations
    steps_s = flops / (SUSTAINED_FLOPS[compute_dtype] * QUANTIZED_SPEED[technique.quantization])
    return Estimate(START_SECONDS + build_s + steps_s, build_s, steps_s, flops)


def parse_duration(text: str) -> float:
    """Seconds (positive) from '11m', '90s', '1h', '1m30s' or a plain number of seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    value = str(text).strip().lower()
    total, number = 0.0, ""
    for char in value:
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            number = "bad"
            break
    try:
        total += float(number) if number else 0.0
    except ValueError:
        total = 0.0
    if total <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 11m, 90s, 1m30s, 600)")
    return total
