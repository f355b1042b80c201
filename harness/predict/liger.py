"""Liger's kernels as the fake-tensor simulation runs them: autograd Functions that allocate and save what
Liger's do, and the patch Liger applies to a Llama model instance, made with them.

Liger's Triton kernels cannot run on fake tensors (nor on a CPU), but what they hold is fixed by their
autograd Functions' Python code, traced here from Liger-Kernel 0.8.2 (commit ead96b6, src/liger_kernel/):
- ops/rms_norm.py, LigerRMSNormFunction: `ensure_contiguous`; Y and a per-row RSTD (fp32 in the 'llama'
  casting mode) allocated; X (as given: no fp32 copy), W and RSTD saved. Backward writes dX into dY
  (in_place, the default) and sums a per-SM fp32 partial dW buffer.
- ops/swiglu.py, LigerSiLUMulFunction: `ensure_contiguous`; c allocated; a and b saved (the activation is
  recomputed in backward); backward writes the gradients into a and b themselves.
- ops/rope.py, LigerRopeFunction: q and k transposed back to token-major and made contiguous (no copy for
  transformers' q/k views), rotated in place; cos and sin saved; backward does the same to dq and dk.
- ops/fused_linear_cross_entropy.py, LigerFusedLinearCrossEntropyFunction (reduction 'mean'): forward
  allocates grad_input like the input, grad_weight like the weight where both need a gradient, a per-row
  fp32 loss; chunk by chunk (chunk rows: the next power of two of BT / ceil(V / H)) it computes the chunk's
  logits (autocast's dtype: amp custom_fwd leaves autocast on), overwrites them with their gradient and
  multiplies it into grad_input (and grad_weight); it saves grad_input and grad_weight for backward, which
  scales them in place and hands them on. No logits are held past a chunk. The weight gradient is
  accumulated in place (torch.addmm into grad_weight) where the product is 16-bit on a CUDA GPU of compute
  capability 8 or more, as Liger does since PR #1239 (an fp32 grad_weight, 0.8.1) and PR #1454 (merged
  2026-09-10: a grad_weight of the product's dtype); 0.8.2 and earlier make, for the latter, the V x H product
  and an fp32 copy of it per chunk (torch.mm(...).float()). The GPU records made so far do not name the Liger
  version that ran (records name it since: harness.env.PACKAGES); the in-place path is modelled (a bf16 3B
  rung's forward, measured, holds neither copy).
For the speed model each stand-in also records the Triton kernels it stands for (harness.predict.kernels.launch:
by the tensors each reads and writes), the fused cross-entropy's in-place weight-gradient product by its FLOPs,
and the values the function reads back (the targets' count, the output gradient compared with 1) as waits.
- transformers/monkey_patch.py, apply_liger_kernel_to_llama(model=...): module-level apply_rotary_pos_emb
  replaced; the model's forward replaced by model/llama.py's lce_forward (the loss through the fused
  function on lm_head's weight: lm_head's own forward never runs); every RMSNorm's and MLP's forward
  rebound (LigerRMSNorm, LigerSwiGLUMLP).
Values are not computed (storage is what is predicted): outputs are allocated empty, as the kernels'
are before they write them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import MethodType

import torch

from harness.predict.kernels import HOST_WAIT, launch, mark
from harness.techniques import NotSimulated

# The model types whose Liger patch is apply_liger_kernel_to_llama's set (RMSNorm, SwiGLU, RoPE, fused linear
# cross-entropy) on transformers' Llama classes.
SUPPORTED = ("llama",)

# Rows of RMSNorm's partial weight-gradient buffer: one per streaming multiprocessor (rms_norm_backward reads
# multi_processor_count); 132 on an H100 SXM or H200 (NVIDIA's Hopper architecture whitepaper).
SM_COUNT = 132


class RMSNormFunction(torch.autograd.Function):
    """LigerRMSNormFunction, 'llama' casting mode, in place."""

    @staticmethod
    def forward(ctx, x, weight, in_place=True):
        x, weight = x.contiguous(), weight.contiguous()  # ensure_contiguous
        shape = x.shape
        rows = x.view(-1, shape[-1])
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        launch("liger::rms_norm_forward", [rows, weight], [y, rstd])
        ctx.save_for_backward(rows, weight, rstd)
        ctx.in_place = in_place
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # ensure_contiguous
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = grad.view(-1, rows.shape[-1])
        partial = torch.empty((SM_COUNT, rows.shape[-1]), dtype=torch.float32, device=weight.device)
        grad_x = grad_rows if ctx.in_place else torch.zeros_like(grad_rows)
        launch("liger::rms_norm_backward", [grad_rows, rows, weight, rstd], [grad_x, partial])
        return grad_x.view(grad.shape), partial.sum(dim=0).to(weight.dtype), None


class SiLUMulFunction(torch.autograd.Function):
    """LigerSiLUMulFunction: silu(a) * b."""

    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        c = torch.empty_like(a)
        launch("liger::swiglu_forward", [a, b], [c])
        return c

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # ensure_contiguous: the kernel reads dc row by row
        a, b = ctx.saved_tensors
        launch("liger::swiglu_backward", [grad, a, b], [a, b])
        return a, b  # the kernel writes da and db into a and b


class RopeFunction(torch.autograd.Function):
    """LigerRopeFunction: q and k rotated in place, token-major."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        launch("liger::rope_forward", [q, k, cos, sin], [q, k])
        return q.transpose(1, 2), k.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        grad_q, grad_k = grad_q.transpose(1, 2).contiguous(), grad_k.transpose(1, 2).contiguous()
        launch("liger::rope_backward", [grad_q, grad_k, *ctx.saved_tensors], [grad_q, grad_k])
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), None, None


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """LigerFusedLinearCrossEntropyFunction, reduction 'mean', no bias, no softcap, ignore_index -100."""

    @staticmethod
    def forward(ctx, x, weight, target):
        rows, hidden = x.shape
        chunk = _next_power_of_2(math.ceil(rows / math.ceil(weight.shape[0] / hidden)))
        grad_x = torch.zeros_like(x)
        grad_weight = torch.zeros_like(weight) if x.requires_grad and weight.requires_grad else None
        loss_rows = torch.zeros(rows, dtype=torch.float32, device=x.device)
        mask = target != -100  # the target mask, whose sum the kernel divides by
        launch("aten::sum", [mask], [])  # target_mask.sum().item(): read back before the chunks
        mark(HOST_WAIT, "Liger's fused linear cross-entropy counts the targets")
        for start in range(0, rows, chunk):
            x_chunk = x[start:start + chunk]
            logits = (x_chunk @ weight.t()).contiguous()  # overwritten with its own gradient by the kernel
            # liger_cross_entropy_kernel: each row's logits read, its loss and the logits' gradient written
            launch("liger::cross_entropy", [logits, target[start:start + chunk]],
                   [logits, loss_rows[start:start + chunk]])
            if x.requires_grad:
                grad_x[start:start + chunk] = logits @ weight
            if grad_weight is not None:
                if logits.dtype in LOW_PRECISION and grad_weight.dtype in (torch.float32, logits.dtype):
                    # torch.addmm(grad_weight, logits.t(), x_chunk, out=grad_weight): only the chunk's cast
                    cast = x_chunk.to(logits.dtype)
                    launch("aten::addmm", [grad_weight, logits, cast], [grad_weight],
                           flops=2 * logits.shape[0] * logits.shape[1] * cast.shape[1])
                    del cast
                else:
                    grad_weight += torch.mm(logits.t(), x_chunk).float()
            del logits
        loss = loss_rows.sum()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_weight = ctx.saved_tensors
        # torch.equal(grad_output, 1.0) reads a value back; where it is not 1 (the lab's loss over k > 1
        # micro-batches) element_mul_kernel scales both in place, a pass over bytes that a step's products
        # dwarf (at 7B and 2,048 tokens, 0.3 GB against 86 TFLOP), left out.
        mark(HOST_WAIT, "Liger's fused linear cross-entropy compares its output's gradient with 1")
        return grad_x, grad_weight, None


def _rms_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight)


def _swiglu_forward(self, x):
    return self.down_proj(SiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return RopeFunction.apply(q, k, cos, sin)


def _lce_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
    """model/llama.py's lce_forward in training with labels (skip_logits): no logits returned."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = outputs[0]
    loss = None
    if labels is not None and self.training:
        # loss_utils.LigerForCausalLMLoss: labels padded by one ignored position and shifted
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        loss = FusedLinearCrossEntropyFunction.apply(hidden.view(-1, self.config.hidden_size),
                                                     self.lm_head.weight, shifted.view(-1))
        return CausalLMOutputWithPast(loss=loss, logits=None)
    logits = self.lm_head(hidden)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def _bind(module, name: str, function) -> None:
    module.__dict__[name] = MethodType(function, module)


@contextmanager
def liger_stand_ins():
    """While open, `apply(model)` patches a model as Liger does (transformers' apply_liger_kernel on the
    peft-unwrapped model); the module-level RoPE function it replaces is restored on exit."""
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb
    try:
        yield apply
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary


def apply(model) -> None:
    """apply_liger_kernel_to_llama(model=...) with the stand-ins, on the model under any peft wrapper."""
    from transformers.models.llama import modeling_llama
    from transformers.trainer_utils import unwrap_peft_model

    base = unwrap_peft_model(model)
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise NotSimulated(f"Liger's kernels are simulated for {', '.join(SUPPORTED)} models (its Llama patch), "
                           f"not {model_type}; the analytic method predicts it")
    modeling_llama.apply_rotary_pos_emb = _rotary
    _bind(base, "forward", _lce_forward)
    decoder = getattr(base, base.base_model_prefix, base)
    _bind(decoder.norm, "forward", _rms_norm_forward)
    for layer in decoder.layers:
        _bind(layer.mlp, "forward", _swiglu_forward)
        _bind(layer.input_layernorm, "forward", _rms_norm_forward)
        _bind(layer.post_attention_layernorm, "forward", _rms_norm_forward)
