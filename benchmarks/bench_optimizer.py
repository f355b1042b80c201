"""One optimizer step over one transformer block's MLP (gate, up, down) in fp32 master weights.

torch AdamW (the fused kernel on CUDA, the foreach one on CPU) is the baseline; the
bitsandbytes 8-bit optimizers are built by the harness's own optimizer registry, so the
step timed is the step the techniques run. The states exist before timing starts.
"""

import warnings

import pytest
import torch
from torch import nn

from harness.blocks.optimizers import OPTIMIZERS
from harness.config import OptimSettings

GROUP = "optimizer-step"
SETTINGS = OptimSettings()


def _torch_adamw(params, device_type):
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=SETTINGS.lr, betas=tuple(SETTINGS.betas), eps=SETTINGS.eps,
                             weight_decay=SETTINGS.weight_decay, **fast)


BUILDERS = {
    "torch-adamw": _torch_adamw,
    "adamw8bit": lambda params, device_type: OPTIMIZERS["adamw8bit"].build(params, SETTINGS, device_type),
    "paged-adamw8bit": lambda params, device_type: OPTIMIZERS["paged_adamw8bit"].build(params, SETTINGS, device_type),
    # torchao's 8-bit AdamW: its per-parameter step compiled (torch.compile, Inductor), the warm-up step
    # compiling it; the speed model costs it as bitsandbytes' 8-bit kernel until this is measured
    "ao-adamw8bit": lambda params, device_type: OPTIMIZERS["ao_adamw8bit"].build(params, SETTINGS, device_type),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def bench_optimizer_step(measure, name, sizes, device):
    if name.startswith("ao-") and device.type != "cuda":
        # Inductor compiles the step for a CPU in minutes, longer than the tiny smoke run's budget; the CUDA
        # step is the one the speed model needs
        pytest.skip("torchao's compiled step is measured on CUDA only")
    torch.manual_seed(0)
    shapes = [(sizes.mlp, sizes.hidden), (sizes.mlp, sizes.hidden), (sizes.hidden, sizes.mlp)]
    params = [nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape in shapes]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = BUILDERS[name](params, device.type)
        optimizer.step()  # creates the states: the timed steps are steady-state steps
    before = params[0].detach().clone()
    extra = {"optimizer": type(optimizer).__name__,
             "implementation": (("fused" if device.type == "cuda" else "foreach") if name == "torch-adamw"
                                else "torchao (compiled)" if name.startswith("ao-") else "bitsandbytes"),
             "warnings": sorted({str(w.message) for w in caught})}
    if name.startswith("paged"):
        extra["paged"] = device.type == "cuda"
        if device.type != "cuda":
            extra["note"] = "paged optimizers fall back to non-paged on CPU (bitsandbytes)"
    measure(optimizer.step, GROUP, name == "torch-adamw",
            {"parameters": sum(p.numel() for p in params), "tensors": [list(s) for s in shapes], "dtype": "fp32"},
            **extra)
    assert not torch.equal(params[0].detach(), before)
    assert all(torch.isfinite(p).all() for p in params)
