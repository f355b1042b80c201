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

With `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` each pool (and stream) has one segment: a range
of virtual addresses (more than the card holds) whose pages are mapped as they are needed (Note
[Expandable Segments] in the same file: 2 MiB pages for the small pool, 20 MiB pages for the large pool).
Its blocks are free and mapped, allocated, or unmapped:

- `get_free_block`: the best fit among the free mapped blocks, where a block followed by unmapped
  addresses counts as that much larger (`expandable_size`): a block that could grow is passed over for
  the next one up that could grow less;
- `alloc_block`: under a cap, refused where reserved + `get_allocation_size` of the request passes it
  (the same test as a new segment's); else `try_allocate_expandable_block`: `find_expandable_block`
  takes the lowest unmapped block (with the free mapped block just before it) whose run of free and
  unmapped blocks holds the request, and `map_block` maps the pages it covers (rounded up to whole
  pages), merging with free mapped neighbours;
- `release_cached_blocks` (`release_blocks`, `unmap_block`): every free mapped block gives back the whole
  pages inside it, wherever it lies in the segment; the pieces of pages at its ends stay mapped and free;
- `should_split`: any remainder of >= 512 B is split off.

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
# An expandable segment's virtual addresses (torch reserves 1 1/8 of the card's memory): more than any cap here,
# so a request always finds room in its pool's one segment. Segments start at multiples of it, whole pages of
# both pools.
EXPANDABLE_ADDRESSES = LARGE_BUFFER * SMALL_BUFFER * (1 << 10)


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
    mapped: bool = True  # expandable segments: whether its pages are mapped (an unmapped block is never handed out)

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
    _unmapped: dict = field(default_factory=dict)  # expandable: (stream, small) -> {id: unmapped block of its segment}

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
        if self.expandable_segments:
            while at + 1 < len(keys) and (_expandable_size(self._blocks[keys[at + 1][2]])
                                          < _expandable_size(self._blocks[keys[at][2]])):
                at += 1
        return self._blocks[keys[at][2]]

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
        """alloc_block, then release_cached_blocks and alloc_block again, else out of memory. The cap's test is
        the same with expandable segments: the segment a new one would be, whatever pages are then mapped."""
        grow = allocation_size(size)
        if not self._fits(grow):
            self._release_cached_blocks()
            self.retries += 1
            if not self._fits(grow):
                raise AllocatorOutOfMemory(grow, self.allocated,
                                           self.reserved, self.cap_bytes)
        if self.expandable_segments:
            return self._allocate_expandable(size, pool)
        self.reserved += grow
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segments_allocated += 1
        stream, small = pool
        return Block(next(self._next_address) << 48, grow, small, segment=self.segments_allocated, stream=stream)

    def _fits(self, grow: int) -> bool:
        """alloc_block's check under set_per_process_memory_fraction: total_allocated_memory + size."""
        return self.cap_bytes is None or self.reserved + grow <= self.cap_bytes

    # -- expandable segments ---------------------------------------------------------
    def _allocate_expandable(self, size: int, pool: tuple[int, bool]) -> Block:
        """try_allocate_expandable_block: a free block of at least `size` bytes, its pages mapped, taken out of
        the pool."""
        candidate = self._find_expandable(size, pool)
        if not candidate.mapped:
            candidate = self._map(candidate, min(candidate.size, size))
        while candidate.size < size:  # free -> unmapped: map some of the unmapped block, merged with the free one
            candidate = self._map(candidate.next, min(size - candidate.size, candidate.next.size))
        self._remove(candidate)
        return candidate

    def _find_expandable(self, size: int, pool: tuple[int, bool]) -> Block:
        """find_expandable_block: the lowest unmapped block (or the free mapped block just before it) that starts
        a run of free and unmapped blocks of at least `size` bytes; the pool's segment made on first use."""
        unmapped = self._unmapped.setdefault(pool, {})
        for block in sorted(unmapped.values(), key=lambda b: b.address):
            start = block.prev if block.prev is not None and not block.prev.allocated else block
            room, walk = 0, start
            while room < size and walk is not None and not walk.allocated:
                room, walk = room + walk.size, walk.next
            if room >= size:
                return start
        # no room left in the pool's segment (or none yet): a new one, wholly unmapped
        stream, small = pool
        self.segments_allocated += 1
        block = Block(next(self._next_address) * EXPANDABLE_ADDRESSES, EXPANDABLE_ADDRESSES, small,
                      segment=self.segments_allocated, stream=stream, mapped=False)
        unmapped[id(block)] = block
        return block

    def _map(self, block: Block, nbytes: int) -> Block:
        """map_block: the whole pages that cover the first `nbytes` of an unmapped block are mapped (the rest of
        it stays unmapped), then merged with free mapped neighbours (try_merge_blocks) into the pool."""
        page = EXPANDABLE_PAGE[block.small]
        mapped = page * -(-nbytes // page)
        del self._unmapped[block.pool][id(block)]
        if mapped < block.size:
            rest = Block(block.address + mapped, block.size - mapped, block.small, prev=block, next=block.next,
                         segment=block.segment, stream=block.stream, mapped=False)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, mapped
            self._unmapped[block.pool][id(rest)] = rest
        block.mapped = True
        self.reserved += mapped
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._merge_free_neighbours(block)
        self._insert(block)
        return block

    def _unmap(self, block: Block) -> None:
        """unmap_block: a free mapped block gives back the whole pages inside it; the pieces of pages before and
        after them stay free and mapped, and the unmapped block merges with unmapped neighbours."""
        page = EXPANDABLE_PAGE[block.small]
        start = -(-block.address // page) * page
        end = (block.address + block.size) // page * page
        if end <= start:
            return
        self._remove(block)
        for low, high in ((block.address, start), (end, block.address + block.size)):
            if high > low:  # a mapped piece of a page, kept free
                piece = Block(low, high - low, block.small, segment=block.segment, stream=block.stream)
                if low < start:
                    piece.prev, piece.next = block.prev, block
                    if block.prev is not None:
                        block.prev.next = piece
                    block.prev = piece
                else:
                    piece.prev, piece.next = block, block.next
                    if block.next is not None:
                        block.next.prev = piece
                    block.next = piece
                self._insert(piece)
        block.address, block.size, block.mapped = start, end - start, False
        self.reserved -= end - start
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.mapped:
                del self._unmapped[block.pool][id(neighbour)]
                self._absorb(block, neighbour)
        self._unmapped.setdefault(block.pool, {})[id(block)] = block

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
        self._merge_free_neighbours(block)
        self._insert(block)

    def _merge_free_neighbours(self, block: Block) -> None:
        """try_merge_blocks with each neighbour: one free and mapped as the block is (an unmapped one is not)."""
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated and neighbour.mapped:
                self._remove(neighbour)
                self._absorb(block, neighbour)

    @staticmethod
    def _absorb(block: Block, neighbour: Block) -> None:
        """The neighbour's addresses become the block's; the neighbour leaves the segment's list."""
        if neighbour is block.prev:
            block.address, block.prev = neighbour.address, neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache (emptyCache): release_cached_blocks."""
        self._release_cached_blocks()

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks: every free block that is a whole segment goes back to the driver
        (release_blocks); with expandable segments every free block unmaps the whole pages inside it
        (unmap_block)."""
        for pool in sorted(self._free):
            for key in list(self._free[pool]):
                block = self._blocks[key[2]]
                if self.expandable_segments:
                    self._unmap(block)
                elif block.prev is None and block.next is None:
                    self._remove(block)
                    self.reserved -= block.size


def _expandable_size(block: Block) -> int:
    """get_free_block's expandable_size: a free block and the unmapped addresses right after it."""
    return block.size + (block.next.size if block.next is not None and not block.next.mapped else 0)


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
