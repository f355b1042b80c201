"""The kernels of a training step, enumerated: the runner's own step under fake tensors, every aten op
it dispatches recorded with the FLOPs its matrix products do and the bytes it reads and writes.

`KernelRecorder` is a `TorchDispatchMode` entered inside the simulation's `FakeTensorMode`
(harness.predict.simulate.fake_step): it sees each op before the fake mode runs it, so the ops are
those the step itself dispatches, at full size, without memory or a GPU. FLOPs come from torch's own
formulas (`torch.utils.flop_counter.flop_registry`, what `FlopCounterMode` counts); the CPU's
flash-attention op, which a CUDA step would not call but a CPU trace does, is counted with the same
formulas as CUDA's flash attention. Bytes are the sizes of the op's tensor inputs and outputs.

torchao's low-bit AdamW compiles its per-parameter step (torchao.optim.adam: `torch.compile(single_param_adam,
fullgraph=True)`), which the simulation runs eager: its dozens of eager ops are recorded as the one fused
kernel Inductor makes of them (TORCHAO_STEP), reading its tensors once and writing the parameter and the
states.

What is not a kernel is left out: views and metadata ops (no data moves), and allocations without a
fill (`empty`). What a fake trace cannot show: the CUDA code path's own choices where they differ from
the CPU's (fused kernels torch picks by device), and custom ops without a CPU form run as their
decomposition; harness.predict.speed says how each kind is costed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# Ops that launch nothing: they make a new view or read metadata, or allocate without writing
# (`prim::` ops, such as the device a tensor is on, are left out the same way).
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.detach.default, aten.alias.default, aten.lift_fresh.default,
             aten._local_scalar_dense.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
             aten.sym_storage_offset.default, aten.is_same_size.default, aten.set_.source_Storage_storage_offset,
             aten._unsafe_view.default}
# The CPU's flash attention: a CUDA step runs flash (or memory-efficient) attention instead, whose
# FLOPs torch's registry counts with these formulas.
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default: "forward",
                 aten._scaled_dot_product_flash_attention_for_cpu_backward.default: "backward"}


@dataclass
class Kernel:
    op: str
    flops: int          # matrix-product and attention FLOPs (0 for the rest)
    bytes: int          # bytes of the tensors it reads, and writes (an input it mutates counts twice)
    dtype: str          # the dtype of its first tensor input (what a matrix product computes in)
    phase: str
    fp32_elements: int = 0  # its first tensor argument's elements, in fp32 units (what an optimizer step updates)


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _mutated_bytes(func, args, kwargs) -> int:
    """Bytes of the arguments the op writes in place (its schema's `Tensor(a!)`): written after being read."""
    total = 0
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            total += _bytes(_tensors(value))
    return total


def _fp32_elements(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() // 4 for t in tensors)


def _flops(func, args, kwargs, out) -> int:
    if func.name() == INT8_MATMUL:  # A (rows x k) times B (n x k) transposed
        return 2 * (args[0].numel() // args[0].shape[-1]) * args[0].shape[-1] * args[1].shape[0]
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if func in CPU_ATTENTION:
        query, key, value = args[:3] if CPU_ATTENTION[func] == "forward" else args[1:4]
        if CPU_ATTENTION[func] == "forward":
            return int(sdpa_flop_count(query.shape, key.shape, value.shape))
        return int(sdpa_backward_flop_count(args[0].shape, query.shape, key.shape, value.shape))
    return 0


# LLM.int8's product (int8 x int8 into int32; harness.predict.simulate traces CUDA's path to it)
INT8_MATMUL = "bitsandbytes::int8_linear_matmul"
# Not kernels, marks in the recorded sequence (no bytes, no FLOPs; harness.predict.speed costs them):
# the host waits here until the GPU has run every kernel issued before (a value read back, such as
# `if tensor.any():`), so it cannot run ahead of the GPU past this point;
HOST_WAIT = "host waits for the GPU"
# the Python work of one LLM.int8 forward (bitsandbytes' MatMul8bitLt.forward and its custom ops' dispatch),
# beyond the launches of the kernels it records.
INT8_FORWARD_CALL = "LLM.int8 forward call"
MARKS = (HOST_WAIT, INT8_FORWARD_CALL)
# Copies over the host link (activation offloading's: harness.predict.simulate._offloading), each by the bytes
# it moves once; harness.predict.speed runs them on the offloading's side stream.
TO_HOST, FROM_HOST = "copy to host", "copy from host"
LINK_COPIES = (TO_HOST, FROM_HOST)


def _record(make) -> None:
    """Append `make(phase)` to every recorder active (outside a fused region)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, KernelRecorder) and mode.recording and not mode._fused:
            mode.kernels.append(make(mode.phase))


def mark(op: str, why: str = "") -> None:
    """Put the mark `op` (one of MARKS) into every recorder active. Fake tensors have no values and a traced
    step runs no library's own host code, so a stand-in for that code says where these happen."""
    _record(lambda phase: Kernel(op, 0, 0, why, phase))


@contextmanager
def over_host_link(direction: str, copy_op):
    """While open, every recorder active records `copy_op` (the aten op that copies a tensor between device
    and host) as a copy over the host link in `direction` (TO_HOST or FROM_HOST), by its source's bytes."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    recorders = [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, KernelRecorder)]
    for recorder in recorders:
        recorder.link = (direction, copy_op)
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.link = None


def launch(op: str, read: list[torch.Tensor], written: list[torch.Tensor], flops: int = 0) -> None:
    """Record a kernel a stand-in stands for without running it (a Triton kernel of Liger's, which does not
    run on fake tensors): it reads `read` and writes `written` (a tensor in both, written in place, counts
    twice), and computes in the first one's dtype."""
    first = (read or written)[0]
    dtype = _DTYPE_NAMES.get(first.dtype, str(first.dtype))
    _record(lambda phase: Kernel(op, flops, _bytes(read) + _bytes(written), dtype, phase))


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8",
                torch.uint8: "int8"}


TORCHAO_STEP = "torchao::single_param_adam"  # [its states' class], e.g. [OptimState8bit]
TORCHAO_MODULE = "torchao.optim.adam"


def _plain_tensors(tree) -> list[torch.Tensor]:
    """The plain tensors of `tree`, a tensor subclass (torchao's quantized states) by the tensors it holds."""
    found = []
    for tensor in _tensors(tree):
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor and not isinstance(
                tensor, torch._subclasses.fake_tensor.FakeTensor):
            names, _ = tensor.__tensor_flatten__()
            found += _plain_tensors([getattr(tensor, name) for name in names])
        else:
            found.append(tensor)
    return found


def _torchao_step_kernel(args, phase: str) -> Kernel:
    """torchao's compiled single_param_adam(p, grad, step, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, ...) as one
    kernel: every tensor read once; the parameter and the states written once."""
    written = _plain_tensors([args[0], args[3], args[4], args[5]])
    read = _plain_tensors(list(args[:7]))
    dtype = _DTYPE_NAMES.get(args[0].dtype, str(args[0].dtype))
    return Kernel(f"{TORCHAO_STEP}[{type(args[3]).__name__}]", 0, _bytes(read) + _bytes(written), dtype, phase,
                  _fp32_elements([args[0]]))


class KernelRecorder(TorchDispatchMode):
    """Records each aten op dispatched while `recording` is true, as a Kernel, in order."""

    def __init__(self):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.recording = False
        self.phase = "step"
        self._fused = 0          # inside a fused region (its ops are one kernel, recorded on leaving it)
        self.link = None         # (direction, the aten op that copies over the host link): over_host_link
        self._unpatch = None

    def _fuse_torchao_step(self):
        """Wrap torchao's per-parameter step, once it is imported, so its eager ops record as one kernel."""
        module = sys.modules.get(TORCHAO_MODULE)
        if self._unpatch is not None or module is None or not hasattr(module, "single_param_adam"):
            return
        original = module.single_param_adam

        def fused(*args, **kwargs):
            self._fused += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._fused -= 1
                if self.recording and not self._fused:
                    self.kernels.append(_torchao_step_kernel(args, self.phase))

        module.single_param_adam = fused
        self._unpatch = lambda: setattr(module, "single_param_adam", original)

    def __exit__(self, *exc):
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recording and self._unpatch is None:
            self._fuse_torchao_step()
        if (self.recording and not self._fused and func.namespace != "prim" and func not in NO_KERNEL
                and not getattr(func, "is_view", False)):
            inputs = _tensors((args, kwargs))
            outputs = _tensors(out)
            if self.link is not None and func == self.link[1]:
                source = args[1] if func == aten.copy_.default else args[0]
                self.kernels.append(Kernel(self.link[0], 0, _bytes([source]),
                                           _DTYPE_NAMES.get(source.dtype, str(source.dtype)), self.phase))
            elif inputs or outputs:
                first = (inputs or outputs)[0]
                leading = next((found for found in map(_tensors, args) if found), [])  # its first tensor argument
                self.kernels.append(Kernel(str(func.name()), _flops(func, args, kwargs, out),
                                           _bytes(inputs + outputs) + _mutated_bytes(func, args, kwargs),
                                           _DTYPE_NAMES.get(first.dtype, str(first.dtype)), self.phase,
                                           _fp32_elements(leading)))
        return out
