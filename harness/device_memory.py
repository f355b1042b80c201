"""What a card holds beside the caching allocator's segments, on CUDA: the device bytes of a step are
its predicted reserved bytes plus these (torch-free: predictions, the fit table and the report use it).

Outside the allocator live the CUDA context (created before any tensor) and the kernels CUDA loads
lazily on first use (CUDA_MODULE_LOADING=LAZY, the default since CUDA 12.2): torch's own, cuBLAS's
and cuDNN's, bitsandbytes', Triton's; and CUDA unified memory a library takes itself (bitsandbytes' paged
optimizer state), in the UVM driver's batches. None is visible to torch.cuda.memory_reserved; NVML sees all.

The context's and the kernels' figures below are the lab's measurements on one device and software stack:
an NVIDIA H200, driver 580.159.04, CUDA 13.0, torch 2.11.0, bitsandbytes 0.50.2 (results/nvidia-h200/*.json).
They are used for every CUDA card, the only one measured; another driver or torch loads other kernels.
"""

from __future__ import annotations

from harness.blocks.quantizations import QUANTIZATIONS

MiB = 2**20

# The context: `memory.device_used_before_load` (NVML, before the model is loaded) is 648,347,648 B in
# every H200 record of results/nvidia-h200 (one measurement, made before any of the step's work).
CUDA_CONTEXT_BYTES = 648_347_648

# Lazily loaded kernel modules, by the weights' code path. CALIBRATED, not derived: each is
# peak_device_used - peak_reserved - device_used_before_load of the TinyLlama-1.1B records of
# results/nvidia-h200 (the calibration subset, 21 records: the same figure in every one of a kind);
# the other models' records check it (harness.report.reserved marks which rows calibrated it).
KERNEL_MODULE_BYTES = {
    "half": 800_653_312,   # bf16/fp16 weights or autocast: every bf16 TinyLlama record (763.6 MiB)
    "fp32": 783_876_096,   # fp32 weights, no autocast: fp32__tinyllama-1.1b__5a47a4d40542.json (747.6 MiB)
}
# A quantized base's own kernels beyond these: harness.blocks.quantizations (kernel_bytes).

# cuBLAS's workspace per (handle, stream), taken from the caching allocator (it counts as allocated and
# reserved): 4096 KiB x 8 = 32 MiB on compute capability 9.0 and later (aten/src/ATen/cuda/CublasHandlePool.cpp,
# the default CUBLAS_WORKSPACE_CONFIG ":4096:8" for Hopper; cuBLAS's own recommendation for Hopper,
# https://docs.nvidia.com/cuda/cublas/#cublassetworkspace). A training step has two handles: the forward's
# thread and autograd's backward thread. The H200 records' peak_allocated exceeds their tracked tensor
# peak by 64 MiB where nothing else differs (bf16-pure__llama-2-7b: 64.1 MiB).
CUBLAS_WORKSPACE_BYTES = 32 * MiB
WORKSPACE_PHASES = ("forward", "backward")


def outside_allocator_bytes(technique=None) -> int:
    """The context and the kernels a step of this technique loads (see the constants' sources); without
    a technique, those of a half-precision step."""
    half = technique is None or technique.weights in ("bf16", "fp16") or technique.autocast in ("bf16", "fp16") or (
        technique.quantization != "none")
    kernels = KERNEL_MODULE_BYTES["half" if half else "fp32"]
    quantization = QUANTIZATIONS[technique.quantization] if technique is not None else None
    if quantization is not None:
        kernels += quantization.kernel_bytes
    return CUDA_CONTEXT_BYTES + kernels


# CUDA unified memory resident on the GPU (bitsandbytes' paged optimizer state) is not the allocator's: the
# UVM driver backs it with root chunks of 2 MiB (UVM_CHUNK_SIZE_MAX), split for smaller pages, which it takes
# from the GPU's physical allocator in batches of 1 << uvm_perf_pma_batch_nonpinned_order, default 6, keeping
# the rest of a batch for later (NVIDIA open-gpu-kernel-modules, kernel-open/nvidia-uvm/uvm_pmm_gpu.c).
UVM_ROOT_CHUNK_BYTES = 2 * MiB
UVM_BATCH_ROOT_CHUNKS = 1 << 6


def unified_memory_bytes(resident_bytes: int) -> int:
    """The device memory UVM takes for `resident_bytes` of unified memory on the GPU: whole batches."""
    if resident_bytes <= 0:
        return 0
    chunks = -(-resident_bytes // UVM_ROOT_CHUNK_BYTES)
    return -(-chunks // UVM_BATCH_ROOT_CHUNKS) * UVM_BATCH_ROOT_CHUNKS * UVM_ROOT_CHUNK_BYTES


def device_bytes(reserved_bytes: int, technique, unified_bytes: int = 0) -> int:
    """What the card must hold: the allocator's reserved segments and what lives outside them, `unified_bytes`
    of unified memory (tensors the allocator never saw) among them."""
    return reserved_bytes + outside_allocator_bytes(technique) + unified_memory_bytes(unified_bytes)


# The analytic method knows a step's peak tensor bytes, not its sequence of allocations, so it cannot
# replay the allocator: its reserved bytes are its allocated peak (tensors and cuBLAS workspaces) times
# this ratio. CALIBRATED: the median peak_reserved / peak_allocated of the TinyLlama-1.1B records of
# results/nvidia-h200 (the calibration subset above; 1.032 to 1.215 there); the simulated method replays
# the allocator instead. With expandable segments, allocations tile one segment: the allocated peak
# rounded up to the large pool's 20 MiB pages, and one 2 MiB page of the small pool.
ANALYTIC_RESERVED_RATIO = 1.0452
EXPANDABLE_LARGE_PAGE, EXPANDABLE_SMALL_PAGE = 20 * MiB, 2 * MiB


def analytic_device(prediction: dict, technique, allocator: str = "default") -> tuple[int, int]:
    """(reserved, device) bytes of an analytic prediction (harness.predict.analytic.predict's dict)."""
    unified = prediction.get("unified_bytes", 0)
    reserved = analytic_reserved_bytes(prediction["total_bytes"], allocator, unified)
    return reserved, device_bytes(reserved, technique, unified)


def analytic_reserved_bytes(total_bytes: int, allocator: str = "default", unified_bytes: int = 0) -> int:
    """Reserved bytes from an analytic peak (see ANALYTIC_RESERVED_RATIO), less the `unified_bytes` of it
    that live in unified memory."""
    allocated = total_bytes - unified_bytes + len(WORKSPACE_PHASES) * CUBLAS_WORKSPACE_BYTES
    if allocator == "expandable_segments":
        return -(-allocated // EXPANDABLE_LARGE_PAGE) * EXPANDABLE_LARGE_PAGE + EXPANDABLE_SMALL_PAGE
    return int(allocated * ANALYTIC_RESERVED_RATIO)
