"""One MLP up-projection (hidden -> MLP width) as bf16 nn.Linear, NF4 Linear4bit, int8 Linear8bitLt.

The forward also runs in fp32 (weight and input; torch's default, no TF32), as the fp32 technique's
products run: the speed model (harness.predict.speed.product_rate) reads fp32 products off the bf16
curve, which this measures.

All three weights are frozen, as a LoRA/QLoRA base is: forward+backward computes the
input's gradient only. `bf16-trainable` adds the weight gradient of full fine-tuning.
The baseline of each group is the frozen bf16 layer at the same number of tokens.
"""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from conftest import assert_finite, relative_error

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, as the int8-lora technique uses
EXTRA = {"int8": {"threshold": INT8_THRESHOLD}, "nf4": {"blocksize": 64, "double_quant": True}}
TOLERANCE = {"bf16": 0.0, "bf16-trainable": 0.0, "nf4": 0.2, "int8": 0.05, "fp32": 0.0}  # vs the bf16 layer


@pytest.fixture(scope="module")
def weight(sizes, device):
    torch.manual_seed(0)
    return (torch.randn(sizes.mlp, sizes.hidden, device=device) * 0.02).to(torch.bfloat16)


def make_layer(kind: str, weight: torch.Tensor) -> nn.Module:
    out_features, in_features = weight.shape
    if kind == "fp32":
        layer = nn.Linear(in_features, out_features, bias=False, dtype=torch.float32, device=weight.device)
        layer.weight = nn.Parameter(weight.float(), requires_grad=False)
        return layer
    if kind in ("bf16", "bf16-trainable"):
        layer = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16, device=weight.device)
        layer.weight = nn.Parameter(weight.clone(), requires_grad=kind == "bf16-trainable")
        return layer
    if kind == "nf4":  # as the qlora technique has it: blocks of 64, double quantization
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer)._quantize(weight.device)
        return layer
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False,
                                         has_fp16_weights=False)._quantize(weight.device)
        return layer
    raise ValueError(kind)


def _shape(tokens, weight) -> dict:
    return {"tokens": tokens, "in_features": weight.shape[1], "out_features": weight.shape[0]}


def _inputs(tokens, weight, requires_grad=False):
    torch.manual_seed(1)
    return torch.randn(tokens, weight.shape[1], device=weight.device, dtype=torch.bfloat16,
                       requires_grad=requires_grad)


@pytest.mark.parametrize("kind", ["bf16", "nf4", "int8", "fp32"])
def bench_linear_forward(measure, kind, tokens, weight):
    layer, x = make_layer(kind, weight), _inputs(tokens, weight)
    if kind == "fp32":
        x = x.float()

    def forward():
        with torch.no_grad():
            return layer(x)

    out = measure(forward, f"matmul-forward-t{tokens}", kind == "bf16", _shape(tokens, weight),
                  layer=kind, **({"allow_tf32": torch.backends.cuda.matmul.allow_tf32} if kind == "fp32" else {}),
                  **EXTRA.get(kind, {}))
    assert_finite(out, (tokens, weight.shape[0]))
    with torch.no_grad():
        assert relative_error(out, x.to(weight.dtype) @ weight.t()) <= TOLERANCE[kind] + 0.01


@pytest.mark.parametrize("kind", ["bf16", "nf4", "int8", "bf16-trainable"])
def bench_linear_forward_backward(measure, kind, tokens, weight):
    layer, x = make_layer(kind, weight), _inputs(tokens, weight, requires_grad=True)
    grad_out = torch.randn(tokens, weight.shape[0], device=weight.device, dtype=torch.bfloat16)

    def forward_backward():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad_out)
        return x.grad

    out = measure(forward_backward, f"matmul-forward-backward-t{tokens}", kind == "bf16",
                  _shape(tokens, weight), layer=kind, weight_trainable=kind == "bf16-trainable",
                  **EXTRA.get(kind, {}))
    assert_finite(out, (tokens, weight.shape[1]))
    assert relative_error(out, grad_out @ weight) <= TOLERANCE[kind] + 0.01
    if kind == "bf16-trainable":
        assert_finite(layer.weight.grad, weight.shape)
