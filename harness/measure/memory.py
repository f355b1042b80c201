"""Memory measurement: torch's allocator counters on CUDA, live tensor bytes everywhere.

`TensorTracker` is a TorchDispatchMode that sees every tensor an operator creates and
counts the bytes of live storages (weak references with finalizers tell when one dies).
It gives the peak, the peak per phase, and what was alive at the peak by category. It
slows every operator, so it only runs in an untimed step. On CPU it is the memory figure
of the record (no allocator exists to ask); on CUDA it gives the category breakdown
beside the allocator's own peaks.

`CudaMeter` reads `torch.cuda.max_memory_allocated/reserved` and NVML device-used per
phase; these counters cost nothing, so it runs in the timed steps.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from harness import env
from harness.schema import CATEGORIES, PERSISTENT


@dataclass
class _Storage:
    nbytes: int
    born: int            # allocation counter when it appeared
    phase: str           # phase it appeared in
    died: int | None = None
    category: str | None = None
    host: bool = False   # host memory a GPU step uses (offloaded activations): not device memory
    labelled_by_context: bool = False  # a buffer's label (labelling): an explicit track() replaces it
    stream: int = 0      # the CUDA stream it was allocated on: 0 the compute stream, 1 a side stream
    unified: bool = False  # device memory taken from CUDA unified memory, not from the caching allocator


# What a host copy is made with inside `copying_to_host` (TRL's offloading: torch.empty_like on the
# CPU, then copy_); anything else made there (a contiguous clone first) is device memory.
_HOST_COPY_OPS = {torch.ops.aten.empty_like.default, torch.ops.aten.empty.memory_format,
                  torch.ops.aten.empty_strided.default}


class TensorTracker(TorchDispatchMode):
    """Counts live tensor storage bytes; optionally raises OutOfMemoryError past a cap.

    On a GPU step (device_type "cuda") storages on the CPU are host memory: counted apart, in
    host_peak. A simulation's fake tensors are all CPU tensors, so it says where host copies are
    made instead (copying_to_host).
    """

    def __init__(self, cap_bytes: int | None = None, device_type: str | None = None):
        super().__init__()
        self.cap_bytes = cap_bytes
        self.device_type = device_type
        self.host_current = self.host_peak = 0
        self._copying_to_host = 0
        self._stream = 0
        self._context_category: str | None = None
        self._in_collective = False
        self.storages = WeakIdKeyDictionary()
        self.history: list[_Storage] = []
        self.counter = 0
        self.current = 0
        self.peak = 0
        self.peak_at = 0
        self.phase = "load"
        self.phase_peaks: dict[str, int] = {}

    def __enter__(self):
        # torch.compile cannot trace under a dispatch mode (fullgraph callers, such as torchao's
        # optimizers, fail): while counting, compiled code runs eager, and a tracked step's
        # breakdown is eager's.
        self._eager = torch.compiler.set_stance("force_eager")
        self._eager.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._eager.__exit__(*exc)

    # -- bookkeeping -------------------------------------------------------------
    def _register(self, storage, category: str | None = None, host: bool = False) -> _Storage:
        record = self.storages.get(storage)
        if record is not None:
            if category and (record.category is None or record.labelled_by_context):
                record.category, record.labelled_by_context = category, False
            return record
        return self._born(storage, category, host)

    def _born(self, storage, category: str | None, host: bool) -> _Storage:
        self.counter += 1
        host = host or (self.device_type == "cuda" and storage.device.type == "cpu")
        by_context = category is None and self._context_category is not None
        record = _Storage(storage.nbytes(), self.counter, self.phase, category=category or self._context_category,
                          host=host, labelled_by_context=by_context, stream=self._stream)
        self.storages[storage] = record
        self.history.append(record)
        weakref.finalize(storage, self._release, record)
        if host:
            self.host_current += record.nbytes
            self.host_peak = max(self.host_peak, self.host_current)
            return record
        self.current += record.nbytes
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, self.counter
        if self.cap_bytes is not None and self.current > self.cap_bytes:
            raise torch.OutOfMemoryError(
                f"tracked tensor bytes {self.current} exceed the memory cap of {self.cap_bytes} bytes "
                f"(phase {self.phase})")
        return record

    def _release(self, record: _Storage) -> None:
        if record.died is not None:  # resized to nothing before the storage itself died
            return
        self.counter += 1
        record.died = self.counter
        if record.host:
            self.host_current -= record.nbytes
        else:
            self.current -= record.nbytes

    def resized(self, storage) -> None:
        """A storage whose bytes changed in place (FSDP2 frees an unsharded parameter by resizing its
        storage to 0 bytes and allocates it again by resizing it back, outside the dispatcher): its
        old size dies and its new size is born, so that the history stays one interval per size."""
        record = self.storages.get(storage)
        if record is not None and record.nbytes == storage.nbytes():
            return
        if record is not None:
            self._release(record)
            del self.storages[storage]
        if storage.nbytes():
            self._born(storage, record.category if record is not None else None, record is not None and record.host)

    @contextmanager
    def inside_collective(self):
        """Storages first seen here are a collective's staging, its backend's business, not the step's: gloo
        reduce-scatters a copy of its input (seen only when its result is split), NCCL's buffers are outside
        torch's allocator."""
        self._in_collective = True
        try:
            yield
        finally:
            self._in_collective = False

    @contextmanager
    def labelling(self, category: str):
        """Storages born here belong to `category` unless a later track() says otherwise."""
        outer, self._context_category = self._context_category, category
        try:
            yield
        finally:
            self._context_category = outer

    def move_to_host(self, categories: tuple[str, ...], since: int, loaded: int) -> int:
        """Count `categories` as host memory, and the device and host peaks since counter `since` again
        (a simulated offload: the shards, their gradients and the optimizer state live on the host).
        Returns the device peak up to counter `loaded` (the model built) without them."""
        for record in self.history:
            if record.category in categories and not record.host:
                record.host = True
                if record.died is None:
                    self.current -= record.nbytes
                    self.host_current += record.nbytes
        on_device = [r for r in self.history if not r.host]
        self.peak, self.peak_at = _replay(on_device, since)
        self.host_peak = _replay([r for r in self.history if r.host], since)[0]
        return _replay(on_device, 0, until=loaded)[0]

    @contextmanager
    def copying_to_host(self):
        """Tensors allocated here by _HOST_COPY_OPS are host memory (a simulated offload)."""
        self._copying_to_host += 1
        try:
            yield
        finally:
            self._copying_to_host -= 1

    @contextmanager
    def on_side_stream(self):
        """Storages born here are allocated on a side stream (a simulated `torch.cuda.stream(s1)` block):
        the caching allocator keeps their blocks apart from the compute stream's."""
        outer, self._stream = self._stream, 1
        try:
            yield
        finally:
            self._stream = outer

    @contextmanager
    def fused(self):
        """Ops that run as one compiled kernel: the storages they make and free in between never hold device
        memory (the kernel keeps those values in registers) and leave the history; those still alive at the end
        join the live bytes and the peaks there, and keep in the history the moment each was made."""
        start, before = len(self.history), (self.current, self.peak, self.peak_at, dict(self.phase_peaks))
        try:
            yield
        finally:
            kept = [record for record in self.history[start:] if record.died is None]
            self.history[start:] = kept
            self.current, self.peak, self.peak_at, self.phase_peaks = before
            self.current += sum(record.nbytes for record in kept if not record.host)
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
            if self.current > self.peak:
                self.peak, self.peak_at = self.current, self.counter

    def mark_unified(self, tensor) -> None:
        """A tensor whose memory on the GPU is CUDA unified memory (a simulated paged buffer): a tensor like
        any other here, which the caching allocator never holds."""
        self.storages[tensor.untyped_storage()].unified = True

    def unified_bytes(self) -> int:
        """Bytes of the live tensors in unified memory."""
        return sum(record.nbytes for record in self.history if record.unified and record.died is None)

    def on_host(self, tensor) -> bool:
        record = self.storages.get(tensor.untyped_storage()) if self._counts(tensor) else None
        return record is not None and record.host

    def track(self, tensors, category: str | None = None) -> None:
        """Count tensors that existed before tracking began (or label known ones)."""
        for tensor in _plain_tensors(tensors):
            if self._counts(tensor):
                self._register(tensor.untyped_storage(), category)

    @staticmethod
    def _counts(tensor) -> bool:
        # Models are built on the meta device first: those tensors hold no memory.
        return isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (the load peak stays in phase_peaks)."""
        self.peak, self.peak_at = self.current, self.counter
        self.host_peak = self.host_current

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._in_collective:
            return out
        host = self._copying_to_host > 0 and func in _HOST_COPY_OPS
        for tensor in _plain_tensors(tree_flatten(out)[0]):
            if self._counts(tensor):
                self._register(tensor.untyped_storage(), host=host)
        return out

    # -- results -----------------------------------------------------------------
    def breakdown_at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak, by category; unlabelled tensors by the phase they appeared in."""
        totals = dict.fromkeys(CATEGORIES, 0)
        for record in self.history:
            alive = record.born <= self.peak_at and (record.died is None or record.died > self.peak_at)
            if alive and not record.host:
                totals[record.category or _category_of_phase(record.phase)] += record.nbytes
        return totals

    def totals_by_category(self) -> dict[str, int]:
        """Bytes of the labelled (persistent) categories, alive now or when they were labelled."""
        totals = dict.fromkeys(PERSISTENT, 0)
        for record in self.history:
            if record.category in totals and not record.host:
                totals[record.category] += record.nbytes
        return totals


def _replay(records: list[_Storage], since: int, until: float = float("inf")) -> tuple[int, int]:
    """The most bytes `records` held at once between counters `since` and `until`, and when."""
    events = sorted([(r.born, r.nbytes) for r in records] + [(r.died, -r.nbytes) for r in records if r.died is not None])
    current = sum(nbytes for when, nbytes in events if when <= since)
    peak, peak_at = current, since
    for when, nbytes in events:
        if since < when <= until:
            current += nbytes
            if current > peak:
                peak, peak_at = current, when
    return peak, peak_at


def _plain_tensors(tensors):
    """The tensors that hold memory: a wrapper subclass (torchao's quantized optimizer states) holds
    none itself, only the tensors it wraps."""
    for tensor in tensors:
        if is_traceable_wrapper_subclass(tensor):
            yield from _plain_tensors(getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        else:
            yield tensor


def _category_of_phase(phase: str) -> str:
    # Tensors created while running forward/backward that are not parameter gradients are
    # activations and their gradients; anything from loading or the optimizer step is other.
    return "activations" if phase in ("forward", "backward") else "other"


def quant_constant_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The quantization constants bitsandbytes keeps beside packed weights."""
    tensors = []
    for param in model.parameters():
        state = getattr(param, "quant_state", None)  # 4-bit: absmax, code, nested absmax/code
        while state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
        scb = getattr(param, "SCB", None)  # int8: one scale per output row
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    for module in model.modules():
        # Linear8bitLt moves the scales from its weight to its matmul state on first use.
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    return tensors


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors of every parameter's state, and those its state objects hold (GaLore's projector
    keeps its projection matrix on an object of its own)."""
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            held = vars(value).values() if hasattr(value, "__dict__") and not isinstance(value, torch.Tensor) else ()
            tensors += [v for v in (value, *held) if isinstance(v, torch.Tensor)]
    return tensors


def label_model(tracker: TensorTracker, model: torch.nn.Module, optimizer=None) -> None:
    """Label the storages of weights, quantization constants and optimizer state."""
    tracker.track(quant_constant_tensors(model), "quant_constants")
    tracker.track(model.parameters(), "weights")
    tracker.track(model.buffers(), "other")
    if optimizer is not None:
        tracker.track(optimizer_state_tensors(optimizer), "optimizer_state")


def label_gradients(tracker: TensorTracker, model: torch.nn.Module) -> None:
    tracker.track((p.grad for p in model.parameters() if p.grad is not None), "gradients")


class CudaMeter:
    """Per-phase peaks from the CUDA caching allocator and NVML device-used bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, int]] = {}
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.nvml_handle = env.nvml_handle(index)

    def device_used(self) -> int | None:
        return env.device_used_bytes(self.nvml_handle)

    @contextmanager
    def phase(self, name: str):
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            seen = self.phases.setdefault(name, {"peak_allocated": 0, "peak_reserved": 0, "peak_device_used": 0})
            seen["peak_allocated"] = max(seen["peak_allocated"], torch.cuda.max_memory_allocated(self.device))
            seen["peak_reserved"] = max(seen["peak_reserved"], torch.cuda.max_memory_reserved(self.device))
            used = self.device_used()
            if used is not None:
                seen["peak_device_used"] = max(seen["peak_device_used"], used)


@contextmanager
def fsdp2_tracking(tracker: TensorTracker):
    """What a tracker needs to count an FSDP2 step (torch's fully_shard), on and around its collectives:

    - FSDP2 frees the unsharded parameters of a layer after its forward and backward by resizing
      their storages to 0 bytes, and allocates them again by resizing them back; these resizes do not
      pass through the dispatcher, so they are reported to the tracker (`resized`).
    - what a collective's backend makes is not the step's (inside_collective);
    - what its all-gathers make (the unsharded parameters of the layers in flight) is labelled
      all_gather, and what its reduce-scatters make, reduce_scatter, unless a later label says
      otherwise (the sharded gradients are views of the reduce-scatter's output: gradients).
    """
    from unittest import mock

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param, _fsdp_param_group

    def reporting(resize):
        def resize_and_report(tensor):
            resize(tensor)
            tracker.resized(tensor.untyped_storage())
        return resize_and_report

    def labelled(function, category):
        def call(*args, **kwargs):
            with tracker.labelling(category):
                return function(*args, **kwargs)
        return call

    def collective(function):
        def call(*args, **kwargs):
            with tracker.inside_collective():
                return function(*args, **kwargs)
        return call

    alloc, free = reporting(_fsdp_param.alloc_storage), reporting(_fsdp_param.free_storage)
    group, comms = _fsdp_param_group, _fsdp_collectives
    patches = [(_fsdp_param, "alloc_storage", alloc), (_fsdp_param, "free_storage", free), (group, "alloc_storage", alloc),
               # a group's unsharding: its all-gather, or at world size 1 its shards cast to the gather dtype
               (group.FSDPParamGroup, "unshard", labelled(group.FSDPParamGroup.unshard, "all_gather")),
               (group.FSDPParamGroup, "wait_for_unshard",
                labelled(group.FSDPParamGroup.wait_for_unshard, "all_gather")),
               (group, "foreach_reduce", labelled(group.foreach_reduce, "reduce_scatter")),
               (comms.DefaultAllGather, "__call__", collective(comms.DefaultAllGather.__call__)),
               (comms.DefaultReduceScatter, "__call__", collective(comms.DefaultReduceScatter.__call__))]
    with ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


@contextmanager
def tracker_phase(tracker: TensorTracker, name: str):
    tracker.set_phase(name)
    yield
