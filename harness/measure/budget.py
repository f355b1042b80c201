"""What an N GB card leaves to a training run (torch-free: predictions and reports use it too)."""

from __future__ import annotations

# The CUDA context and the kernels of cuBLAS/cuDNN live outside the torch allocator; a run
# records the context it measured beside this allowance.
CUDA_CONTEXT_ALLOWANCE = 512 * 2**20


def budget_cap_bytes(budget_gb: float, device_type: str) -> int:
    """Bytes the torch allocator (CUDA) or the tensor tracker (CPU) may hold on an N GB card."""
    allowance = CUDA_CONTEXT_ALLOWANCE if device_type == "cuda" else 0
    return max(int(budget_gb * 1e9) - allowance, 0)
