"""The report's check of predicted reserved and device bytes against GPU records (harness.report.reserved)."""

from harness.report.reserved import check_rows, summary

GiB = 2**30


def _record(model, allocated, reserved, device, status="ok"):
    return {"status": status, "experiment": "lora", "model": model,
            "config": {"name": "lora", "seq_len": 512, "micro_batch": 1, "grad_accum": 1,
                       "gradient_checkpointing": False},
            "memory": {"source": "cuda", "peak_allocated": allocated, "peak_reserved": reserved,
                       "peak_device_used": device}}


def _prediction(model, method, total, reserved, device):
    return {"kind": "prediction", "method": method, "experiment": "lora", "model": model, "seq_len": 512,
            "micro_batch": 1, "grad_accum": 1, "gradient_checkpointing": False, "device_type": "cuda",
            "total_bytes": total, "reserved_bytes": reserved, "device_bytes": device, "allocator": "default"}


def test_rows_compare_each_run_with_its_prediction_and_the_old_rule():
    records = [_record("llama-2-7b", 10 * GiB, 11 * GiB, 12 * GiB), _record("tinyllama-1.1b", 4 * GiB, 5 * GiB, 6 * GiB),
               _record("llama-2-7b", 1, 1, 1, status="oom")]
    predictions = [_prediction("llama-2-7b", "analytic", 10 * GiB, 10 * GiB, 11 * GiB),
                   _prediction("llama-2-7b", "simulated", 10 * GiB, 11.1 * GiB, 12.6 * GiB),
                   _prediction("tinyllama-1.1b", "simulated", 4 * GiB, 5 * GiB, 6 * GiB)]
    rows = check_rows(records, predictions)
    assert len(rows) == 2  # the oom run has no peaks to compare
    seven = rows[0]
    assert seven["method"] == "simulated" and not seven["calibration"] and rows[1]["calibration"]
    assert abs(seven["reserved_error"] - 0.1 / 11) < 1e-9 and abs(seven["device_error"] - 0.05) < 1e-9
    assert abs(seven["old_rule_device_error"] - (10.5 / 12 - 1)) < 1e-9
    result = summary(rows)
    # judged on the runs the constants were not calibrated on: reserved within 5%, device not within 3%
    assert result["check"]["rows"] == 1 and result["check"]["reserved_within"] == 1
    assert result["check"]["device_within"] == 0 and not result["check"]["meets_target"]
    assert result["all"]["device_within"] == 1


def test_a_budget_run_that_ran_out_is_compared_with_the_replay_under_its_cap():
    from harness.report.reserved import oom_rows

    record = {**_record("llama-3.1-8b", None, None, None, status="oom"), "file": "x.json",
              "budget": {"cap_bytes": 23 * GiB},
              "error": {"message": "CUDA out of memory. Tried to allocate 3.64 GiB. ... Of the allocated memory "
                                   "19.74 GiB is allocated by PyTorch, and 1.09 GiB is reserved by PyTorch but unallocated."}}
    prediction = {**_prediction("llama-3.1-8b", "simulated", 1, 1, 1), "budget_replay": {
        "cap_bytes": 23 * GiB, "peak_reserved": 22 * GiB, "retries": 2,
        "oom": {"requested": 3 * GiB, "allocated": 19 * GiB, "reserved": 21 * GiB}}}
    (row,) = oom_rows([record], [prediction])
    assert row["predicted_oom"] and row["predicted_unusable"] == 2 * GiB
    assert row["measured_requested"] == int(3.64 * GiB) and row["measured_unusable"] == int(1.09 * GiB)
    # a replay under another cap is not compared
    other = {**prediction, "budget_replay": {**prediction["budget_replay"], "cap_bytes": 24 * GiB}}
    assert oom_rows([record], [other]) == []
    # the report's sentence: the run, its cap, and each figure predicted beside measured
    from harness.report.reserved import oom_sentence

    sentence = oom_sentence(row)
    assert sentence.startswith("x.json ran out of memory under its cap of 23.00 GiB") and "runs out:" in sentence
    assert "unusable predicted 2.00 GiB, measured 1.09 GiB" in sentence
    fits = {**prediction, "budget_replay": {**prediction["budget_replay"], "oom": None}}
    assert "does not run out." in oom_sentence(oom_rows([record], [fits])[0])
