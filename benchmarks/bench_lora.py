"""A LoRA-wrapped linear layer (peft) against the bare frozen layer, forward+backward.

The layer is an MLP up-projection in bf16, frozen; peft adds fp32 adapters of rank 8
and 64 (alpha = 2 r, the harness's default dropout) and the pass runs under bf16
autocast, as the `lora` technique does. The baseline is the bare layer.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import assert_finite
from harness.config import LoraSettings

DROPOUT = LoraSettings().dropout


class OneLinear(nn.Module):
    def __init__(self, hidden: int, mlp: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, mlp, bias=False)

    def forward(self, x):
        return self.up_proj(x)


def make_module(rank: int, sizes, device) -> nn.Module:
    torch.manual_seed(0)
    module = OneLinear(sizes.hidden, sizes.mlp).to(device=device, dtype=torch.bfloat16)
    module.requires_grad_(False)
    if rank == 0:
        return module
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT, target_modules=["up_proj"])
    return get_peft_model(module, config)


@pytest.mark.parametrize("rank", [0, 8, 64], ids=["bare", "r8", "r64"])
def bench_lora_forward_backward(measure, rank, tokens, sizes, device):
    module = make_module(rank, sizes, device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == (2 if rank else 0)
    torch.manual_seed(1)
    x = torch.randn(tokens, sizes.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, sizes.mlp, device=device, dtype=torch.bfloat16)

    def forward_backward():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module(x)
        out.backward(grad_out)
        return x.grad

    out = measure(forward_backward, f"lora-forward-backward-t{tokens}", rank == 0,
                  {"tokens": tokens, "in_features": sizes.hidden, "out_features": sizes.mlp, "rank": rank},
                  adapter="none" if rank == 0 else f"lora r={rank}", lora_alpha=2 * rank,
                  lora_dropout=DROPOUT if rank else 0.0, autocast="bf16",
                  trainable_parameters=sum(p.numel() for p in trainable))
    assert_finite(out, (tokens, sizes.hidden))
    for param in trainable:
        assert_finite(param.grad, param.shape)
