"""PyTorch's CUDA caching allocator, replayed in pure Python over a sequence of allocations and frees.

A step's tensors hold `allocated` bytes; the card must hold the allocator's `reserved` segments, which
are more: every request is rounded, small and large requests live in separate pools of segments of
fixed sizes, a free block is reused only if it is big enough, and a segment is returned to the driver
only when it is wholly free and an allocation could not be had otherwise. This module follows
`c10/cuda/CUDACachingAllocator.cpp` (pytorch/pytorch, DeviceCachingAllocator), function by function:

- `round_size`: every request rounded up to a multiple of kMinBlockSize (512 B);
- `get_pool`: requests of at most kSmallSize (1 MiB) go to the small pool, others to the large;
- `get_allocation_size`: a new segment is kSmallBuffer (2 MiB) for a small request, kLargeBuffer
  (20 MiB) for one under kMinLargeAlloc (10 MiB), else the request rounded up to kRoundLarge (2 MiB);
- `get_free_block`: the best fit, the smallest free block of the pool at least as large (ties: the
  lowest address: BlockComparatorSize orders by stream, size, then address), and of the request's
  stream: a block made for one stream is never handed to another, so each stream has its own
  segments (`get_free_block` fails when the block found is another stream's);
- `should_split`: a block is split when what remains is >= 512 B (small pool, or expandable
  segments) or > 1 MiB (large pool); otherwise the whole block is handed out (and counted allocated);
- `free_block` / `try_merge_blocks`: a freed block merges with free neighbours of its segment;
- `malloc`: no fitting block -> `alloc_block` (a new segment, refused past the cap that
  `set_per_process_memory_fraction` sets: total reserved + new segment > allowed) -> with the
  default max_split_size `release_available_cached_blocks` does nothing -> `release_cached_blocks`
  returns every wholly free segment to the driver and the allocation is tried once more -> else
  OutOfMemoryError ("Tried to allocate <segment size>").

With `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` each pool has one segment whose mapped
pages grow at its end (Note [Expandable Segments] in the same file: 2 MiB pages for the small pool,
20 MiB pages for the large pool; `try_allocate_expandable_block` maps at the lowest place a request
fits, normally the segment's end; `should_split` splits any remainder of >= 512 B). Modelled here:
a request no free block fits maps the pages it lacks past the segment's free tail; under a cap,
`release_cached_blocks` unmaps the whole free pages at the segment's end (those inside it stay mapped
here; see _release_cached_blocks).

Streams: an allocation names the stream it was made on (0, the compute stream, unless the simulation
saw it made under a side stream: TRL's activation offloading brings tensors back on its own). Left out:
`record_stream`, which holds a freed block until the other stream's work recorded on it is done (how
long depends on how far the host runs ahead of the GPU: here it is free at once), CUDA graphs' private
pools, max_split_size, roundup_power2_divisions and garbage_collection_threshold (all unset by default).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

# Constants of c10/cuda/CUDACachingAllocator.cpp (top of the file; kLargeBuffer just above namespace Native).
MIN_BLOCK_SIZE = 512            # kMinBlockSize
SMALL_SIZE = 1 << 20            # kSmallSize: largest "small" request
SMALL_BUFFER = 2 << 20          # kSmallBuffer: small pool segment
LARGE_BUFFER = 20 << 20         # kLargeBuffer: segment for large requests under kMinLargeAlloc
MIN_LARGE_ALLOC = 10 << 20      # kMinLargeAlloc
ROUND_LARGE = 2 << 20           # kRoundLarge
# Note [Expandable Segments]: "we use 2MiB pages for our small pool and 20MiB pages for our large pool".
EXPANDABLE_PAGE = {True: SMALL_BUFFER, False: LARGE_BUFFER}

# PYTORCH_CUDA_ALLOC_CONF's expandable_segments off or on: the settings a prediction can be asked for
SETTINGS = ("default", "expandable_segments")


def round_size(nbytes: int) -> int:
    """DeviceCachingAllocator::round_size (roundup_power2_divisions unset)."""
    if nbytes < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    return MIN_BLOCK_SIZE * -(-nbytes // MIN_BLOCK_SIZE)


def allocation_size(size: int) -> int:
    """DeviceCachingAllocator::get_allocation_size: the segment a rounded request makes."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


class AllocatorOutOfMemory(Exception):
    """What torch.OutOfMemoryError would say: the segment it tried to allocate, allocated and reserved."""

    def __init__(self, requested: int, allocated: int, reserved: int, cap: int | None):
        self.requested, self.allocated, self.reserved, self.cap = requested, allocated, reserved, cap
        super().__init__(f"tried to allocate {requested} bytes with {allocated} allocated and "
                         f"{reserved - allocated} reserved but unallocated (cap {cap})")


@dataclass(eq=False)
class Block:
    address: int
    size: int
    small: bool
    allocated: bool = False
    prev: Block | None = None
    next: Block | None = None
    segment: int = 0
    stream: int = 0

    @property
    def pool(self) -> tuple[int, bool]:
        return (self.stream, self.small)

    def key(self) -> tuple[int, int, int]:
        # BlockComparatorSize: stream (one sorted list per stream here), size, then address.
        return (self.size, self.address, id(self))


@dataclass
class CachingAllocator:
    """The allocator's state and counters; `malloc` returns a block handle, `free` takes it back."""
    cap_bytes: int | None = None          # set_per_process_memory_fraction's allowed_memory_maximum
    expandable_segments: bool = False
    allocated: int = 0                    # stats.allocated_bytes: sizes of handed-out blocks
    reserved: int = 0                     # stats.reserved_bytes: segments (or mapped pages)
    peak_allocated: int = 0
    peak_reserved: int = 0
    segments_allocated: int = 0           # cudaMalloc calls (num_device_alloc)
    retries: int = 0                      # num_alloc_retries: release_cached_blocks then alloc again
    _free: dict = field(default_factory=dict)     # (stream, small) -> sorted keys of its free blocks
    _blocks: dict = field(default_factory=dict)   # id -> Block, free ones
    _next_address: itertools.count = field(default_factory=lambda: itertools.count(1))
    _tails: dict = field(default_factory=dict)    # expandable: (stream, small) -> last mapped block of its segment

    # -- pools -----------------------------------------------------------------------
    def _insert(self, block: Block) -> None:
        bisect.insort(self._free.setdefault(block.pool, []), block.key())
        self._blocks[id(block)] = block

    def _remove(self, block: Block) -> None:
        keys = self._free[block.pool]
        keys.pop(bisect.bisect_left(keys, block.key()))
        del self._blocks[id(block)]

    def _best_fit(self, size: int, pool: tuple[int, bool]) -> Block | None:
        """get_free_block: lower_bound of the request in its stream's pool ordered by (size, address)."""
        keys = self._free.get(pool, [])
        at = bisect.bisect_left(keys, (size, -1, -1))
        if at == len(keys):
            return None
        block = self._blocks[keys[at][2]]
        if self.expandable_segments and block is self._tails.get(pool) and at + 1 < len(keys):
            # the free tail can grow without bound: a mapped block that fits is taken before it
            block = self._blocks[keys[at + 1][2]]
        return block

    # -- malloc ----------------------------------------------------------------------
    def malloc(self, nbytes: int, stream: int = 0) -> Block:
        size = round_size(nbytes)
        pool = (stream, size <= SMALL_SIZE)
        block = self._best_fit(size, pool)
        if block is not None:
            self._remove(block)
        else:
            block = self._new_block(size, pool)
        return self._hand_out(block, size)

    def _new_block(self, size: int, pool: tuple[int, bool]) -> Block:
        """alloc_block, then release_cached_blocks and alloc_block again, else out of memory."""
        grow = self._growth(size, pool)
        if not self._fits(grow):
            self._release_cached_blocks()
            self.retries += 1
            grow = self._growth(size, pool)
            if not self._fits(grow):
                raise AllocatorOutOfMemory(grow, self.allocated,
                                           self.reserved, self.cap_bytes)
        if self.expandable_segments:
            return self._map_pages(grow, pool)
        self.reserved += grow
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segments_allocated += 1
        stream, small = pool
        return Block(next(self._next_address) << 48, grow, small, segment=self.segments_allocated, stream=stream)

    def _growth(self, size: int, pool: tuple[int, bool]) -> int:
        """Bytes a new segment (or, expandable, the pages mapped past the free tail) must add."""
        if not self.expandable_segments:
            return allocation_size(size)
        tail = self._tails.get(pool)
        free_tail = tail.size if tail is not None and not tail.allocated else 0
        page = EXPANDABLE_PAGE[pool[1]]
        return page * -(-(size - free_tail) // page)

    def _fits(self, grow: int) -> bool:
        """alloc_block's check under set_per_process_memory_fraction: total_allocated_memory + size."""
        return self.cap_bytes is None or self.reserved + grow <= self.cap_bytes

    def _map_pages(self, grow: int, pool: tuple[int, bool]) -> Block:
        """try_allocate_expandable_block: the segment's free tail grown by `grow` bytes of pages (one
        expandable segment per stream and pool)."""
        self.reserved += grow
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        tail = self._tails.get(pool)
        if tail is not None and not tail.allocated:
            self._remove(tail)
            tail.size += grow
            return tail
        address = (tail.address + tail.size) if tail is not None else (next(self._next_address) << 48)
        stream, small = pool
        block = Block(address, grow, small, prev=tail, segment=0, stream=stream)
        if tail is not None:
            tail.next = block
        self._tails[pool] = block
        return block

    def _hand_out(self, block: Block, size: int) -> Block:
        """alloc_found_block: split off the remainder when should_split says so."""
        remaining = block.size - size
        split = remaining >= MIN_BLOCK_SIZE if (block.small or self.expandable_segments) else remaining > SMALL_SIZE
        if split:
            rest = Block(block.address + size, remaining, block.small, prev=block, next=block.next,
                         segment=block.segment, stream=block.stream)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            if self._tails.get(block.pool) is block:
                self._tails[block.pool] = rest
            self._insert(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    # -- free ------------------------------------------------------------------------
    def free(self, block: Block) -> None:
        """free_block: merge with free neighbours (try_merge_blocks), back into the pool."""
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove(neighbour)
                if neighbour is block.prev:
                    block.address, block.prev = neighbour.address, neighbour.prev
                    if block.prev is not None:
                        block.prev.next = block
                else:
                    block.next = neighbour.next
                    if block.next is not None:
                        block.next.prev = block
                    if self._tails.get(block.pool) is neighbour:
                        self._tails[block.pool] = block
                block.size += neighbour.size
        self._insert(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache (emptyCache): release_cached_blocks."""
        self._release_cached_blocks()

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks: every free block that is a whole segment goes back to the driver
        (release_blocks). With expandable segments, the whole free pages at the end of each pool's
        segment are unmapped (unmap_block); free pages inside the segment stay mapped here (torch
        unmaps those too and maps them again at the lowest address that fits: not modelled)."""
        for pool in sorted(set(self._free) | set(self._tails)):
            if self.expandable_segments:
                tail = self._tails.get(pool)
                if tail is None or tail.allocated:
                    continue
                page = EXPANDABLE_PAGE[pool[1]]
                start = -(-tail.address // page) * page
                unmapped = tail.address + tail.size - start
                if unmapped <= 0:
                    continue
                self._remove(tail)
                self.reserved -= unmapped
                tail.size -= unmapped
                if tail.size:
                    self._insert(tail)
                else:
                    self._tails[pool] = tail.prev
                    if tail.prev is not None:
                        tail.prev.next = None
                continue
            for key in list(self._free.get(pool, [])):
                block = self._blocks[key[2]]
                if block.prev is None and block.next is None:
                    self._remove(block)
                    self.reserved -= block.size


@dataclass
class Replay:
    """What a replay of a step's allocations gives: the allocator's peaks, or where it ran out."""
    peak_allocated: int
    peak_reserved: int
    segments_allocated: int
    retries: int
    oom: AllocatorOutOfMemory | None = None


EMPTY_CACHE = (None, "empty_cache")  # an event: torch.cuda.empty_cache() was called here


def replay(events, cap_bytes: int | None = None, expandable_segments: bool = False) -> Replay:
    """Replay (+nbytes, key[, stream]) allocations, (-1, key) frees and EMPTY_CACHE in order through a
    CachingAllocator (an allocation's stream is 0, the compute stream, unless it names another).

    Zero-byte requests hold nothing (CUDACachingAllocator's allocate() hands out no block for them)."""
    allocator = CachingAllocator(cap_bytes=cap_bytes, expandable_segments=expandable_segments)
    live: dict = {}
    oom = None
    for nbytes, key, *stream in events:
        if nbytes is None:
            allocator.empty_cache()
        elif nbytes < 0:
            block = live.pop(key, None)
            if block is not None:
                allocator.free(block)
        elif nbytes > 0:
            try:
                live[key] = allocator.malloc(nbytes, *stream)
            except AllocatorOutOfMemory as error:
                oom = error
                break
    return Replay(allocator.peak_allocated, allocator.peak_reserved, allocator.segments_allocated,
                  allocator.retries, oom)
