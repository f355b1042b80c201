"""Quantize and dequantize one MLP weight matrix: NF4 (QLoRA) and int8 row-wise (LLM.int8).

The baseline is a plain copy of the bf16 matrix, the memory traffic any pass over the
weights costs; the ratios say how many copies' time each conversion takes.
"""

import bitsandbytes.functional as F
import pytest
import torch

from conftest import assert_finite, relative_error

GROUP = "quantize"
BLOCKSIZE = 64  # QLoRA's NF4 block size (bitsandbytes' default)


@pytest.fixture(scope="module")
def weight(sizes, device):
    torch.manual_seed(0)
    return (torch.randn(sizes.mlp, sizes.hidden, device=device) * 0.02).to(torch.bfloat16)


def _shape(weight) -> dict:
    return {"weight": list(weight.shape), "dtype": "bf16"}


def bench_copy(measure, weight):
    out = measure(weight.clone, GROUP, True, _shape(weight), op="bf16 copy")
    assert torch.equal(out, weight)


def bench_nf4_quantize(measure, weight):
    packed, state = measure(lambda: F.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4"),
                            GROUP, False, _shape(weight), op="NF4 quantize", blocksize=BLOCKSIZE,
                            double_quant=False)
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // 2
    assert_finite(state.absmax, (weight.numel() // BLOCKSIZE,))


def bench_nf4_dequantize(measure, weight):
    packed, state = F.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4")
    out = measure(lambda: F.dequantize_4bit(packed, state), GROUP, False, _shape(weight),
                  op="NF4 dequantize", blocksize=BLOCKSIZE)
    assert_finite(out, weight.shape)
    assert relative_error(out, weight) < 0.15  # NF4 of Gaussian weights: about 0.09


def bench_int8_quantize(measure, weight):
    half = weight.half()  # LLM.int8 quantizes fp16 rows
    codes, scales, outliers = measure(lambda: F.int8_vectorwise_quant(half), GROUP, False, _shape(weight),
                                      op="int8 row-wise quantize", input_dtype="fp16")
    assert codes.dtype == torch.int8 and tuple(codes.shape) == tuple(weight.shape) and outliers is None
    assert_finite(scales, (weight.shape[0],))


def bench_int8_dequantize(measure, weight):
    codes, scales, _ = F.int8_vectorwise_quant(weight.half())
    out = measure(lambda: F.int8_vectorwise_dequant(codes, scales), GROUP, False, _shape(weight),
                  op="int8 row-wise dequantize", output_dtype="fp32")
    assert_finite(out, weight.shape)
    assert relative_error(out, weight) < 0.02  # row-wise int8 of Gaussian weights: about 0.007
