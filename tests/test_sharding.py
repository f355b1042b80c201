"""Sharding predicted per rank: the tracker's view of FSDP2, the simulation under a fake process group,
the analytic terms, and the how-many-GPUs table."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import EXPERIMENTS, ROOT

from harness import schema
from harness.config import ConfigError, load_experiment
from harness.cards import card_bytes
from harness.measure.memory import TensorTracker
from harness.predict import gpus
from harness.predict.prediction import predict as predict_record

GiB = 2**30


def predict(experiment, model, seq, batch, method, **overrides) -> dict:
    return schema.to_dict(predict_record(EXPERIMENTS / f"{experiment}.yaml", model, seq, batch, method, "cuda",
                                         overrides))


# -- the tracker -----------------------------------------------------------------------

def test_a_storage_resized_to_nothing_stops_counting_and_counts_again_when_resized_back():
    tracker = TensorTracker()
    with tracker:
        kept = torch.empty(1024, dtype=torch.uint8)
        storage = kept.untyped_storage()
        assert tracker.current == 1024
        storage.resize_(0)
        tracker.resized(storage)
        assert tracker.current == 0
        storage.resize_(1024)
        tracker.resized(storage)
        assert tracker.current == 1024 and tracker.peak == 1024
    del kept, storage
    assert tracker.current == 0  # the storage's death releases its last size once


def test_labelled_buffers_keep_their_label_until_an_explicit_one():
    tracker = TensorTracker()
    with tracker:
        with tracker.labelling("reduce_scatter"):
            buffer = torch.empty(256)
            staging = torch.empty(64)
        tracker.track([buffer], "gradients")
        assert tracker.breakdown_at_peak()["gradients"] == 1024
        assert tracker.breakdown_at_peak()["reduce_scatter"] == 256
    del staging


def test_moving_categories_to_the_host_recomputes_the_device_peak():
    tracker = TensorTracker()
    with tracker:
        loading = torch.empty(300, dtype=torch.uint8)
        shard = torch.empty(1000, dtype=torch.uint8)
        del loading
        tracker.track([shard], "weights")
        since = loaded = tracker.counter
        transient = torch.empty(500, dtype=torch.uint8)
        del transient
        load_peak = tracker.move_to_host(("weights",), since, loaded)
    assert (tracker.peak, tracker.host_peak, load_peak) == (500, 1000, 300)
    del shard


# -- experiment files -------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"world_size": 2}, "world_size"),
    ({"cpu_offload": True}, "cpu_offload"),
    ({"sharding": "fsdp2", "technique": "qlora"}, "quantization"),
    ({"sharding": "fsdp2", "technique": "lora", "lora": {"use_dora": True}}, "lora"),
    ({"sharding": "fsdp2", "optimizer": "adamw8bit"}, "optimizer"),
    ({"world_size": 0, "sharding": "fsdp2"}, "world_size"),
])
def test_sharding_settings_that_cannot_hold_name_their_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_experiment(EXPERIMENTS / "bf16-mixed.yaml", overrides)
    assert error.value.field_name == field


# -- predicted per rank -----------------------------------------------------------------

def test_sharding_divides_the_states_and_adds_the_gathered_layers():
    """Analytic, Llama-2-7B full fine-tuning: weights, gradients and AdamW's states are 1/N per rank
    (fp32 masters); what sharding adds is the same at any N; the peak falls with N."""
    two, eight = (predict("fsdp2", "llama-2-7b", 2048, 1, "analytic", world_size=n) for n in (2, 8))
    for category in ("weights", "optimizer_state"):
        assert eight["persistent"][category] == pytest.approx(two["persistent"][category] / 4, abs=8)
    assert eight["categories"]["all_gather"] == two["categories"]["all_gather"] > 0
    assert eight["total_bytes"] < two["total_bytes"] and eight["world_size"] == 8


def test_offload_moves_the_states_to_the_host():
    on_device = predict("fsdp2", "llama-2-7b", 2048, 1, "analytic", world_size=2)
    offloaded = predict("fsdp2", "llama-2-7b", 2048, 1, "analytic", world_size=2, cpu_offload=True)
    states = sum(on_device["persistent"][k] for k in ("weights", "gradients", "optimizer_state"))
    assert offloaded["host_bytes"] == states
    assert offloaded["persistent"]["weights"] == offloaded["persistent"]["optimizer_state"] == 0
    # ZeRO-3 offloaded: the 16-bit parameters, the gradient partitions, fp32 masters and moments on the host
    zero3 = predict("zero3-offload", "llama-2-7b", 2048, 1, "analytic", world_size=2)
    parameters = 6_738_415_616
    assert zero3["host_bytes"] == pytest.approx((2 + 2 + 4 + 8) * parameters / 2, rel=1e-3)
    assert sum(zero3["persistent"].values()) == 0


@pytest.mark.slow
@pytest.mark.parametrize("model, seq, overrides", [
    ("llama-2-7b", 2048, {"world_size": 8}),
    ("llama-2-7b", 2048, {"world_size": 8, "gradient_checkpointing": True}),
    ("llama-2-7b", 2048, {"world_size": 2, "cpu_offload": True}),
    ("llama-2-7b", 2048, {"world_size": 8, "technique": "lora"}),
    ("llama-3-70b", 8192, {"world_size": 64, "gradient_checkpointing": True}),
])
def test_analytic_matches_the_sharded_simulation_within_3_percent(model, seq, overrides):
    analytic = predict("fsdp2", model, seq, 1, "analytic", **overrides)
    simulated = predict("fsdp2", model, seq, 1, "simulated", **overrides)
    assert analytic["total_bytes"] == pytest.approx(simulated["total_bytes"], rel=0.03), (
        analytic["categories"], simulated["categories"])
    assert analytic["host_bytes"] == pytest.approx(simulated["host_bytes"], rel=0.01, abs=2**20)
    assert simulated["categories"]["all_gather"] > 0


@pytest.mark.slow
def test_torchs_own_fsdp_memory_tracker_agrees_with_the_simulation():
    """FSDPMemTracker on the same fake sharded step: its peak within 1% of the simulation's, its all-gather
    plus unsharded parameters equal to the simulation's all-gather buffers."""
    simulated = predict("fsdp2-gc", "llama-2-7b", 2048, 1, "simulated", world_size=8)
    tracked = gpus.fsdp_mem_tracker(EXPERIMENTS / "fsdp2-gc.yaml", "llama-2-7b", 2048, 8, {})
    assert tracked["Total"] == pytest.approx(simulated["total_bytes"], rel=0.01)
    assert tracked["Sharded Param"] == simulated["categories"]["weights"]
    assert tracked["OptState"] == simulated["categories"]["optimizer_state"]


@pytest.mark.slow
def test_predict_command_gives_one_ranks_bytes_at_a_world_size_in_json():
    result = subprocess.run([sys.executable, "-m", "harness", "predict", "--model", "llama-2-70b", "--experiment",
                             "fsdp2", "--seq", "2048", "--world-size", "8", "--method", "simulated", "--json"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["world_size"] == 8 and answer["seconds"] < 60
    # 68,976,648,192 fp32 master weights over 8 ranks (FSDP2 pads each tensor to a multiple of 8 rows)
    assert answer["persistent"]["weights"] == pytest.approx(68_976_648_192 * 4 / 8, rel=1e-4)


# -- how many GPUs -----------------------------------------------------------------------

def test_the_gpu_count_table_answers_the_smallest_world_size_that_fits(monkeypatch):
    monkeypatch.setattr(gpus, "GPU_MODELS", ("mistral-7b",))
    monkeypatch.setattr(gpus, "GPU_SEQ_LENS", (2048,))
    table = gpus.gpu_count_table(EXPERIMENTS, simulate=False)
    answers = {(r["row"], r["card_gb"]): r for r in table.rows}
    for (row, card_gb), answer in answers.items():
        size = answer["world_size"]
        if size is None:
            continue
        # what the rank must hold, allocator and all, fits the card as sold
        assert answer["analytic_bytes"] < answer["device_bytes"] <= card_bytes(card_gb)
        if size > 1:  # half as many ranks would not fit
            smaller = predict(answer["experiment"], "mistral-7b", 2048, 1, "analytic",
                              **answer["overrides"], world_size=size // 2)
            assert smaller["device_bytes"] > card_bytes(card_gb)
    full, offloaded = "full fine-tuning (bf16-mixed)", "full, offloaded to host memory"
    for card_gb in gpus.GPU_CARDS:
        assert (answers[offloaded, card_gb]["world_size"] or 99) <= (answers[full, card_gb]["world_size"] or 99)
        if card_gb != gpus.GPU_CARDS[-1]:
            bigger = answers[full, gpus.GPU_CARDS[gpus.GPU_CARDS.index(card_gb) + 1]]["world_size"] or 99
            assert bigger <= (answers[full, card_gb]["world_size"] or 99)
    # ZeRO-3 beside each full answer: 16 bytes per parameter over N ranks (16-bit parameters and gradients,
    # fp32 masters, AdamW's two fp32 states), where DeepSpeed's estimator counts 18 and no activations
    parameters = 7_241_732_096
    for answer in (answers[full, card_gb] for card_gb in gpus.GPU_CARDS):
        states = sum(answer["zero3_categories"][k] for k in ("weights", "optimizer_state"))
        assert states == pytest.approx(14 * parameters / answer["world_size"], rel=1e-3)
        assert answer["deepspeed_zero3_bytes"] >= 18 * parameters / answer["world_size"]


# -- predicted against measured on two CPU ranks -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["fsdp2", "fsdp2-gc", "fsdp2-lora"])
def test_simulated_rank_matches_two_real_cpu_ranks_within_3_percent(tmp_path, experiment):
    """The sharded step under the fake process group against the same step on two gloo ranks (tracked bytes)."""
    from conftest import QUICK, run_dict

    from harness.config import resolve

    _, record = run_dict(resolve(EXPERIMENTS / f"{experiment}.yaml", {**QUICK, "world_size": 2}), tmp_path)
    assert record["status"] == "ok", record["error"]
    simulated = schema.to_dict(predict_record(EXPERIMENTS / f"{experiment}.yaml", "tiny-llama", QUICK["seq_len"],
                                              QUICK["micro_batch"], "simulated", "cpu", {"world_size": 2}))
    for rank in record["ranks"]:
        assert simulated["total_bytes"] == pytest.approx(rank["memory"]["tracked_step_peak"], rel=0.03), (
            simulated["categories"], rank["memory"]["breakdown_at_peak"])
    assert simulated["categories"]["all_gather"] + simulated["categories"]["reduce_scatter"] > 0
