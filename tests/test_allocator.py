"""The caching allocator model on hand-made sequences whose answers follow from the rules of
c10/cuda/CUDACachingAllocator.cpp (see harness.predict.allocator)."""

import pytest

from harness.predict.allocator import AllocatorOutOfMemory, CachingAllocator, replay, round_size

MiB = 2**20


def test_requests_are_rounded_to_512_bytes_and_small_ones_share_a_2_mib_segment():
    allocator = CachingAllocator()
    allocator.malloc(100)
    allocator.malloc(513)
    assert round_size(100) == 512 and round_size(513) == 1024
    assert allocator.allocated == 512 + 1024
    assert allocator.reserved == 2 * MiB and allocator.segments_allocated == 1


def test_two_6_mib_requests_share_one_20_mib_segment():
    allocator = CachingAllocator()
    allocator.malloc(6 * MiB)
    allocator.malloc(6 * MiB)
    assert allocator.allocated == 12 * MiB
    assert allocator.reserved == 20 * MiB and allocator.segments_allocated == 1


def test_a_request_of_10_mib_or_more_gets_a_segment_of_its_size_rounded_to_2_mib():
    allocator = CachingAllocator()
    allocator.malloc(11 * MiB)
    assert allocator.reserved == 12 * MiB


def test_a_remainder_of_at_most_1_mib_is_not_split_off_and_counts_as_allocated():
    allocator = CachingAllocator()
    allocator.malloc(19 * MiB + MiB // 2)  # a 20 MiB segment; 0.5 MiB would remain
    assert allocator.allocated == 20 * MiB and allocator.reserved == 20 * MiB


def test_a_freed_block_is_split_and_reused():
    allocator = CachingAllocator()
    allocator.free(allocator.malloc(12 * MiB))
    allocator.malloc(4 * MiB)   # best fit: the free 12 MiB block, split (8 MiB remain > 1 MiB)
    allocator.malloc(8 * MiB)   # the remainder
    assert allocator.reserved == 12 * MiB and allocator.segments_allocated == 1
    assert allocator.allocated == 12 * MiB


def test_best_fit_takes_the_smallest_free_block_that_is_large_enough():
    allocator = CachingAllocator()
    big, small = allocator.malloc(30 * MiB), allocator.malloc(14 * MiB)
    allocator.free(big)
    allocator.free(small)
    block = allocator.malloc(13 * MiB)
    assert block.segment == small.segment and allocator.reserved == 44 * MiB


def test_freed_neighbours_coalesce_into_one_block():
    allocator = CachingAllocator()
    blocks = [allocator.malloc(6 * MiB) for _ in range(3)]
    for block in blocks:
        allocator.free(block)
    allocator.malloc(20 * MiB)  # the whole segment again, merged
    assert allocator.reserved == 20 * MiB and allocator.segments_allocated == 1


def test_fragmentation_leaves_a_split_segment_unusable_under_a_cap():
    allocator = CachingAllocator(cap_bytes=40 * MiB)
    a, b, c = (allocator.malloc(6 * MiB) for _ in range(3))
    allocator.free(a)
    allocator.free(c)
    # 14 MiB free in the segment (6 + 8, not adjacent), but 22 MiB does not fit in either piece, a new
    # 22 MiB segment passes the cap, and the split segment cannot be given back
    with pytest.raises(AllocatorOutOfMemory) as error:
        allocator.malloc(22 * MiB)
    assert error.value.requested == 22 * MiB
    assert error.value.allocated == 6 * MiB and error.value.reserved == 20 * MiB


def test_under_a_cap_wholly_free_segments_are_released_and_the_allocation_retried():
    allocator = CachingAllocator(cap_bytes=30 * MiB)
    allocator.free(allocator.malloc(12 * MiB))
    allocator.malloc(20 * MiB)  # 12 + 20 > 30: the free 12 MiB segment goes back first
    assert allocator.reserved == 20 * MiB and allocator.retries == 1
    assert allocator.peak_reserved == 20 * MiB


def test_expandable_segments_grow_one_segment_by_20_mib_pages():
    default, expandable = CachingAllocator(), CachingAllocator(expandable_segments=True)
    for allocator in (default, expandable):
        first = allocator.malloc(12 * MiB)
        allocator.malloc(12 * MiB)
        allocator.free(first)
        allocator.malloc(14 * MiB)
    # default: segments of 12, 12 and 14 MiB (the freed 12 MiB is too small for 14)
    assert default.reserved == 38 * MiB
    # expandable: 24 MiB in two pages (40 MiB); 14 MiB fits in the 16 MiB still free at the end
    assert expandable.reserved == 40 * MiB and expandable.allocated == 26 * MiB


def test_replay_reports_peaks_and_where_a_capped_run_ran_out():
    events = [(6 * MiB, "a"), (6 * MiB, "b"), (6 * MiB, "c"), (-1, "a"), (-1, "c"), (0, "empty"), (22 * MiB, "d")]
    free_run = replay(events)
    assert (free_run.peak_allocated, free_run.peak_reserved, free_run.oom) == (28 * MiB, 42 * MiB, None)
    capped = replay(events, cap_bytes=40 * MiB)
    assert capped.oom is not None and capped.oom.requested == 22 * MiB


def test_each_stream_has_its_own_segments_and_all_go_back_when_the_cache_is_released():
    allocator = CachingAllocator(cap_bytes=44 * MiB)
    allocator.free(allocator.malloc(12 * MiB))          # the compute stream's free 12 MiB segment
    side = allocator.malloc(12 * MiB, stream=1)         # not handed to the side stream: a segment of its own
    assert side.segment != 1 and allocator.reserved == 24 * MiB
    allocator.free(side)
    again = allocator.malloc(4 * MiB, stream=1)         # the side stream's freed block is its own to reuse
    assert again.segment == side.segment and allocator.reserved == 24 * MiB
    allocator.free(again)
    allocator.malloc(40 * MiB)                          # past the cap: both streams' free segments go back
    assert allocator.retries == 1 and allocator.reserved == 40 * MiB
    # in a replay an allocation may name its stream (without one, it is the compute stream's)
    events = [(12 * MiB, "a"), (-1, "a"), (12 * MiB, "b", 1), (12 * MiB, "c", 0)]
    assert replay(events[:3]).peak_reserved == 24 * MiB and replay([e[:2] for e in events[:3]]).peak_reserved == 12 * MiB
    assert replay(events).peak_reserved == 24 * MiB  # c takes a's freed segment back


def test_storages_made_on_a_side_stream_reach_the_allocator_on_it():
    import torch

    from harness.measure.memory import TensorTracker
    from harness.predict.simulate import allocator_events

    tracker = TensorTracker()
    with tracker:
        torch.empty(3 * MiB, dtype=torch.uint8)
        with tracker.on_side_stream():
            torch.empty(5 * MiB, dtype=torch.uint8)
    for device_type, streams in (("cuda", [0, 1]), ("cpu", [0, 0])):  # a CPU has one stream
        allocations = [event for event in allocator_events(tracker, device_type) if event[0] and event[0] > 0]
        assert [(nbytes, stream) for nbytes, _, stream in allocations] == [
            (3 * MiB, streams[0]), (5 * MiB, streams[1])]


def test_a_simulated_cuda_step_predicts_reserved_and_device_bytes_from_its_own_allocations():
    from conftest import EXPERIMENTS

    from harness.device_memory import CUBLAS_WORKSPACE_BYTES, outside_allocator_bytes
    from harness.predict.prediction import predict
    from harness.techniques import TECHNIQUES

    default = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 128, 2, "simulated", "cuda")
    expandable = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 128, 2, "simulated", "cuda",
                         allocator="expandable_segments")
    allocated = default.extra["allocator_allocated_bytes"]
    # the allocator's blocks hold every tensor (rounded) and the two cuBLAS workspaces
    assert allocated >= default.total_bytes + 2 * CUBLAS_WORKSPACE_BYTES
    assert default.reserved_bytes >= allocated and default.allocator == "default"
    assert default.device_bytes == default.reserved_bytes + outside_allocator_bytes(TECHNIQUES["lora"])
    # expandable segments map whole pages: a multiple of 2 MiB
    assert expandable.allocator == "expandable_segments" and expandable.reserved_bytes % (2 * MiB) == 0
    assert expandable.reserved_bytes >= expandable.extra["allocator_allocated_bytes"]
    # the analytic method: its peak and workspaces times the calibrated ratio
    analytic = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 128, 2, "analytic", "cuda")
    assert analytic.device_bytes > analytic.reserved_bytes > analytic.total_bytes
    # a CPU step has no caching allocator and no device bytes
    cpu = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 128, 2, "simulated", "cpu")
    assert cpu.device_bytes is None


def test_empty_cache_returns_wholly_free_segments_and_keeps_split_ones():
    events = [(12 * MiB, "a"), (6 * MiB, "b"), (6 * MiB, "c"), (-1, "a"), (-1, "b"), (None, "empty_cache"),
              (12 * MiB, "d")]
    run = replay(events)
    # the 12 MiB segment went back; the 20 MiB one still holds c; d needs a new 12 MiB segment
    assert run.peak_reserved == 32 * MiB and run.segments_allocated == 3


def test_a_run_under_another_allocator_setting_is_another_measurement():
    from harness.env import fingerprint

    environment = {"device_name": "NVIDIA H200", "versions": {"torch": "2.11.0"}}
    expandable = {**environment, "cuda_alloc_conf": "expandable_segments:True"}
    assert fingerprint(environment) != fingerprint(expandable)
    assert fingerprint(environment) == fingerprint(dict(environment))


@pytest.mark.slow
def test_the_replay_under_the_h200_runs_cap_runs_out_where_it_did_and_as_it_did():
    """Llama-3.1-8B QLoRA r32 with checkpointing at 7,627 tokens, run on an H200 with the allocator capped
    (results/nvidia-h200/qlora-r32-gc__llama-3.1-8b__54c353b44c8a.json): torch ran out asking for 3.64 GiB
    with 19.74 GiB allocated and 1.09 GiB reserved but unallocated."""
    import json

    from conftest import EXPERIMENTS, ROOT

    from harness.predict.prediction import predict

    record = json.loads((ROOT / "results/nvidia-h200/qlora-r32-gc__llama-3.1-8b__54c353b44c8a.json").read_text())
    assert record["status"] == "oom"
    cap = record["budget"]["cap_bytes"]
    prediction = predict(EXPERIMENTS / "qlora-r32-gc.yaml", "llama-3.1-8b", 7627, 1, "simulated", cap_bytes=cap)
    oom = prediction.extra["budget_replay"]["oom"]
    assert oom is not None and abs(oom["requested"] / (3.64 * 2**30) - 1) < 0.01
    assert abs(oom["allocated"] / (19.74 * 2**30) - 1) < 0.01
    assert abs((oom["reserved"] - oom["allocated"]) - 1.09 * 2**30) < 0.1 * 2**30
    # the same configuration at 5,789 tokens trained under that cap
    fits = predict(EXPERIMENTS / "qlora-r32-gc.yaml", "llama-3.1-8b", 5789, 1, "simulated", cap_bytes=cap)
    assert fits.extra["budget_replay"]["oom"] is None


def test_a_paged_optimizers_large_states_live_in_unified_memory_outside_the_allocator(tmp_path):
    """bitsandbytes' paged 8-bit AdamW keeps the two uint8 states of a parameter of 1e5 elements or more in CUDA
    unified memory: the traced step counts them as tensors (as a GPU's tracked step does), the allocator's
    replay leaves them out, and the card holds them in the UVM driver's batches of 64 root chunks of 2 MiB
    (on the H200, 7B QLoRA's 32 to 49 MiB of such state took 128 MiB beyond TinyLlama's, which has none, and
    Llama-3.1-8B r32's 156 MiB took 256). The formula names the same bytes."""
    import json

    from conftest import EXPERIMENTS

    from harness.device_memory import outside_allocator_bytes, unified_memory_bytes
    from harness.predict.prediction import predict
    from harness.techniques import TECHNIQUES

    assert [unified_memory_bytes(n) for n in (0, 1, 128 * MiB, 128 * MiB + 1)] == [0, 128 * MiB, 128 * MiB, 256 * MiB]
    config = tmp_path / "wide-mlp.json"  # LoRA r16 of an 8,192-wide MLP: 131,072 elements per gate/up B, down A
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8192,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                  "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": False}))
    path = EXPERIMENTS / "qlora.yaml"
    paged, plain = (predict(path, str(config), 64, 1, "simulated", "cuda", overrides=overrides)
                    for overrides in (None, {"optimizer": "adamw8bit"}))
    states = 2 * 3 * 2 * 131_072  # two layers, three adapter tensors each, two uint8 states
    assert paged.extra["unified_bytes"] == states and plain.extra["unified_bytes"] == 0
    # the same tensors (a few bytes of temporaries can die one garbage collection sooner or later)
    assert paged.persistent == plain.persistent and abs(paged.total_bytes - plain.total_bytes) <= 1024
    allocated = plain.extra["allocator_allocated_bytes"] - paged.extra["allocator_allocated_bytes"]
    assert allocated == pytest.approx(states, abs=4096)  # the allocator never held them
    technique = TECHNIQUES["qlora"]
    assert paged.device_bytes == paged.reserved_bytes + outside_allocator_bytes(technique) + 128 * MiB
    analytic = predict(path, str(config), 64, 1, "analytic", "cuda")
    assert analytic.extra["unified_bytes"] == states
    fp32_states = predict(path, str(config), 64, 1, "simulated", "cuda", overrides={"optimizer": "paged_adamw"})
    assert fp32_states.extra["unified_bytes"] == 4 * states  # two fp32 states, not two uint8 ones
    cpu = predict(path, str(config), 64, 1, "analytic", "cpu")
    assert cpu.extra["unified_bytes"] == 0


def test_expandable_segments_under_a_cap_give_back_free_pages_inside_the_segment():
    allocator = CachingAllocator(cap_bytes=60 * MiB, expandable_segments=True)
    first = allocator.malloc(20 * MiB)
    allocator.malloc(20 * MiB)
    allocator.free(first)  # a free page at the segment's start, an allocated one after it
    # 40 reserved + 30 asked for > 60: the free page inside the segment is unmapped, then 30 MiB are mapped past the
    # allocated block (the hole is too small for them): two pages
    allocator.malloc(30 * MiB)
    assert allocator.retries == 1 and allocator.reserved == 60 * MiB and allocator.allocated == 50 * MiB


def test_expandable_segments_map_again_at_the_lowest_address_that_fits():
    allocator = CachingAllocator(expandable_segments=True)
    first = allocator.malloc(20 * MiB)
    allocator.malloc(20 * MiB)
    allocator.free(first)
    allocator.empty_cache()
    assert allocator.reserved == 20 * MiB
    again = allocator.malloc(20 * MiB)  # the unmapped hole where the first block was
    assert again.address == first.address and allocator.reserved == 40 * MiB


def test_expandable_segments_keep_the_pieces_of_pages_at_a_free_blocks_ends_mapped():
    allocator = CachingAllocator(expandable_segments=True)
    small = allocator.malloc(10 * MiB)  # one 20 MiB page, its second half free
    large = allocator.malloc(25 * MiB)  # the free half and one more page: [10, 35) of [0, 40)
    assert allocator.reserved == 40 * MiB and large.address == small.address + 10 * MiB
    allocator.free(small)
    allocator.empty_cache()  # [0, 10) and [35, 40) hold no whole page
    assert allocator.reserved == 40 * MiB
    allocator.free(large)
    allocator.empty_cache()
    assert allocator.reserved == 0 and allocator.allocated == 0
