"""`harness predict --solve`: the longest sequence or the largest micro-batch that fits a card."""

import json
import random
import subprocess
import sys

import pytest
from conftest import EXPERIMENTS, ROOT

from harness.cards import card_bytes
from harness.measure.budget import card_cap_bytes
from harness.predict.prediction import predict
from harness.predict.fit_table import FIT_CARDS, FIT_MODELS, fit_table
from harness.predict.search import largest_fitting
from harness.predict.solve import solve
from harness.techniques import TECHNIQUES


def _brute_force(peak, cap, limit):
    return max((n for n in range(1, limit + 1) if peak(n) <= cap), default=0)


@pytest.mark.parametrize("seed", range(20))
def test_the_search_finds_the_boundary_of_any_non_decreasing_peak_from_any_start(seed):
    rng = random.Random(seed)
    steps = [rng.choice([0, 0, 1, 3, 50]) for _ in range(300)]
    base = rng.randint(0, 400)

    def peak(n):
        return base + sum(steps[:n])
    limit, cap = rng.randint(1, 300), rng.randint(0, 2000)
    answer = largest_fitting(peak, cap, limit, start=rng.randint(1, 400))
    assert answer.value == _brute_force(peak, cap, limit)
    if answer.value:
        assert answer.peak_bytes == peak(answer.value) <= cap
    if answer.value < limit:
        assert answer.next_peak_bytes == peak(answer.value + 1) > cap
        assert answer.limited_by == "card"
    else:
        assert answer.limited_by == "search limit" and answer.next_peak_bytes is None


def test_analytic_answer_is_the_last_length_whose_device_bytes_fit_on_the_card():
    result = solve(EXPERIMENTS / "qlora.yaml", "llama-2-7b", 24, "seq_len", simulate=False)
    n, cap = result["max_seq_len"], card_bytes(24)
    assert 512 < n < 4096 and result["method"] == "analytic" and result["limited_by"] == "card"
    at = predict(EXPERIMENTS / "qlora.yaml", "llama-2-7b", n, 1, "analytic")
    above = predict(EXPERIMENTS / "qlora.yaml", "llama-2-7b", n + 1, 1, "analytic").device_bytes
    assert at.device_bytes == result["peak_bytes"] == result["device_bytes"] <= cap < above == result["next_peak_bytes"]
    assert result["margin_bytes"] == cap - at.device_bytes
    # the card holds more than the tensors: reserved segments beyond them, and the context and kernels
    assert at.device_bytes > at.reserved_bytes > at.total_bytes
    # with gradient checkpointing the same card holds the model's whole context
    held = solve(EXPERIMENTS / "qlora.yaml", "llama-2-7b", 24, "seq_len", simulate=False,
                 overrides={"gradient_checkpointing": True})
    assert held["max_seq_len"] == 4096 and held["limited_by"] == "context" and held["next_peak_bytes"] is None


def test_simulation_confirms_the_answer_under_the_card():
    result = solve(EXPERIMENTS / "lora.yaml", "tiny-llama", 2, "micro_batch", seq_len=256)
    n, cap = result["max_micro_batch"], card_bytes(2)
    assert n > 1 and result["method"] == "simulated" and result["simulated"]["evaluations"] >= 1
    # the card is a cap: the allocator replayed under it (the card less the context and kernels) must not
    # run out, and the step's device bytes under it must fit
    allocator_cap = card_cap_bytes(2, TECHNIQUES["lora"])

    def device_under_the_card(batch):
        prediction = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 256, batch, "simulated", cap_bytes=allocator_cap)
        capped = prediction.extra["budget_replay"]
        outside = prediction.device_bytes - prediction.reserved_bytes
        return None if capped["oom"] else capped["peak_reserved"] + outside
    at = device_under_the_card(n)
    # a step traced again in the same process may differ by a few bytes (a scalar cached by a library)
    assert at is not None and at <= cap and abs(at - result["peak_bytes"]) <= 1024
    fails_at = result["simulated"]["fails_at"]
    if fails_at is None:  # the analytic answer holds under the simulation: it stands, its neighbour is the formula's
        assert n == result["analytic"]["value"] and result["analytic"]["next_peak_bytes"] > cap
    else:  # it ran out: the answer is the largest micro-batch simulated to fit, the next one simulated ran out
        above = device_under_the_card(fails_at)
        assert fails_at == n + 1 and (above is None or above > cap)
    # the analytic answer is reported beside it, within a few sequences of the simulated one
    assert abs(result["analytic"]["value"] - n) <= max(2, n // 5)


def test_solve_on_the_command_line_answers_in_json():
    command = [sys.executable, "-m", "harness", "predict", "--model", "tiny-llama", "--experiment", "lora",
               "--card", "2", "--solve", "micro_batch", "--seq", "256", "--method", "analytic", "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["max_micro_batch"] > 1 and answer["fixed"] == {"seq_len": 256}
    assert answer["peak_bytes"] <= answer["cap_bytes"] < answer["next_peak_bytes"]
    refused = subprocess.run([*command[:-6], "--card", "0", "--solve", "micro_batch"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--card" in refused.stderr


def test_the_fit_table_grows_with_the_card_and_with_checkpointing():
    table = fit_table(EXPERIMENTS)
    rows = {(r["model"], r["experiment"], r["gradient_checkpointing"], r["card_gb"]): r for r in table.rows}
    experiments = {r["experiment"] for r in table.rows}
    assert len(rows) == len(table.rows) == len(FIT_MODELS) * len(experiments) * 2 * len(FIT_CARDS)
    for (model, experiment, checkpointing, card), row in rows.items():
        for axis in ("max_seq_len", "max_micro_batch"):
            if checkpointing:
                assert row[axis] >= rows[model, experiment, False, card][axis]
            bigger = [c for c in FIT_CARDS if c > card]
            if bigger:
                assert rows[model, experiment, checkpointing, bigger[0]][axis] >= row[axis]
    # 16 bytes per parameter (weights, gradients, AdamW's two states): a full fp32 fine-tune of a 7B
    # model (108 GB) fits the H200 alone
    assert [c for c in FIT_CARDS if rows["llama-2-7b", "fp32", True, c]["max_seq_len"]] == [141]
    assert rows["llama-2-7b", "qlora", True, 16]["max_seq_len"] > 0
    assert {c["case"] for c in table.cases} and all(c["max_seq_len"] > 0 for c in table.cases if c["card_gb"] >= 24)
    for row in table.rows:
        if row["max_seq_len"]:
            assert row["device_bytes"] + row["margin_bytes"] == card_bytes(row["card_gb"]) and row["margin_bytes"] >= 0
        # at the reference shape the card holds the tensors and more: the allocator's caching and the context
        assert row["reference_device_bytes"] > row["reference_peak_bytes"]
        if row["max_seq_len"] >= table.reference_shape[0]:
            assert row["reference_device_bytes"] <= row["device_bytes"]
    # measured on an H200 emulating a 24 GiB card (results/nvidia-h200/qlora-r32-gc__llama-3.1-8b__*.json):
    # 5,789 tokens trained, 7,627 ran out of memory
    (case,) = [c for c in table.cases if c["experiment"] == "qlora-r32-gc" and c["card_gb"] == 24]
    assert 5789 <= case["max_seq_len"] < 7627 and case["device_bytes"] + case["margin_bytes"] == card_bytes(24)
    # each row's speed on the card its size names, at sequence 2,048 and its largest micro-batch
    for (model, experiment, checkpointing, card), row in rows.items():
        if row["max_micro_batch"]:
            assert row["speed_shape"] == [2048, row["max_micro_batch"]]
            assert row["step_time_s"] * row["tokens_per_s"] == pytest.approx(2048 * row["max_micro_batch"])
            price = table.cards[str(card)]["price_per_hour"]
            assert row["cost_usd"] == pytest.approx(row["hours_per_100m_tokens"] * price)
    assert {gb: entry["gpu"] for gb, entry in table.cards.items()} == {
        "16": "T4", "24": "RTX 4090", "40": "A100", "80": "H100", "141": "H200"}
