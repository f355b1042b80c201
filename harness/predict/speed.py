"""Predicted speed: a training step's time and tokens per second on a card, from the step's own kernels.

The kernels come from the runner's step under fake tensors (harness.predict.kernels). Each is costed
(each benchmark's fastest round, STATISTIC, standing for its kernel):
- a matrix product or attention by its FLOPs (torch's flop_counter formulas) at the throughput the lab
  measured for a bf16 matmul of that many FLOPs (`bench_linear_forward[*-bf16]` in
  results/microbench/nvidia-h200.json: 46, 185 and 369 GFLOP, interpolated on log FLOPs, held flat
  outside), or by its bytes where those take longer. A product in another dtype or on another card
  reads the curve's share of peak where a bf16 product on the H200 computes as long at peak
  (`product_rate`): fp32 (no TF32, torch's default) at the H200's 67 TFLOP/s reaches the share of a bf16
  product 15 times larger;
- the optimizer's step (torch's fused AdamW, bitsandbytes' 8-bit AdamW, torchao's compiled 8-bit
  AdamW as the latter) by the parameters it updates, at the time per parameter of
  `bench_optimizer_step[torch-adamw]` and `[adamw8bit]`: what the benchmark's bytes take at the copy's
  bandwidth scales with a parameter's bytes, the rest (per-element work) with its elements;
- bitsandbytes' NF4 dequantization by its bytes at the bandwidth `bench_nf4_dequantize` achieves;
- every other kernel (elementwise, norms, casts, dropout, other optimizers, int8 (de)quantization) by
  the bytes it reads and writes (a mutated input counts twice) at the bandwidth of `bench_copy` (a
  bf16 copy of an 11008 x 4096 weight: 2 x 90 MB moved);
- a host cost per kernel: the time Python, the module calls and the dispatcher take to launch it. It
  is `bench_lora_forward_backward` at its fewest tokens (launch-bound): the time the LoRA-wrapped layer
  takes over the bare one, divided by the kernels the adapter adds (counted by running the same peft
  layer under the recorder). An LLM.int8 forward adds the host time bitsandbytes' Python takes beyond its
  kernels' launches: `bench_linear_forward[*-int8]` at its fewest tokens (launch-bound), less its kernels at
  that cost each; its outlier check reads a value back, so the host waits for the GPU there (a mark in
  the trace, harness.predict.kernels.HOST_WAIT). bitsandbytes' 8-bit and paged optimizers wait so after
  each parameter they step (harness.predict.simulate._cuda_optimizer_sync).
Each prediction carries the digest of the micro-benchmark file (`calibration.digest`): one calibrated
from another file is made again (`is_current`).

The host issues kernels one after another; the GPU runs each once it is issued and the previous one is
done (a queue). The step takes until both are done: a step of small shapes is the host's, a large
one the GPU's, as on a GPU.

Activation offloading's copies (TRL's OffloadActivations with streams, trl/models/activation_offloading.py)
run on a third queue, its side stream, one copy at a time in both directions, at the card's host-link rate
(harness.cards: the data sheet's PCIe rate, so a lower bound on a copy's time). A copy to the host starts
once the compute stream has done the work issued before it (`s1.wait_stream(s0)`); a copy back starts when
backward asks for the tensor, and the compute stream waits for it (`s0.wait_stream(s1)`). So a large copy
late in the forward (the loss's saved fp32 log-probabilities) delays the first copy back in backward. Left
out: the compute stream's wait for a copy five saves later (TRL's forward stash), which binds only where the
link is slower than five saves' compute.

Other cards: the matmul curve's share of peak (read as `product_rate` says) times the card's peak for
the kernel's dtype, the bandwidth by the ratio of data-sheet bandwidths (harness.cards); the host cost stays (it
is the host's). A card without bf16 tensor cores (T4) runs bf16 products at its fp32 rate.

Liger's Triton kernels are in the trace as the simulation's stand-ins for them record them (harness.predict.liger:
each by the tensors it reads and writes, the fused cross-entropy's products by their FLOPs); a family without
stand-ins is costed as its eager step (`without_liger`).

What it leaves out: torch.compile's fused kernels (a compiled step is costed as the eager one; torchao's
compiled optimizer step is the exception, harness.predict.kernels.TORCHAO_STEP), communication of sharded
steps, and the CUDA allocator's own calls. Where the step cannot be
simulated at all, `analytic_speed` answers, labelled.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from harness.blocks.optimizers import OPTIMIZERS, UNTIMED_STEP_KERNEL
from harness.blocks.quantizations import NF4_BLOCK, QUANTIZATIONS
from harness.cards import CARDS, Card, card

MICROBENCH = Path(__file__).resolve().parents[2] / "results" / "microbench" / "nvidia-h200.json"
CALIBRATION_CARD = "H200"  # the device MICROBENCH was measured on (its records' extra_info.device)
MATMUL_DTYPES = ("bf16", "fp16", "fp32", "int8")
# Which round of each benchmark stands for a kernel's time: the fastest. The lab's micro-benchmarks time a
# call and its synchronisation from Python on a host shared with other work (each records the load
# average), so slower rounds carry the host's interference, not the kernel's; the rank-8 LoRA layer at
# 512 tokens has 5 rounds, one of them twice the others. (With the medians, the check against the H200
# runs gives fewer predictions within 15 %; the report's table says how many with this choice.)
STATISTIC = "min"
# Optimizer kernels the lab times in bench_optimizer_step (fp32 parameters of an MLP's three matrices):
# costed per parameter they update. Of a benchmark's time, the share its bytes take at a copy's bandwidth
# scales with the bytes (a bf16 parameter, half an fp32 one's) and the rest with the elements (`element_share`:
# the per-element work beyond moving the bytes, which a bf16 parameter needs as much of): torch's fused AdamW
# moves its bytes at the copy's rate (share 0), bitsandbytes' blockwise 8-bit kernel at about a sixth of it on
# the H200 (its dynamic 8-bit codes are computed element by element). The paged 8-bit AdamW runs the same
# kernel as the 8-bit one.
# torchao's 8-bit AdamW runs, per parameter, torch.compile's fusion of torchao.optim.adam.single_param_adam
# (harness.predict.kernels.TORCHAO_STEP), timed by bench_optimizer_step[ao-adamw8bit] where the file has it;
# until then as the same algorithm in bitsandbytes' 8-bit blockwise kernel (both moments in blocks of 256
# dynamic 8-bit codes, updated in one pass over the parameter), at that kernel's measured time per
# parameter. A torchao step with other states (4-bit, fp8) is costed by the bytes its fused kernel moves.
# Each op: the benchmarks that time it, the first the file has standing for it.
OPTIMIZER_BENCHMARKS = {"aten::_fused_adamw_": ("bench_optimizer_step[torch-adamw]",),
                        "bitsandbytes::optimizer_update_8bit_blockwise": ("bench_optimizer_step[adamw8bit]",),
                        "torchao::single_param_adam[OptimState8bit]": ("bench_optimizer_step[ao-adamw8bit]",
                                                                       "bench_optimizer_step[adamw8bit]")}
# The optimizer (harness.blocks.optimizers) each benchmark steps: its state bytes give the bytes a step moves.
BENCHED_OPTIMIZERS = {"bench_optimizer_step[torch-adamw]": "adamw", "bench_optimizer_step[adamw8bit]": "adamw8bit",
                      "bench_optimizer_step[ao-adamw8bit]": "ao_adamw8bit"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
# Kernels costed by their bytes at the bandwidth their own benchmark achieves rather than the copy's:
# bitsandbytes' NF4 dequantization (bench_nf4_dequantize: the 4-bit codes and their absmax read, the bf16
# weight written) reaches less than half a copy's bandwidth on the H200.
DEQUANTIZE_BENCHMARKS = {"bitsandbytes::dequantize_4bit": "bench_nf4_dequantize"}


@dataclass(frozen=True)
class Calibration:
    """What the lab measured on CALIBRATION_CARD, from MICROBENCH."""
    matmul_points: tuple[tuple[float, float], ...]  # (FLOPs, achieved FLOP/s), ascending
    bandwidth: float                                 # achieved bytes/s
    host_seconds_per_kernel: float
    source: str
    # seconds per fp32 parameter of each optimizer kernel the lab benchmarks, by op name
    optimizer_seconds_per_parameter: tuple[tuple[str, float], ...] = ()
    # the share of that time that is per-element work beyond moving the step's bytes, by op name (0 where none is
    # given: all of it scales with the bytes); an op timed by another kernel's benchmark has none
    optimizer_element_shares: tuple[tuple[str, float], ...] = ()
    # achieved bytes/s of kernels with their own benchmark (DEQUANTIZE_BENCHMARKS), by op name
    kernel_bandwidths: tuple[tuple[str, float], ...] = ()
    # host seconds of each call marked in a trace (harness.predict.kernels.MARKS) beyond its kernels' launches
    call_host_seconds: tuple[tuple[str, float], ...] = ()
    digest: str = ""  # of the micro-benchmark file: a prediction calibrated from another file is stale

    def matmul_rate(self, flops: float) -> float:
        points = self.matmul_points
        if flops <= points[0][0]:
            return points[0][1]
        if flops >= points[-1][0]:
            return points[-1][1]
        i = bisect.bisect_left([p[0] for p in points], flops)
        (f0, r0), (f1, r1) = points[i - 1], points[i]
        share = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
        return r0 + share * (r1 - r0)


def calibration_digest(path: Path = MICROBENCH) -> str:
    """The digest of the micro-benchmark file the speed model is calibrated from (the code digest does not
    cover it): a saved speed prediction carrying another is made again."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def is_current(speed: dict | None, path: Path = MICROBENCH) -> bool:
    """Whether a saved prediction's speed (None: it has none) was calibrated from the file as it is now; the
    analytic fallback's is calibrated from it too."""
    if not speed:
        return True
    return (speed.get("calibration") or {}).get("digest") == calibration_digest(path)


def _benchmarks(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{path}: cannot read the micro-benchmarks ({error})") from None


def _named(benchmarks: list[dict], prefix: str, path: Path) -> list[dict]:
    found = [b for b in benchmarks if b["name"].startswith(prefix)]
    if not found:
        raise SystemExit(f"{path}: no {prefix}* benchmark")
    return found


def calibration(path: Path = MICROBENCH) -> Calibration:
    """The calibration from the micro-benchmark file as it is now (cached by its digest)."""
    return _calibration(path, calibration_digest(path))


@functools.lru_cache(maxsize=None)
def _calibration(path: Path, digest: str) -> Calibration:
    benchmarks = _benchmarks(path)
    points = []
    for bench in _named(benchmarks, "bench_linear_forward[", path):
        info = bench["extra_info"]
        if info.get("layer") != "bf16":
            continue
        shape = info["shape"]
        flops = 2 * shape["tokens"] * shape["in_features"] * shape["out_features"]
        points.append((flops, flops / bench["stats"][STATISTIC]))
    (copy,) = _named(benchmarks, "bench_copy", path)
    rows, columns = copy["extra_info"]["shape"]["weight"]
    copied = 2 * rows * columns * 2  # a bf16 weight read and written
    bandwidth = copied / copy["stats"][STATISTIC]
    optimizer = []
    shares = []
    used = []
    for op, names in OPTIMIZER_BENCHMARKS.items():
        name = next((n for n in names if any(b["name"].startswith(n) for b in benchmarks)), names[-1])
        (bench,) = _named(benchmarks, name, path)
        used.append(name)
        optimizer.append((op, bench["stats"][STATISTIC] / bench["extra_info"]["shape"]["parameters"]))
        tensors = bench["extra_info"]["shape"].get("tensors")
        if name == names[0] and tensors:  # its own kernel's benchmark, whose tensors say the bytes it moved
            moved = _optimizer_step_bytes(BENCHED_OPTIMIZERS[name], [math.prod(t) for t in tensors])
            shares.append((op, max(0.0, 1 - moved / bandwidth / bench["stats"][STATISTIC])))
    bandwidths = []
    for op, name in DEQUANTIZE_BENCHMARKS.items():
        (bench,) = _named(benchmarks, name, path)
        rows, columns = bench["extra_info"]["shape"]["weight"]
        elements = rows * columns
        # the packed codes (two a byte) and one fp32 absmax a block read, the bf16 weight written: the bytes
        # the kernel recorder counts for bitsandbytes::dequantize_4bit (its tensors in and out)
        moved = elements // 2 + elements // NF4_BLOCK * 4 + elements * 2
        bandwidths.append((op, moved / bench["stats"][STATISTIC]))
    names = dict.fromkeys(["bench_linear_forward[*-bf16]", "bench_copy", "bench_lora_forward_backward",
                           *used, *DEQUANTIZE_BENCHMARKS.values()])
    from harness.predict.kernels import INT8_FORWARD_CALL

    host_per_kernel = _host_seconds_per_kernel(benchmarks, path)
    int8_call = _int8_call_host_seconds(benchmarks, path, host_per_kernel)
    names = dict.fromkeys([*names, "bench_linear_forward[*-int8]"])
    return Calibration(tuple(sorted(points)), bandwidth, host_per_kernel,
                       f"{path.name}: " + ", ".join(names), tuple(optimizer), tuple(shares), tuple(bandwidths),
                       ((INT8_FORWARD_CALL, int8_call),), digest)


def _optimizer_step_bytes(optimizer: str, sizes: list[int]) -> int:
    """The bytes one step of `optimizer` moves over fp32 parameters of `sizes` elements (a benchmark's): each
    parameter read and written, its gradient read, its states (the registry's state bytes) read and written."""
    states, _ = OPTIMIZERS[optimizer].state_bytes(sizes, 4)
    return sum(3 * 4 * n for n in sizes) + 2 * states


def optimizer_seconds(kernel, per_parameter: float, element_share: float) -> float:
    """A benchmarked optimizer kernel's seconds on the calibration card: its benchmark's time per fp32 parameter,
    the share that moves bytes scaled by the kernel's bytes (its fp32 units) and the rest by its elements."""
    elements = kernel.fp32_elements * 4 // DTYPE_BYTES.get(kernel.dtype, 4)
    return per_parameter * (element_share * elements + (1 - element_share) * kernel.fp32_elements)


def _host_seconds_per_kernel(benchmarks: list[dict], path: Path) -> float:
    """(LoRA layer - bare layer) / (kernels the adapter adds), at the benchmark's fewest tokens, mean over ranks."""
    lora = _named(benchmarks, "bench_lora_forward_backward[", path)
    fewest = min(b["extra_info"]["shape"]["tokens"] for b in lora)
    at_fewest = {b["extra_info"]["shape"]["rank"]: b for b in lora if b["extra_info"]["shape"]["tokens"] == fewest}
    if 0 not in at_fewest or len(at_fewest) < 2:
        raise SystemExit(f"{path}: bench_lora_forward_backward needs the bare layer and a rank at {fewest} tokens")
    bare = at_fewest.pop(0)
    shape = bare["extra_info"]["shape"]
    bare_kernels = len(lora_layer_kernels(shape["tokens"], shape["in_features"], shape["out_features"], 0, 0.0))
    estimates = []
    for rank, bench in at_fewest.items():
        info = bench["extra_info"]
        added = len(lora_layer_kernels(shape["tokens"], shape["in_features"], shape["out_features"], rank,
                                       info["lora_dropout"])) - bare_kernels
        estimates.append((bench["stats"][STATISTIC] - bare["stats"][STATISTIC]) / added)
    return sum(estimates) / len(estimates)


def _int8_call_host_seconds(benchmarks: list[dict], path: Path, host_per_kernel: float) -> float:
    """The host's time in one LLM.int8 forward beyond launching its kernels: bench_linear_forward[*-int8] (a
    Linear8bitLt up-projection, threshold 6.0) at its fewest tokens, less the kernels the trace records for
    that forward (int8_forward_kernels) at the host cost of a kernel. At the fewest tokens the layer is the
    host's: on the H200 eight times the tokens add 64% to its time, where a bf16 layer's time grows 5.8 times.
    bitsandbytes' custom ops dispatch through Python, and MatMul8bitLt logs a warning each call that its
    input is not fp16, which the host pays on every layer."""
    from harness.predict.kernels import MARKS

    int8 = [b for b in _named(benchmarks, "bench_linear_forward[", path) if b["name"].endswith("-int8]")]
    if not int8:
        raise SystemExit(f"{path}: no bench_linear_forward[*-int8]")
    fewest = min(int8, key=lambda b: b["extra_info"]["shape"]["tokens"])
    shape = fewest["extra_info"]["shape"]
    launched = [k for k in int8_forward_kernels(shape["tokens"], shape["in_features"], shape["out_features"])
                if k.op not in MARKS]
    return max(0.0, fewest["stats"][STATISTIC] - len(launched) * host_per_kernel)


def int8_forward_kernels(tokens: int, in_features: int, out_features: int) -> list:
    """The kernels of bench_linear_forward's int8 layer (a bf16 input through LLM.int8 at threshold 6.0, no
    gradient) as the simulation traces CUDA's path (harness.predict.simulate._Int8MatmulAsOnCuda)."""
    import torch
    from bitsandbytes.autograd._functions import MatmulLtState
    from torch._subclasses.fake_tensor import FakeTensorMode

    from harness.predict.kernels import KernelRecorder
    from harness.predict.simulate import _Int8MatmulAsOnCuda

    recorder = KernelRecorder()
    with FakeTensorMode():
        state = MatmulLtState()
        state.threshold, state.has_fp16_weights = 6.0, False
        state.CB = torch.empty(out_features, in_features, dtype=torch.int8)
        state.SCB = torch.empty(out_features, dtype=torch.float32)
        x = torch.empty(tokens, in_features, dtype=torch.bfloat16)
        with recorder, torch.no_grad():
            recorder.recording = True
            _Int8MatmulAsOnCuda.apply(x, state.CB, None, None, state)
    return recorder.kernels


def lora_layer_kernels(tokens: int, in_features: int, out_features: int, rank: int, dropout: float) -> list:
    """The kernels of bench_lora_forward_backward's pass (a frozen bf16 linear layer, with a peft LoRA
    adapter of `rank` unless 0, under bf16 autocast, forward and backward), on fake tensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch import nn

    from harness.predict.kernels import KernelRecorder
    from harness.predict.simulate import _cuda_dropout, _swappable_fake_tensors

    class OneLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(in_features, out_features, bias=False)

        def forward(self, x):
            return self.up_proj(x)

    recorder = KernelRecorder()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _cuda_dropout("cuda"), mode, _swappable_fake_tensors(mode):  # dropout as CUDA runs it
        module = OneLinear().to(torch.bfloat16).requires_grad_(False)
        if rank:
            module = get_peft_model(module, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                       target_modules=["up_proj"]))
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(tokens, out_features, dtype=torch.bfloat16)
        with recorder:
            recorder.recording = True
            x.grad = None
            module.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            out.backward(grad_out)
    return recorder.kernels


def product_rate(flops: float, dtype: str, target: Card, reference: Card, calib: Calibration) -> float:
    """The achieved FLOP/s of a product on `target`: the measured bf16 curve's share of the H200's bf16 peak,
    read where a bf16 product on the H200 would compute as long at peak as this one does at its own peak,
    times its own peak. A product's share of peak grows with how long it computes against the fixed costs
    (launch, fill and drain of its tiles, its reads): an fp32 product (no TF32: torch's default,
    torch.backends.cuda.matmul.allow_tf32 False, which the lab leaves) computes 15 times longer at the H200's
    67 TFLOP/s than the same shape in bf16, so its share is the one of a bf16 product 15 times larger. The
    lab measures no fp32 product: this is the mechanism's reading of the bf16 curve, not an fp32 measurement."""
    dtype = dtype if dtype in MATMUL_DTYPES else "fp32"
    peak = target.peak(dtype) or target.fp32  # bf16 without bf16 tensor cores: the fp32 rate
    equivalent = flops * reference.bf16 / peak
    return calib.matmul_rate(equivalent) * peak / reference.bf16


def step_time(kernels: list, gpu: str, calib: Calibration | None = None) -> dict:
    """The step time of `kernels` on card `gpu` and its terms, in seconds."""
    from harness.predict.kernels import FROM_HOST, HOST_WAIT, LINK_COPIES, MARKS

    calib = calib or calibration()
    target, reference = card(gpu), CARDS[CALIBRATION_CARD]
    bandwidth = calib.bandwidth * target.bandwidth / reference.bandwidth
    host = device = link = 0.0
    terms = {"matmul_s": 0.0, "memory_s": 0.0, "optimizer_s": 0.0}
    link_s = 0.0
    flops = moved = 0
    per_parameter = dict(calib.optimizer_seconds_per_parameter)
    element_shares = dict(calib.optimizer_element_shares)
    call_seconds = dict(calib.call_host_seconds)
    own_bandwidth = {op: rate * target.bandwidth / reference.bandwidth for op, rate in calib.kernel_bandwidths}
    for kernel in kernels:
        if kernel.op == HOST_WAIT:  # launches nothing: the host resumes once the GPU is done
            host = max(host, device)
        if kernel.op in MARKS:
            host += call_seconds.get(kernel.op, 0.0)
            continue
        if kernel.op in LINK_COPIES:  # on the offloading's side stream (see the module's docstring)
            host += calib.host_seconds_per_kernel
            seconds = kernel.bytes / target.host_link
            link_s += seconds
            if kernel.op == FROM_HOST:  # issued at once; the compute stream waits for it
                link = max(link, host) + seconds
                device = max(device, link)
            else:  # after the compute stream's work issued so far
                link = max(link, host, device) + seconds
            moved += kernel.bytes
            continue
        seconds_by_bytes = kernel.bytes / own_bandwidth.get(kernel.op, bandwidth)
        if kernel.op in per_parameter:
            seconds = (optimizer_seconds(kernel, per_parameter[kernel.op], element_shares.get(kernel.op, 0.0))
                       * reference.bandwidth / target.bandwidth)
            terms["optimizer_s"] += seconds
        elif kernel.flops:
            seconds = max(kernel.flops / product_rate(kernel.flops, kernel.dtype, target, reference, calib), seconds_by_bytes)
            terms["matmul_s"] += seconds
        else:
            seconds = seconds_by_bytes
            terms["optimizer_s" if kernel.phase == "optimizer" else "memory_s"] += seconds
        flops += kernel.flops
        moved += kernel.bytes
        host += calib.host_seconds_per_kernel
        device = max(device, host) + seconds
    total = max(host, device, link)
    marks = [kernel.op for kernel in kernels if kernel.op in MARKS]
    return {"step_time_s": total, "kernels": len(kernels) - len(marks), "host_waits": marks.count(HOST_WAIT), "flops": flops, "bytes": moved,
            "host_s": host, "device_busy_s": sum(terms.values()), **terms, "host_link_s": link_s,
            "bound": ("host link" if link > max(host, device) else
                      "host" if host >= sum(terms.values()) else "device")}


def kernel_speed(kernels: list, tokens_per_step: int, gpu: str, calib: Calibration | None = None) -> dict:
    calib = calib or calibration()
    timed = step_time(kernels, gpu, calib)
    return {"gpu": gpu, "method": "kernels", "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / timed["step_time_s"], **timed,
            "calibration": {"source": calib.source, "matmul_points": [list(p) for p in calib.matmul_points],
                            "bandwidth": calib.bandwidth, "host_seconds_per_kernel": calib.host_seconds_per_kernel,
                            "optimizer_seconds_per_parameter": dict(calib.optimizer_seconds_per_parameter),
                            "optimizer_element_shares": dict(calib.optimizer_element_shares),
                            "kernel_bandwidths": dict(calib.kernel_bandwidths),
                            "call_host_seconds": dict(calib.call_host_seconds), "digest": calib.digest}}


def analytic_speed(config, technique, seq_len: int, micro_batch: int, grad_accum: int, gpu: str,
                   calib: Calibration | None = None, parameters: dict | None = None,
                   gradient_checkpointing: bool = False) -> dict:
    """The analytic fallback, for what is not simulated (the fit table, `--method analytic`): the step's
    matmul FLOPs (PaLM's accounting, harness.measure.throughput.model_flops_per_token; a checkpointed step
    runs its forward twice) at the measured matmul throughput of one layer-sized product (tokens x hidden x
    MLP width); given the analytic prediction's `parameters`, the optimizer step (trainable parameters at
    the optimizer benchmark's time per parameter) and, for a quantized base, its weights dequantized once
    per pass (4- or 8-bit read, 16-bit written, at the bandwidth of its dequantization's benchmark where
    the lab has one, NF4's, else the copy's). All scaled to the card. No host
    cost and no other memory-bound kernel: a lower bound on the step time."""
    from harness.measure.throughput import model_flops_per_token
    from harness.predict.analytic import trainable_dtype_bytes

    calib = calib or calibration()
    target, reference = card(gpu), CARDS[CALIBRATION_CARD]
    dtype = technique.autocast if technique.autocast != "none" else technique.weights
    dtype = dtype if dtype in MATMUL_DTYPES else "fp32"
    tokens = seq_len * micro_batch * grad_accum
    full_backward = technique.adapter in (None, "none")
    per_token = model_flops_per_token(config, seq_len, full_backward)
    if gradient_checkpointing:  # the forward again in backward
        per_token += model_flops_per_token(config, seq_len, False) / 2
    flops = per_token * tokens
    layer_flops = 2 * seq_len * micro_batch * config.hidden_size * getattr(config, "intermediate_size",
                                                                             4 * config.hidden_size)
    rate = product_rate(layer_flops, dtype, target, reference, calib)
    terms = {"matmul_s": flops / rate, "optimizer_s": 0.0, "memory_s": 0.0}
    notes = []
    if parameters:
        per_parameter = dict(calib.optimizer_seconds_per_parameter)
        # The kernel the optimizer benchmarks time for it (its descriptor's); others as torch's fused AdamW.
        kernel = OPTIMIZERS[technique.optimizer].step_kernel
        if kernel is None:
            kernel = UNTIMED_STEP_KERNEL
            notes.append(f"optimizer {technique.optimizer} costed as torch's fused AdamW")
        trainable_bytes = trainable_dtype_bytes(technique)
        share = dict(calib.optimizer_element_shares).get(kernel, 0.0)  # as optimizer_seconds has it
        terms["optimizer_s"] = (per_parameter[kernel] * parameters.get("trainable", 0)
                                * (share + (1 - share) * trainable_bytes / 4) * reference.bandwidth / target.bandwidth)
        quantized = parameters.get("quantized", 0)
        if quantized:
            quantization = QUANTIZATIONS[technique.quantization]
            bits = quantization.bits
            passes = 2 * grad_accum + (grad_accum if gradient_checkpointing else 0)
            dequantize = quantization.dequantize_kernel
            bandwidth = (dict(calib.kernel_bandwidths).get(dequantize, calib.bandwidth)
                         * target.bandwidth / reference.bandwidth)
            terms["memory_s"] = passes * quantized * (bits / 8 + 2) / bandwidth
    seconds = sum(terms.values())
    return {"gpu": gpu, "method": "analytic", "tokens_per_step": tokens, "tokens_per_s": tokens / seconds,
            "step_time_s": seconds, "flops": flops, **terms, "calibration": {"source": calib.source,
                                                                             "digest": calib.digest},
            **({"note": "; ".join(notes)} if notes else {})}


def without_liger(cfg):
    """The experiment with Liger's kernels off, whose eager step the speed model costs in their place where the
    simulation has no stand-ins for a family's Liger patch (harness.predict.liger.SUPPORTED); None without
    Liger."""
    import dataclasses

    return dataclasses.replace(cfg, liger_kernels=False) if getattr(cfg, "liger_kernels", False) else None


LIGER_NOTE = ("Liger's fused kernels costed as the eager ops they replace (the simulation stands in for them in "
              "Llama models only)")


def fine_tune_cost(tokens_per_s: float, tokens: float, price_per_hour: float | None) -> dict:
    """Hours and USD to train `tokens` at `tokens_per_s` on one GPU at `price_per_hour`."""
    hours = tokens / tokens_per_s / 3600
    return {"tokens": tokens, "hours": hours, "price_per_hour": price_per_hour,
            "cost_usd": None if price_per_hour is None else hours * price_per_hour}
