"""How long a run takes on a GPU, before it runs: the arithmetic of a time-budgeted plan.

GPU time is often lent in short windows, so `harness bench --time-budget` starts no run
whose estimate exceeds what is left. An estimate is the sum of
- a fixed start-up: a fresh interpreter, imports, the CUDA context, batches from the cache;
- the model's build: every parameter materialised (and quantized) on the device;
- every step's matmul FLOPs (harness.measure.throughput's count, with checkpointing's recomputed
  forward) at an assumed sustained throughput for the compute dtype, lower where
  bitsandbytes dequantizes the base in every matmul; the tracked step counts several times,
  as counting every tensor slows every operator;
- what makes the first steps slow: GaLore's SVD of every projected matrix (the first step and
  every `galore_update_proj_gap` steps), and torch.compile's compilation before the first step.
The figures are assumptions for an H100/H200-class card, on the safe side; a run records
its real duration (`duration_s`), so they can be checked against the records. On one H200
the cells of the evidence plan took 15 to 33 s each (7B builds in seconds; the start-up
and the tracked step dominate), which the constants below follow with some margin.

Torch-free: a dry run on a laptop prints the same plan the GPU machine will run.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.config import ResolvedConfig
from harness.measure.throughput import model_flops_per_token
from harness.predict.analytic import shape_of

START_SECONDS = 20.0
# Seconds to build a billion parameters of an unquantized base. A quantized base's build, and the share of
# the sustained throughput left to its products, are its descriptor's (harness.blocks.quantizations).
BUILD_SECONDS_PER_BILLION = 1.0
# Sustained FLOP/s by compute dtype (about a third of an H100's dense peak; fp32 without TF32).
SUSTAINED_FLOPS = {"bf16": 300e12, "fp16": 300e12, "fp32": 40e12}
TRACKED_STEP_COST = 4  # the tracked step, in ordinary steps
CHECKPOINTING_FLOPS = 4 / 3  # one more forward in a forward + backward of three forwards
# torch.compile before the first step: Dynamo traces and Inductor generates and compiles kernels for
# the forward and the backward of every decoder layer (a whole-model compile reuses no layer's code), so
# a fixed start (Inductor's compile workers, Triton's JIT) and a share per layer. An assumption on the
# safe side, to be checked against the records' duration_s like the constants above.
COMPILE_START_SECONDS = 30.0
COMPILE_SECONDS_PER_LAYER = 3.0


@dataclass(frozen=True)
class Estimate:
    seconds: float
    build_s: float
    steps_s: float
    flops: float
    first_steps_s: float = 0.0  # what the first steps do once more (GaLore's SVDs, compilation), in `seconds`
    first_steps: str = ""       # what that is, in words

    def describe(self) -> str:
        first = f", {self.first_steps} {self.first_steps_s:.0f} s" if self.first_steps_s else ""
        return (f"~{self.seconds:.0f} s (build {self.build_s:.0f} s, steps {self.steps_s:.0f} s{first}, "
                f"{self.flops:.2g} FLOPs)")


def estimate_run(config: ResolvedConfig, model_config) -> Estimate:
    """Estimated wall time of one resolved experiment on a GPU (model_config: its transformers config)."""
    run, technique = config.experiment, config.technique
    parameters = shape_of(model_config).parameters()["total"]
    quantization = QUANTIZATIONS[technique.quantization]
    per_billion = quantization.build_seconds_per_billion if quantization else BUILD_SECONDS_PER_BILLION
    build_s = per_billion * parameters / 1e9
    tokens = run.seq_len * run.micro_batch * run.grad_accum
    per_token = model_flops_per_token(model_config, run.seq_len, technique.adapter == "none")
    if run.gradient_checkpointing:
        per_token *= CHECKPOINTING_FLOPS
    steps = run.warmup_steps + run.steps + TRACKED_STEP_COST
    flops = per_token * tokens * steps
    if run.eval_every:  # held-out forwards: a third of a step's FLOPs per sequence
        evaluations = run.steps // run.eval_every + 2
        flops += per_token / 3 * run.seq_len * run.eval_sequences * evaluations
    share = quantization.speed_share if quantization else 1.0
    steps_s = flops / (SUSTAINED_FLOPS[technique.compute_dtype] * share)
    first = first_steps(config, model_config)
    first_s = sum(first.values())
    return Estimate(START_SECONDS + build_s + steps_s + first_s, build_s, steps_s, flops, first_s,
                    " and ".join(first))


def first_steps(config: ResolvedConfig, model_config) -> dict[str, float]:
    """Seconds the first steps take beyond their FLOPs, by cause: {words: seconds} (empty for most runs)."""
    first, shape = {}, shape_of(model_config)
    optimizer_first = OPTIMIZERS[config.technique.optimizer].first_steps  # GaLore's SVDs
    if optimizer_first:
        words, seconds = optimizer_first
        first[words] = seconds(config.experiment, list(shape.linears().values()))
    if config.experiment.compile:
        first["compilation"] = COMPILE_START_SECONDS + COMPILE_SECONDS_PER_LAYER * shape.layers
    return first
