"""The simulation's stand-ins for Liger's autograd Functions save and allocate what Liger's do
(harness.predict.liger): checked on small real tensors and a tiny Llama built from a config."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.predict import liger
from harness.techniques import NotSimulated


def _saved(function, *inputs):
    """The tensors `function` saves for backward, and its output."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = function(*inputs)
    return saved, out


class _Largest(TorchDispatchMode):
    """The most elements any one op's output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_rms_norm_saves_its_input_as_it_is_and_an_fp32_scale_per_row():
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    saved, y = _saved(liger.RMSNormFunction.apply, x, w)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bfloat16, 2 * 8 * 16), (torch.bfloat16, 16),
                                                     (torch.float32, 2 * 8)]
    assert saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # no copy
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_swiglu_saves_gate_and_up_only():
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(4, 32, requires_grad=True)
    saved, c = _saved(liger.SiLUMulFunction.apply, a * 1, b * 1)
    assert len(saved) == 2 and all(t.shape == (4, 32) for t in saved)


def test_fused_linear_cross_entropy_holds_no_logits_and_a_weight_gradient_only_where_the_weight_trains():
    tokens, hidden, vocab = 256, 16, 1024  # chunks of next_power_of_2(256 / 64) = 4 rows
    x = torch.randn(tokens, hidden, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    for trains in (False, True):
        weight = torch.randn(vocab, hidden, requires_grad=trains)
        largest = _Largest()
        with largest:
            saved, loss = _saved(liger.FusedLinearCrossEntropyFunction.apply, x, weight, target)
        assert loss.dim() == 0
        assert largest.largest <= max(vocab * hidden, 4 * vocab)  # a chunk's logits, never tokens x vocab
        assert [t.shape for t in saved if t is not None] == [x.shape] + ([weight.shape] if trains else [])


def test_a_tiny_llama_patched_as_liger_patches_it_trains_without_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 512, (2, 64))
    with liger.liger_stand_ins() as apply:
        apply(model)
        largest = _Largest()
        with largest:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
    assert out.logits is None
    assert largest.largest < 2 * 64 * 512  # no batch x sequence x vocabulary tensor anywhere in the step
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
    assert model.lm_head.weight.grad is not None


def test_a_family_without_liger_s_llama_patch_is_not_simulated():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    with liger.liger_stand_ins() as apply, pytest.raises(NotSimulated, match="gpt2"):
        apply(model)


def test_the_stand_ins_record_the_triton_kernels_they_stand_for():
    """Liger's kernels do not run on fake tensors; the speed model costs what the stand-ins record for them:
    each by the tensors it reads and writes, the fused cross-entropy's weight gradient by its FLOPs."""
    from harness.predict.kernels import HOST_WAIT, KernelRecorder

    x = torch.randn(2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    recorder = KernelRecorder()
    recorder.recording = True
    with recorder:
        liger.RMSNormFunction.apply(x, w).sum().backward()
    by_op = {k.op: k for k in recorder.kernels}
    rows = 2 * 8
    assert by_op["liger::rms_norm_forward"].bytes == 2 * (rows * 16 + 16 + rows * 16) + 4 * rows
    # backward: dY, X, W and the scales read; dX (in place of dY) and one fp32 partial row per SM written
    assert by_op["liger::rms_norm_backward"].bytes == 2 * (3 * rows * 16 + 16) + 4 * rows + 4 * liger.SM_COUNT * 16

    tokens, hidden, vocab = 256, 16, 1024  # chunks of 4 rows
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    recorder = KernelRecorder()
    recorder.recording = True
    with recorder:
        liger.FusedLinearCrossEntropyFunction.apply(x, weight, target).backward()
    ops = [k.op for k in recorder.kernels]
    chunks = tokens // 4
    assert ops.count("liger::cross_entropy") == chunks and ops.count(HOST_WAIT) == 2
    assert ops.index(HOST_WAIT) < ops.index("liger::cross_entropy")  # the targets are counted first
    products = [k for k in recorder.kernels if k.flops]
    # per chunk: its logits, the input's gradient and the weight's (accumulated in place): 3 products
    assert len(products) == 3 * chunks and sum(k.flops for k in products) == 3 * 2 * tokens * hidden * vocab
