"""Simulated memory: the runner's own training step traced with fake tensors, at full size.

Under `FakeTensorMode` every tensor has a shape, dtype and device but no storage, so a
7B or Mixtral step runs on a laptop. The same builders, optimizer and `train_step` as a
real run execute; `TensorTracker` (harness.measure.memory) counts the bytes each live storage
would hold and labels them by category, exactly as in a real run's tracked step.

What a fake step cannot do, and how it is handled:
- bitsandbytes' parameter classes cannot wrap a fake tensor: under fake tensors its
  quantize functions run directly and the packed weights stay plain parameters that
  carry the same quantization state (each Quantization's `quantize`, harness.blocks.quantizations);
  its code books are built with real computation on first use, so they are warmed outside the fake mode.
- kernels that differ by device: dropout's mask, fp32 grouped-query attention (math backend
  on CUDA) and LLM.int8's matmul are traced as CUDA runs them (see the _cuda_* hooks);
  the int8 kernel's outlier columns depend on values: on random weights their expected count is
  taken (harness.predict.outliers, _outlier_shares), on trained weights none. Autocast is CPU
  autocast (the fake tensors are CPU tensors), with CUDA autocast's own casts added where the two
  differ (_cuda_autocast: layer_norm, pow, exp, sum, softmax and the rest of its fp32 lists).
- values: MoE routing is data-dependent, so experts get a perfectly balanced share of
  tokens (see models.SequentialExperts); dynamic loss scaling (which reads a value to
  skip steps) is left out, its state being a few bytes; transformers' packed-sequence
  check reads position ids, and is answered as a real run answers it (not packed).
- the allocator: a traced step knows tensor bytes; the caching allocator's rounding, pools and
  fragmentation are predicted by replaying every storage the tracker saw born and freed, in order,
  through harness.predict.allocator (`reserved_bytes`), beside the cuBLAS workspaces the tracker
  cannot see (allocator_events).
- compiled code (torch.compile) runs eager under the tracker, so a compiled step is predicted as
  the eager one; torchao's compiled optimizer step is counted on CUDA as the one kernel it is, with
  the buffers its compiled code allocates (_compiled_torchao_step).
- Liger's Triton kernels cannot run on fake tensors: autograd Functions that allocate and save what Liger's
  do take their place, patched in as Liger patches the model (harness.predict.liger, _liger).
- offloading: TRL's own OffloadActivations runs, as if the CPU were an accelerator (_offloading).
"""

from __future__ import annotations

import importlib
import inspect
import time
from contextlib import contextmanager, nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from harness.blocks.optimizers import OPTIMIZERS, PAGED_MIN_ELEMENTS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.predict import allocator as caching_allocator
from harness.predict import outliers
from harness.predict.kernels import FROM_HOST, TO_HOST, TORCHAO_MODULE, over_host_link
from harness.device_memory import CUBLAS_WORKSPACE_BYTES, WORKSPACE_PHASES, device_bytes
from harness.measure.memory import TensorTracker, fsdp2_tracking, label_gradients, label_model, tracker_phase
from harness.step import sharding
from harness.step.models import ModelSource, quantized_layers
from harness.step.train import Progress, build_training, train_step
from harness.techniques import NotSimulated, Technique, not_simulated


@contextmanager
def _replaced(owner, name: str, replacement):
    """`owner.<name>` is `replacement` inside the block and its own again after it, whatever happens."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def _real_code_books(technique: Technique):
    """bitsandbytes and torchao compute their quantization code books with real values (`.tolist()`).

    The 4-bit code book and torchao's optimizer code books are cached after one real call; the
    8-bit optimizers' dynamic map is rebuilt for every optimizer, so it is computed outside the
    fake mode (256 floats).
    """
    before_fake = OPTIMIZERS[technique.optimizer].before_fake
    if before_fake:
        before_fake()
    quantization = QUANTIZATIONS[technique.quantization]
    if quantization is not None and quantization.before_fake:
        quantization.before_fake(technique)
    import bitsandbytes as bnb

    original = bnb.functional.create_dynamic_map

    def create_dynamic_map(*args, **kwargs):
        with unset_fake_temporarily():
            return original(*args, **kwargs)

    with _replaced(bnb.functional, "create_dynamic_map", create_dynamic_map):
        yield


@contextmanager
def _swappable_fake_tensors(mode: FakeTensorMode):
    """Let Module.to() move fake parameters (peft moves and casts its adapters).

    Module.to() swaps a fake parameter with its converted copy, and swap_tensors refuses
    tensors with weak references; the fake mode's memo holds one on each fake tensor it
    made. Dropping those memo entries (a cache) before the swap lets it proceed.
    """
    original = torch.utils.swap_tensors

    def swap(first, second):
        memo = mode.fake_tensor_converter.tensor_memo
        for key in [key for key, value in list(memo.items()) if value is first or value is second]:
            del memo[key]
        return original(first, second)

    with _replaced(torch.utils, "swap_tensors", swap):
        yield


@contextmanager
def _cuda_dropout(device_type: str):
    """Dropout as CUDA runs it: one fused kernel that saves a bool mask.

    On CPU, torch's dropout draws its noise in the input's dtype and saves that (4 bytes per
    element for fp32); CUDA's `native_dropout` saves a 1-byte mask. A CUDA step traced on
    CPU fake tensors calls the CUDA op, which has a fake implementation on every device.
    """
    if device_type != "cuda":
        yield
        return
    functional = torch.nn.functional

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        return torch.ops.aten.native_dropout(input, p, True)[0]

    with _replaced(functional, "dropout", dropout):
        yield


# CUDA autocast's casts where they differ from CPU autocast's, which the trace runs (its fake tensors are CPU
# tensors), by the name the op is called with in Python; from PyTorch's aten/src/ATen/autocast_mode.h (as
# installed with torch 2.13: torch/include/ATen/autocast_mode.h). CPU autocast keeps the norms, pow, exp, log,
# rsqrt, softplus, softmax, log_softmax, sum, cumsum and logsumexp in a bf16 input's dtype (checked on torch
# 2.13); it runs prod and the losses in fp32 too, where casting first changes nothing.
# AT_FORALL_FP32: a 16-bit floating input is cast to fp32 first (the upsample ops left out: no LLM calls them).
CUDA_AUTOCAST_FP32 = frozenset((
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm", "group_norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp"))
# AT_FORALL_FP32_SET_OPT_DTYPE, and norm (AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE's fp32_append_dtype): run
# with dtype=float32 where no dtype is given and the first tensor is a floating one, so the output is fp32.
CUDA_AUTOCAST_FP32_DTYPE = frozenset(("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                                      "vector_norm", "linalg_matrix_norm", "matrix_norm", "sum", "norm"))
# AT_FORALL_LOWER_PRECISION_FP's ops that CPU autocast leaves in fp32: cast to autocast's 16-bit dtype.
CUDA_AUTOCAST_LOWER = frozenset(("addmv", "addr", "mv"))
_HALF = (torch.float16, torch.bfloat16)


def _as_cuda_autocast(name: str, function):
    """`function` (torch's, a Tensor method's or torch.nn.functional's `name`) given, while (CPU) autocast is on,
    the inputs or the dtype CUDA autocast gives it."""

    def cast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            if name in CUDA_AUTOCAST_FP32:
                args, kwargs = _cast_floating((args, kwargs), _HALF, torch.float32)
            elif name in CUDA_AUTOCAST_LOWER:
                args, kwargs = _cast_floating((args, kwargs), (torch.float32,), torch.get_autocast_dtype("cpu"))
            elif kwargs.get("dtype") is None and not any(isinstance(arg, torch.dtype) for arg in args):
                first = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
                if first is not None and first.is_floating_point() and first.dtype != torch.float64:
                    kwargs = {**kwargs, "dtype": torch.float32}
        return function(*args, **kwargs)

    return cast


def _cast_floating(tree, dtypes: tuple, to: torch.dtype):
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(to) if t.is_floating_point() and t.dtype in dtypes else t, tree)


@contextmanager
def _cuda_autocast(device_type: str):
    """CUDA autocast's casts in a CUDA step traced under CPU autocast: each op of CUDA_AUTOCAST_FP32,
    CUDA_AUTOCAST_FP32_DTYPE and CUDA_AUTOCAST_LOWER, wherever Python calls it (torch.*, a Tensor method,
    torch.nn.functional.*, torch.linalg.*), runs as CUDA autocast runs it. The functions themselves are
    replaced, not intercepted by a torch function mode, which the autograd engine does not carry into
    backward, where checkpointing recomputes a layer (and must make the tensors its forward made). A bf16
    step's LayerNorm (GPT-2, NeoX) then saves an fp32 copy of its input and returns fp32, GPT-2's GELU
    (torch.pow) computes in fp32, and a sum or a softmax of 16-bit values returns fp32."""
    if device_type != "cuda":
        yield
        return
    restore = []
    for name in CUDA_AUTOCAST_FP32 | CUDA_AUTOCAST_FP32_DTYPE | CUDA_AUTOCAST_LOWER:
        for owner in (torch, torch.Tensor, torch.nn.functional, torch.linalg):
            function = getattr(owner, name, None)
            if callable(function):
                restore.append((owner, name, owner.__dict__.get(name)))
                setattr(owner, name, _as_cuda_autocast(name, function))
    try:
        yield
    finally:
        for owner, name, original in reversed(restore):
            if original is None:
                delattr(owner, name)  # a method torch.Tensor inherits from its C base
            else:
                setattr(owner, name, original)


@contextmanager
def _cuda_attention(device_type: str):
    """scaled_dot_product_attention as CUDA dispatches it in fp32 with grouped-query attention.

    CUDA's flash kernel takes only 16-bit inputs and its memory-efficient kernel refuses
    `enable_gqa`, so an fp32 GQA model (TinyLlama, Mistral, Mixtral in fp32) runs the math
    backend, which saves the s x s attention probabilities and k, v repeated to every head.
    A CPU trace would use the CPU flash kernel, which saves neither; this calls the math
    backend where CUDA would.
    """
    if device_type != "cuda":
        yield
        return
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        in_fp32 = query.dtype == torch.float32 and not torch.is_autocast_enabled(query.device.type)
        if in_fp32 and enable_gqa and query.shape[-3] != key.shape[-3]:
            return torch.ops.aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    with _replaced(functional, "scaled_dot_product_attention", attention):
        yield


class _Int8MatmulAsOnCuda(torch.autograd.Function):
    """bitsandbytes' MatMul8bitLt forward (bitsandbytes.autograd._functions, 0.50) as CUDA runs it for a frozen
    int8 base: the input cast to fp16, its outlier check (`outliers.any()`, which makes the host wait for the
    GPU), the row-wise int8 quantization, the int8 product into int32 and its dequantization to fp16, then to
    the input's dtype; the backward is MatMul8bitLt's own. On CPU bitsandbytes runs MatMul8bitFp instead (the
    weight dequantized to the input's dtype, then F.linear), a different set of kernels and transients.
    The outlier columns depend on values, which fake tensors lack: a layer's state carries the share of its
    input's values past the threshold (`outlier_share`, set by _outlier_shares on random weights), whose
    expected columns are taken as CUDA takes them (`argwhere`, another wait; the columns zeroed in the int8
    input; int8_mixed_scaled_mm's 16-bit product of them, added to the output) and kept with their indices
    for backward (subA, idx); without a share none are."""

    @staticmethod
    def forward(ctx, A, B, out, bias, state):
        from harness.predict.kernels import HOST_WAIT, INT8_FORWARD_CALL, mark

        mark(INT8_FORWARD_CALL)
        ops = torch.ops.bitsandbytes
        input_shape = A.shape
        A = A.reshape(-1, A.shape[-1])
        A16 = A.to(torch.float16)
        taken = 0
        if state.threshold > 0.0:
            found = A16.abs() >= state.threshold
            found.any()
            mark(HOST_WAIT, "LLM.int8's outlier check")
            taken = outliers.columns(A.shape[0], A.shape[1], getattr(state, "outlier_share", 0.0))
            if taken:
                found.any(dim=0)
                mark(HOST_WAIT, "LLM.int8's outlier columns (argwhere)")
        idx = torch.empty(taken, dtype=torch.int64, device=A.device)
        CA, SCA, _ = ops.int8_vectorwise_quant.default(A16)
        subA, subB = torch.empty(0, dtype=A.dtype, device=A.device), None
        if taken:
            CA[:, idx] = 0
            subA = A[:, idx]
            subB = ops.int8_vectorwise_dequant.default(state.CB[:, idx].contiguous(), state.SCB).to(A.dtype).t()
        output = ops.int8_mm_dequant.default(ops.int8_linear_matmul.default(CA, state.CB), SCA, state.SCB,
                                             dtype=torch.float16).to(A.dtype)
        if subB is not None:
            output = output.addmm(subA, subB)
        if bias is not None:
            output = output.add_(bias)
        state.idx = idx
        ctx.is_empty = False
        ctx.state, ctx.grad_shape, ctx.dtype_A = state, input_shape, A.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        ctx.tensors = (None, subA, A)
        ctx.tensor_states = (None, idx)
        return output.reshape(*input_shape[:-1], state.CB.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        from bitsandbytes.autograd._functions import MatMul8bitLt

        return MatMul8bitLt.backward(ctx, grad_output)


@contextmanager
def _cuda_int8_matmul(device_type: str):
    """LLM.int8's matmul as CUDA runs it (_Int8MatmulAsOnCuda): int8 kernels, its output in the input's dtype
    (fp32 after k-bit preparation's fp32 norms), with no autocast rule; on CPU bitsandbytes dequantizes and
    calls F.linear, which autocast turns to 16 bits. Both save the input for backward."""
    if device_type != "cuda":
        yield
        return
    import bitsandbytes as bnb

    original = bnb.matmul

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        if state is None or state.CB is None or state.has_fp16_weights:
            with torch.autocast(A.device.type, enabled=False):
                return original(A, B, out, state, threshold, bias)
        if threshold > 0.0:
            state.threshold = threshold
        with torch.autocast(A.device.type, enabled=False):
            return _Int8MatmulAsOnCuda.apply(A, B, out, bias, state)

    with _replaced(bnb, "matmul", matmul):
        yield


def _dequantize_and_multiply(A, B, quant_state, bias):
    """bitsandbytes' 4-bit product as CUDA computes it in training: `_dequant_linear_fallback`
    (bitsandbytes/backends/cuda/ops.py, 0.50), the path its `gemm_4bit` takes past 1,536 rows on every CUDA card,
    past 512 for a weight of 4M elements or more, and past 48 on sm90 (H100, H200; `_gemm_4bit_use_custom_cuda`);
    at fewer rows other architectures may pick its fused kernel, which this stands in for too. A nested
    quantization's 8-bit absmax is dequantized to fp32 and its offset added (both held to the end, as there),
    the weight dequantized to the input's dtype, then F.linear. The CPU's gemm_4bit is one fused op that
    allocates neither the absmax nor the weight."""
    ops = torch.ops.bitsandbytes
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        absmax_dq = ops.dequantize_blockwise.default(absmax, state2.absmax, state2.code, state2.blocksize,
                                                     torch.float32)
        absmax = absmax_dq + quant_state.offset
    weight = ops.dequantize_4bit.default(B.view(-1, 1), absmax, quant_state.blocksize, quant_state.quant_type,
                                         quant_state.shape, A.dtype)
    return torch.nn.functional.linear(A, weight, bias)


class _MatMul4BitAsOnCuda(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit (bitsandbytes.autograd._functions, 0.50) with CUDA's forward
    (_dequantize_and_multiply); it saves what MatMul4Bit saves and its backward is MatMul4Bit's own (the weight
    dequantized again, then the input's gradient)."""

    @staticmethod
    def forward(ctx, A, B, out, bias, quant_state):
        output = _dequantize_and_multiply(A, B, quant_state, bias)
        ctx.is_empty = False
        ctx.state = quant_state
        ctx.dtype_A, ctx.dtype_B, ctx.dtype_bias = A.dtype, B.dtype, None if bias is None else bias.dtype
        ctx.tensors = (None, B.view(-1, 1) if any(ctx.needs_input_grad[:2]) else None)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        from bitsandbytes.autograd._functions import MatMul4Bit

        return MatMul4Bit.backward(ctx, grad_output)


@contextmanager
def _cuda_matmul_4bit(device_type: str):
    """bitsandbytes' 4-bit matmul as CUDA runs it (_MatMul4BitAsOnCuda; without a gradient, its forward alone):
    the kernels a CUDA step launches and the absmax and weight it dequantizes in forward, which the CPU's fused
    op does not allocate."""
    if device_type != "cuda":
        yield
        return
    import bitsandbytes as bnb

    original = bnb.matmul_4bit

    def matmul_4bit(A, B, quant_state, out=None, bias=None):
        if (quant_state is None or len(quant_state.shape) != 2 or A.shape[-1] != quant_state.shape[1]
                or out is not None or A.numel() == 0):
            return original(A, B, quant_state, out, bias)  # its own checks, edge cases and older layouts
        if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
            return _MatMul4BitAsOnCuda.apply(A, B, out, bias, quant_state)
        return _dequantize_and_multiply(A, B, quant_state, bias)

    with _replaced(bnb, "matmul_4bit", matmul_4bit):
        yield


BNB_OPTIMIZER_MODULE = "bitsandbytes.optim.optimizer"


@contextmanager
def _cuda_optimizer_sync(device_type: str):
    """bitsandbytes' 8-bit and paged optimizers synchronize after each parameter they step: Optimizer8bit.step
    calls `sync_gpu(p)` after every `update_step` (bitsandbytes/optim/optimizer.py, 0.50), which is
    torch.cuda.synchronize() for a CUDA tensor and nothing for the trace's CPU ones. So the host waits for the
    GPU there (a HOST_WAIT mark for the kernel recorder): the optimizer's launches cannot run ahead of its
    kernels, and a step in backward (optimizer_in_backward) cannot queue the backward's next kernels while the
    GPU computes."""
    if device_type != "cuda":
        yield
        return
    from harness.predict.kernels import HOST_WAIT, mark

    module = importlib.import_module(BNB_OPTIMIZER_MODULE)
    original = module.sync_gpu

    def sync_gpu(tensor):
        mark(HOST_WAIT, "bitsandbytes' optimizer synchronizes after each parameter")
        return original(tensor)

    with _replaced(module, "sync_gpu", sync_gpu):
        yield


@contextmanager
def _unpacked_sequences():
    """transformers checks position ids for packed sequences by reading their values; with
    fake values it assumes packing and builds an explicit mask (which also turns off SDPA's
    grouped-query path). The harness never packs: every sequence is one window with
    positions 0..s-1, which a real run finds and answers with None, as this does.
    """
    from transformers import masking_utils

    with _replaced(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def _offloading(model, cfg, tracker: TensorTracker):
    """TRL's OffloadActivations itself on the fake CPU tensors, its host copies counted as host memory.

    It needs an accelerator to offload from: it is built as if the CPU were one, on one stream
    (CUDA streams do not exist here) and without pinned memory. Its host copies (empty_like on the
    CPU) are counted as host memory, and each tensor it brings back in backward is a device copy,
    as on a GPU. What its streams change (trl/models/activation_offloading.py, `pack_tensor` and
    `unpack_tensor_with_streams`, which a GPU run uses) is done here as they do it: the device
    tensors of the last `max_fwd_stash_size` saves (tensor ids) that were offloaded stay alive in
    its forward stash until their copies are done; a storage saved again while stashed is not
    copied again but kept on the device (log_softmax's output, which nll_loss saves too); and a
    tensor still stashed when backward asks for it is handed back from the device, nothing coming
    back from the host, the stash being emptied after the first backward node that unpacks one. A
    tensor brought back is allocated on TRL's side stream (`with self.device_module.stream(self.s1)`),
    so the caching allocator gives it blocks of that stream's own segments.
    The kernel recorder sees the copies to and from the host as copies over the host link (TO_HOST,
    FROM_HOST), which the speed model runs on the side stream.
    """
    if not cfg.activation_offloading:
        return None
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    with _replaced(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("cpu")):
        context = get_act_offloading_ctx_manager(model, use_pin_memory=False, use_streams=False)
    pack, unpack = context.pack_hook, context.unpack_hook
    stash = {}  # the streams' forward stash: tensor id -> the device tensor kept alive
    stash_size = inspect.signature(type(context).__init__).parameters["max_fwd_stash_size"].default

    def pack_to_host(tensor):
        storage = tensor.untyped_storage()
        if any(kept.untyped_storage() is storage for kept in stash.values()):
            return (tensor,)  # kept on the device
        with tracker.copying_to_host(), over_host_link(TO_HOST, torch.ops.aten.copy_.default):
            key = pack(tensor)
        if context.tracker[key][1]:  # offloaded
            for old in [old for old in stash if old <= key - stash_size]:
                del stash[old]
            stash[key] = tensor
        return key

    def unpack_to_device(key):
        if isinstance(key, tuple):
            return key[0]
        offloaded = context.tracker[key][1]
        tensor = unpack(key)
        if offloaded:
            torch._C._current_autograd_node().register_hook(lambda outputs, inputs: stash.clear())
        if key in stash:
            return stash[key]
        if not tracker.on_host(tensor):
            return tensor
        with over_host_link(FROM_HOST, torch.ops.aten.clone.default), tracker.on_side_stream():
            return tensor.clone()

    context.pack_hook, context.unpack_hook = pack_to_host, unpack_to_device
    context.device_module = _CpuAsAccelerator()
    return context


class _CpuAsAccelerator:
    """torch.cpu where TRL's offloading calls its accelerator's module (the CPU has no cache to empty)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def empty_cache():
        pass


# What FSDP2's CPUOffloadPolicy keeps in host memory: the shards, their gradients, the optimizer state.
OFFLOADED = ("weights", "gradients", "optimizer_state")


@contextmanager
def _sharded_over(cfg, tracker: TensorTracker | None):
    """For a sharded experiment, torch's fake process group of cfg.world_size ranks, its mesh, and the
    tracker's view of FSDP2's collectives (fsdp2_tracking); otherwise nothing (mesh None).

    One process stands for rank 0 of all of them: collectives return at once, every tensor has rank
    0's shape. A CPU mesh cannot offload to a CPU, so a simulated offload runs on the device and its
    shards, gradients and optimizer state are then counted as host memory (OFFLOADED); what a GPU
    also holds for a moment (a layer's shards copied in before their all-gather, a layer's reduced
    gradients before their copy to the host) is left out.
    """
    if cfg.sharding == "none":
        yield None
        return
    with sharding.fake_ranks(cfg.world_size) as mesh, (fsdp2_tracking(tracker) if tracker else nullcontext()):
        yield mesh


@contextmanager
def _liger():
    """harness.predict.liger's stand-ins where the runner applies Liger's kernels (models.apply_liger)."""
    from harness.predict.liger import liger_stand_ins
    from harness.step import models

    with liger_stand_ins() as apply:
        with _replaced(models, "apply_liger", apply):
            yield


@contextmanager
def fake_step(technique: Technique, cfg, device_type: str, tracker: TensorTracker | None = None):
    """Fake tensors, with everything above that a step of `device_type` needs to run on them (a sharded
    experiment's fake process group too, whose mesh it yields; None otherwise). `tracker`: the one that
    will count the step, which a sharded step's collectives report to."""
    blocked = not_simulated(cfg, technique)
    if blocked:
        raise NotSimulated("not simulated (" + "; ".join(blocked) + "); the analytic method predicts it")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with (_sharded_over(cfg, tracker) as mesh, _real_code_books(technique), _unpacked_sequences(),
          _cuda_dropout(device_type), _cuda_attention(device_type), _cuda_int8_matmul(device_type),
          _cuda_matmul_4bit(device_type), _cuda_optimizer_sync(device_type), _cuda_autocast(device_type),
          _liger(), mode, _swappable_fake_tensors(mode)):
        yield mesh


@contextmanager
def _compiled_torchao_step(technique: Technique, tracker: TensorTracker, device_type: str):
    """torchao's low-bit AdamW steps each parameter with `torch.compile(single_param_adam, fullgraph=True)`
    (torchao/optim/adam.py). A dispatch mode cannot be compiled, so the trace runs it eager, where each
    dequantized state and each intermediate is a tensor. On CUDA the compiled code holds only the buffers it
    allocates (the optimizer's `step_buffers`, for a parameter whose states are quantized): the tracker
    counts the eager call as one fused kernel (TensorTracker.fused) with those buffers alive through it. On
    CPU the lab's figure is the tracked eager step itself, which this leaves as it is."""
    step_buffers = OPTIMIZERS[technique.optimizer].step_buffers
    if device_type != "cuda" or step_buffers is None:
        yield
        return
    module = importlib.import_module(TORCHAO_MODULE)
    original = module.single_param_adam

    def fused(p, grad, step, exp_avg, *args, **kwargs):
        quantized = is_traceable_wrapper_subclass(exp_avg)
        buffers = torch.empty(step_buffers(p.numel()) if quantized else 0, dtype=torch.uint8, device=p.device)
        with tracker.fused():
            result = original(p, grad, step, exp_avg, *args, **kwargs)
        del buffers
        return result

    with _replaced(module, "single_param_adam", fused):
        yield


@contextmanager
def _cache_emptied_by_kbit_preparation(tracker: TensorTracker, emptied_at: list[int]):
    """peft's prepare_model_for_kbit_training empties the CUDA cache after casting the parameters that are
    not quantized to fp32 (peft/utils/other.py: `auto_clear_cache`, on by default, calls
    torch.cuda.empty_cache() where CUDA is available). A CPU trace never calls it: when it returns, the
    tracker's counter is kept as the point where a CUDA run empties its cache."""
    import peft

    original = peft.prepare_model_for_kbit_training

    def prepare(*args, **kwargs):
        model = original(*args, **kwargs)
        if kwargs.get("auto_clear_cache", True):
            emptied_at.append(tracker.counter)
        return model

    with _replaced(peft, "prepare_model_for_kbit_training", prepare):
        yield


@contextmanager
def _paged_state(technique: Technique, tracker: TensorTracker, device_type: str):
    """bitsandbytes' paged optimizers take a state buffer of a large parameter from CUDA unified memory
    (Optimizer8bit.get_state_buffer: functional.get_paged, cudaMallocManaged; PAGED_MIN_ELEMENTS), which the
    caching allocator never holds; for a CPU parameter, as every fake one is, they take a plain tensor. On
    CUDA each buffer CUDA would page is marked so (TensorTracker.mark_unified): counted as a tensor, as the
    GPU's tracked step counts it, left out of the allocator's replay, held in the UVM driver's batches."""
    if device_type != "cuda" or not OPTIMIZERS[technique.optimizer].paged:
        yield
        return
    from bitsandbytes.optim.optimizer import Optimizer8bit

    def get_state_buffer(self, p, dtype=torch.float32):
        buffer = torch.zeros_like(p, dtype=dtype)  # the managed buffer's stand-in, or the plain state CUDA makes
        if self.is_paged and p.numel() >= PAGED_MIN_ELEMENTS:
            tracker.mark_unified(buffer)
        return buffer

    with _replaced(Optimizer8bit, "get_state_buffer", get_state_buffer):
        yield


def allocator_events(tracker: TensorTracker, device_type: str, emptied_at: list[int] = ()) -> list[tuple]:
    """Every device storage the tracker saw, as the caching allocator sees it: (+bytes, key, stream) when
    it is born and (-1, key) when it dies, in the order they happened (one counter orders both).

    On CUDA, cuBLAS takes a workspace from the caching allocator for each (handle, stream) the first time
    it multiplies there (aten/src/ATen/cuda/CublasHandlePool.cpp, getCurrentCUDABlasHandle and
    getCUDABlasLtWorkspace), which no tensor stands for: one on the first forward's thread and one on
    autograd's backward thread, born where the tracker's forward and backward phases first allocate.
    `emptied_at`: tracker counters after which torch.cuda.empty_cache() ran (allocator.EMPTY_CACHE).
    A storage born on a side stream keeps that stream on CUDA only: a CPU has one. Host memory and unified
    memory (_paged_state) are not the allocator's."""
    cuda = device_type == "cuda"
    timed = [(counter + 0.5, *caching_allocator.EMPTY_CACHE) for counter in emptied_at] if cuda else []
    for index, record in enumerate(tracker.history):
        if record.host or record.unified:
            continue
        timed.append((record.born, record.nbytes, index, record.stream if cuda else 0))
        if record.died is not None:
            timed.append((record.died, -1, index))
    if cuda:
        for phase in WORKSPACE_PHASES:
            first = next((r.born for r in tracker.history if r.phase == phase and not r.host), None)
            if first is not None:
                timed.append((first - 0.5, CUBLAS_WORKSPACE_BYTES, f"cublas workspace ({phase})"))
    timed.sort(key=lambda event: event[0])
    return [event[1:] for event in timed]


def _outlier_shares(model, source: ModelSource, device_type: str, random_weights: bool) -> None:
    """Give each LLM.int8 layer's state the share of its input's values past its threshold on the lab's
    random weights (harness.predict.outliers), which _Int8MatmulAsOnCuda turns into outlier columns. Only
    CUDA takes columns apart; trained weights get none (their outliers sit in a few feature dimensions),
    and so does a family harness.architectures does not describe (its layers' roles are unknown)."""
    if device_type != "cuda" or not random_weights:
        return
    kinds = tuple(layer for layer, quantization in quantized_layers().items() if quantization.saves_input)
    layers = [(name, module) for name, module in model.named_modules() if kinds and isinstance(module, kinds)]
    if not layers:
        return
    from harness.architectures import UnsupportedArchitecture
    from harness.predict.analytic import shape_of

    try:
        shape = shape_of(source.config)
    except UnsupportedArchitecture:
        return
    for name, module in layers:
        own = [part for part in name.split(".") if part != "base_layer"][-1]  # peft's wrapper keeps the name
        kind = outliers.INPUT_KIND[outliers.role_of(own, module.in_features, shape)]
        module.state.outlier_share = outliers.value_share(kind, shape, module.state.threshold)


def _phase(tracker: TensorTracker, recorder, name: str):
    if recorder is not None:
        recorder.phase = name
    return tracker_phase(tracker, name)


def simulate_step(source: ModelSource, technique: Technique, cfg, seq_len: int, micro_batch: int,
                  device_type: str = "cuda", steps: int = 2, expandable_segments: bool = False,
                  cap_bytes: int | None = None, recorder=None, random_weights: bool | None = None) -> dict:
    """Peak and per-category bytes of a training step at full size, without memory.

    Runs `steps` steps (the first creates the optimizer state) and measures the last, as the
    runner's tracked step does. device_type picks what the builders pick for that device.
    recorder: a harness.predict.kernels.KernelRecorder that records the last step's kernels.
    random_weights: the step runs on random weights, not trained ones (None: as a run of the source does).
    """
    started = time.perf_counter()
    tracker = TensorTracker()
    device = torch.device("cpu")
    emptied_at: list[int] = []
    with (fake_step(technique, cfg, device_type, tracker) as mesh, tracker,
          _cache_emptied_by_kbit_preparation(tracker, emptied_at),
          _compiled_torchao_step(technique, tracker, device_type), _paged_state(technique, tracker, device_type),
          (recorder or nullcontext())):
        model, optimizer, _ = build_training(source, technique, cfg, device, optimizer_device=device_type, mesh=mesh)
        _outlier_shares(model, source, device_type, source.random_init if random_weights is None else random_weights)
        load_peak, loaded = tracker.peak, tracker.counter
        saved_tensors = _offloading(model, cfg, tracker)
        progress = Progress()
        for step in range(steps):
            micro_batches = [torch.randint(0, source.config.vocab_size, (micro_batch, seq_len), device=device)
                             for _ in range(cfg.grad_accum)]
            last = step == steps - 1
            if last:
                label_model(tracker, model, optimizer)
                tracker.reset_peak()
                measured_from = tracker.counter
            if recorder is not None:
                recorder.recording = last
            train_step(model, optimizer, micro_batches, technique.autocast, None, progress,
                       lambda name: _phase(tracker, recorder, name),
                       after_backward=(lambda: label_gradients(tracker, model)) if last else None,
                       saved_tensors=saved_tensors)
        if recorder is not None:
            recorder.recording = False
        if cfg.cpu_offload and device_type == "cuda":  # a CPU's step has one memory: nothing to offload to
            load_peak = tracker.move_to_host(OFFLOADED, measured_from, loaded)
    allocator = caching_allocator.replay(allocator_events(tracker, device_type, emptied_at),
                                         expandable_segments=expandable_segments)
    reserved = {"reserved_bytes": allocator.peak_reserved,
                "allocator": "expandable_segments" if expandable_segments else "default",
                "allocator_allocated_bytes": allocator.peak_allocated}  # kept in the prediction's extra
    if device_type == "cuda":
        reserved["unified_bytes"] = tracker.unified_bytes()
        reserved["device_bytes"] = device_bytes(allocator.peak_reserved, technique, reserved["unified_bytes"])
        if cap_bytes or cfg.budget_gb:
            # the same step under an allocator cap (given, or the budget's): the allocator frees its cache
            # and retries before it runs out (DeviceCachingAllocator::malloc)
            from harness.measure.budget import budget_cap_bytes

            cap = cap_bytes or budget_cap_bytes(cfg.budget_gb, "cuda", technique)
            capped = caching_allocator.replay(allocator_events(tracker, device_type, emptied_at), cap_bytes=cap,
                                              expandable_segments=expandable_segments)
            reserved["budget_replay"] = {"cap_bytes": cap, "peak_reserved": capped.peak_reserved,
                                         "retries": capped.retries, "oom": capped.oom and {
                                             "requested": capped.oom.requested, "allocated": capped.oom.allocated,
                                             "reserved": capped.oom.reserved}}
    return {
        **reserved,
        "method": "simulated",
        "total_bytes": max(tracker.peak, load_peak),
        "categories": tracker.breakdown_at_peak(),
        "persistent": tracker.totals_by_category(),
        "host_bytes": tracker.host_peak,
        "phase_peaks": dict(tracker.phase_peaks),
        "seconds": time.perf_counter() - started,
        "device_type": device_type,
    }
