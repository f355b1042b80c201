"""Every experiment runs a few steps on tiny-llama (CPU) in its own process and writes a complete record."""

import json
import math

import pytest
from conftest import EXPERIMENTS, QUICK

from harness.blocks.training import BLOCKS
from harness.predict.prediction import predict
from harness.schema import CATEGORIES

pytestmark = pytest.mark.slow  # real training steps in subprocesses; `make test-fast` skips them


def test_every_experiment_writes_a_complete_ok_record(quick_records):
    for name, (path, record) in quick_records.items():
        cuda_only = [field for field, block in BLOCKS.items() if block.cuda_only and record["config"][field]]
        if cuda_only:  # a GPU's technique: skipped here, saying which block needs a GPU and why
            assert record["status"] == "skipped" and record["error"]["type"] == "NotOnThisDevice", name
            assert all(f"{field}: {BLOCKS[field].cuda_only}" in record["error"]["message"] for field in cuda_only)
            assert json.loads(path.read_text()) == record
            continue
        assert record["status"] == "ok", (name, record.get("error"))
        assert json.loads(path.read_text()) == record  # what was returned is what is on disk
        assert record["schema_version"] == 1 and len(record["config_hash"]) == 64
        assert record["config"]["name"] == name and record["config"]["device"] == "cpu"
        environment = record["environment"]
        assert environment["device_type"] == "cpu" and environment["versions"]["torch"]
        assert {"commit", "dirty"} <= set(environment["git"])
        memory = record["memory"]
        assert memory["source"] == "cpu-tracked-tensors" and "not a GPU figure" in memory["note"]
        assert set(memory["phases"]) == {"load", "forward", "backward", "optimizer"}
        assert memory["peak_allocated"] >= max(p["peak_allocated"] for p in memory["phases"].values()) > 0
        breakdown = memory["breakdown_at_peak"]
        assert set(breakdown) == set(CATEGORIES)
        assert sum(breakdown.values()) == memory["tracked_step_peak"]
        assert breakdown["weights"] > 0 and breakdown["activations"] > 0
        persistent = memory["persistent"]
        # a step fused into backward frees each gradient as soon as its parameter has stepped; ZeRO-2 builds
        # its gradient partitions in its step (harness.step.zero), where they count as the step's own
        if record["config"]["sharding"] != "zero2":
            assert (persistent["gradients"] > 0) != record["config"]["optimizer_in_backward"]
        assert persistent["optimizer_state"] > 0
        throughput = record["throughput"]
        assert throughput["timed_steps"] == QUICK["steps"] and throughput["tokens_per_s"] > 0
        assert throughput["mfu"] is None  # MFU is a GPU figure only
        losses = record["loss"]["per_step"]
        # warm-up + timed steps + the tracked step
        assert len(losses) == QUICK["warmup_steps"] + QUICK["steps"] + 1
        assert all(math.isfinite(v) for v in losses)
        # random init starts near the uniform-distribution loss ln(vocab)
        assert abs(losses[0] - math.log(4096)) < 0.5
        parameters = record["parameters"]
        assert 0 < parameters["trainable"] <= parameters["total"]


def test_adapters_train_a_small_fraction_and_are_saved(quick_records):
    for name, (_, record) in quick_records.items():
        if record["status"] != "ok":
            continue  # a GPU's technique, skipped here
        adapter = record["config"]["adapter"] == "lora"
        assert (record["adapter_bytes_on_disk"] is not None) == adapter, name
        if adapter:
            # exactly the adapter tensors the analytic count gives (rank x (in + out) per adapted layer, DoRA's
            # magnitudes), a small fraction at the ranks people use (r 32 on a 256-wide toy model is 10.6%)
            counted = predict(EXPERIMENTS / f"{name}.yaml", "tiny-llama", QUICK["seq_len"], QUICK["micro_batch"],
                              "analytic").parameters["trainable"]
            assert record["parameters"]["trainable"] == counted, name
            if record["config"]["lora"]["r"] <= 16:
                assert record["parameters"]["trainable_pct"] < 10, name
            # adapter weights are fp32 (4 bytes each) plus a small config file
            assert record["adapter_bytes_on_disk"] >= 4 * record["parameters"]["trainable"]
        else:
            assert record["parameters"]["trainable_pct"] == 100


def test_precision_shows_in_the_persistent_memory(quick_records):
    """fp32 full fine-tuning: weights, gradients 4 B/param, AdamW 8 B/param; bf16-pure halves all three."""
    fp32 = quick_records["fp32"][1]
    n = fp32["parameters"]["total"]
    assert fp32["memory"]["persistent"]["weights"] == 4 * n
    assert fp32["memory"]["persistent"]["gradients"] == 4 * n
    assert fp32["memory"]["persistent"]["optimizer_state"] >= 8 * n  # + a step counter per tensor
    pure = quick_records["bf16-pure"][1]["memory"]["persistent"]
    assert pure["weights"] == 2 * n and pure["gradients"] == 2 * n
    assert pure["optimizer_state"] < 0.51 * fp32["memory"]["persistent"]["optimizer_state"]
    eight_bit = quick_records["adamw8bit"][1]["memory"]["persistent"]["optimizer_state"]
    assert eight_bit < 0.3 * fp32["memory"]["persistent"]["optimizer_state"]


def test_bf16_mixed_loss_matches_fp32(quick_records):
    """Same batches, same init: bf16 autocast stays within 1% of fp32's loss at every step."""
    fp32 = quick_records["fp32"][1]["loss"]["per_step"]
    mixed = quick_records["bf16-mixed"][1]["loss"]["per_step"]
    for a, b in zip(fp32, mixed):
        assert abs(a - b) / a < 0.01


def test_gradient_checkpointing_lowers_the_activation_peak(quick_records):
    plain = quick_records["qlora"][1]["memory"]["breakdown_at_peak"]["activations"]
    checkpointed = quick_records["qlora-gc"][1]["memory"]["breakdown_at_peak"]["activations"]
    assert checkpointed < plain


def test_the_step_in_backward_is_the_same_arithmetic_with_no_gradients_left(quick_records):
    """Each parameter's AdamW steps in its gradient hook: the same losses as one AdamW over all
    of them, and no gradient alive after backward."""
    fused = quick_records["bf16-pure-gc-optim-in-bwd"][1]
    plain = quick_records["bf16-pure-gc"][1]
    assert fused["loss"]["per_step"] == pytest.approx(plain["loss"]["per_step"], rel=1e-3)
    assert fused["memory"]["persistent"]["gradients"] == 0 < plain["memory"]["persistent"]["gradients"]
    assert fused["memory"]["persistent"]["optimizer_state"] == plain["memory"]["persistent"]["optimizer_state"]


def test_loraplus_trains_the_adapters_lora_trains_with_a_faster_b(quick_records):
    loraplus, lora = quick_records["loraplus"][1], quick_records["lora"][1]
    assert loraplus["parameters"]["trainable"] == lora["parameters"]["trainable"]
    assert loraplus["memory"]["persistent"] == lora["memory"]["persistent"]  # AdamW's state, grouped differently
    assert loraplus["loss"]["per_step"][0] == pytest.approx(lora["loss"]["per_step"][0])  # same start
    assert loraplus["loss"]["per_step"][-1] != lora["loss"]["per_step"][-1]  # lora_B's learning rate differs


def test_selective_checkpointing_keeps_attention_outputs_between_full_checkpointing_and_none(quick_records):
    """TRL's policy saves the SDPA op's outputs: more than recomputing everything, far less than
    keeping every activation; the arithmetic is the same."""
    # the forward pass's peak (the step's own peak is the optimizer's here, after activations are freed)
    forward = {name: quick_records[name][1]["memory"]["tracked_phase_peaks"]["forward"]
               for name in ("bf16-pure-gc", "bf16-pure-gc-selective", "bf16-pure")}
    assert forward["bf16-pure-gc"] < forward["bf16-pure-gc-selective"] < forward["bf16-pure"]
    losses = [quick_records[name][1]["loss"]["per_step"] for name in ("bf16-pure-gc", "bf16-pure-gc-selective")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_low_memory_optimizers_keep_less_state_than_adamw_on_the_same_weights(quick_records):
    """GaLore's projected moments and projection, torchao's 8-bit, fp8 and 4-bit moments (codes, a
    scale per block), against AdamW's two bf16 moments on the same bf16 weights."""
    state = {name: quick_records[name][1]["memory"]["persistent"]["optimizer_state"]
             for name in ("bf16-pure", "galore", "ao-adamw8bit", "ao-adamw-fp8", "ao-adamw4bit")}
    assert state["ao-adamw4bit"] < state["ao-adamw8bit"] < state["bf16-pure"]
    assert state["ao-adamw-fp8"] < state["bf16-pure"] and state["galore"] < state["bf16-pure"]
    # every one of them trains: the loss moves from the same start
    for name in state:
        losses = quick_records[name][1]["loss"]["per_step"]
        assert losses[0] == pytest.approx(quick_records["bf16-pure"][1]["loss"]["per_step"][0]) and losses[-1] != losses[0]
