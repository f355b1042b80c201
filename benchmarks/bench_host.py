"""The host's time per kernel it launches: a training pass (forward and backward, no optimizer) of a Llama
model so narrow (2 layers, hidden 256, 2 x 16 tokens) that its kernels take the device next to nothing, so
the pass takes what the host takes to issue them: Python, the modules' calls and the dispatcher in forward,
the autograd engine in backward.

Two forms, as the lab trains: `bare`, bf16 weights that all train (bf16-pure's step), and `lora`, the same
model frozen with peft's LoRA (rank 8) on all seven projections under bf16 autocast (lora's). Each records
the kernels its pass launches, counted on the device by the lab's kernel recorder
(harness.predict.kernels.KernelRecorder), in extra_info, so that a host cost per kernel (the pass's time over
them) is measured for steps of plain modules and of peft's adapters apart. The speed model's host cost today is
one figure from bench_lora_forward_backward (the adapter's kernels: harness.predict.speed), which the H200 runs
show too high for plain modules (bf16 TinyLlama at 512 x 4, launch-bound, predicted about 20% slow).
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from harness.config import LoraSettings
from harness.predict.kernels import MARKS, KernelRecorder

SHAPE = {"layers": 2, "hidden": 256, "intermediate": 704, "vocab": 4096, "batch": 2, "sequence": 16}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(form: str, device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                         intermediate_size=SHAPE["intermediate"], num_hidden_layers=SHAPE["layers"],
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).train()
    if form == "bare":
        return model
    model.requires_grad_(False)
    settings = LoraSettings()
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=settings.dropout,
                                            target_modules=PROJECTIONS))


@pytest.mark.parametrize("form", ["bare", "lora"])
def bench_host_per_kernel(measure, form, device):
    model = make_model(form, device)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["sequence"]), device=device)
    autocast = form == "lora"  # bf16-pure trains bf16 weights without autocast; LoRA's fp32 adapters run under it

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    forward_backward()  # first call: lazy initialisation, not counted
    recorder = KernelRecorder()
    recorder.recording = True
    with recorder:
        forward_backward()
    kernels = len([k for k in recorder.kernels if k.op not in MARKS])
    out = measure(forward_backward, "host-per-kernel", form == "bare", dict(SHAPE), form=form, kernels=kernels,
                  autocast="bf16" if autocast else "none",
                  trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert torch.isfinite(out.float()) and kernels > 100
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)
