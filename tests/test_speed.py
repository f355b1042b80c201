"""Predicted speed: the kernel recorder, the cost model, the card catalogue, the report's check."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EXPERIMENTS

from harness import schema
from harness.cards import CARD_OF_SIZE, CARDS, UnknownCard, card, card_in_device_name
from harness.measure.throughput import peak_flops
from harness.predict.kernels import Kernel, KernelRecorder
from harness.predict.speed import Calibration, calibration, fine_tune_cost, step_time

CALIBRATION = Calibration(((1e9, 100e12), (1e12, 500e12)), bandwidth=1e12, host_seconds_per_kernel=10e-6,
                          source="test", optimizer_seconds_per_parameter=(
                              ("aten::_fused_adamw_", 1e-11), ("bitsandbytes::optimizer_update_8bit_blockwise", 3e-11)))


def test_a_device_name_finds_its_card_longest_name_first():
    assert card_in_device_name("NVIDIA H100 PCIe") == "H100 PCIe"
    assert card_in_device_name("NVIDIA H100 80GB HBM3") == "H100"
    assert card_in_device_name("NVIDIA H200") == "H200"
    assert peak_flops("NVIDIA H200", "bf16") == CARDS["H200"].bf16 == 989e12  # MFU reads the same table
    assert peak_flops("Tesla T4", "bf16") is None  # no bf16 tensor cores
    with pytest.raises(UnknownCard, match="unknown GPU 'B9000'"):
        card("B9000")
    assert all(name in CARDS for name in CARD_OF_SIZE.values())


def test_the_recorder_counts_torch_s_flops_and_bytes_and_skips_views():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    recorder = KernelRecorder()
    recorder.recording = True
    with recorder:
        product = a @ b
        product.t().contiguous()  # a view (no kernel), then a copy (a kernel)
        product.add_(1.0)         # in place: read and written
    ops = [k.op for k in recorder.kernels]
    assert ops == ["aten::mm", "aten::clone", "aten::add_.Tensor"]
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        a @ b
    assert recorder.kernels[0].flops == counter.get_total_flops() == 2 * 64 * 32 * 16
    assert recorder.kernels[0].bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert recorder.kernels[2].bytes == 2 * 4 * 64 * 16  # read once and written once (its output is itself)


def test_the_cpu_flash_attention_is_counted_as_cuda_s_attention():
    q = k = v = torch.randn(1, 2, 8, 4, requires_grad=True)
    recorder = KernelRecorder()
    recorder.recording = True
    with recorder:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    attention = [r for r in recorder.kernels if "flash_attention" in r.op]
    assert [r.flops > 0 for r in attention] == [True, True]
    assert attention[0].flops == torch.utils.flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def test_small_kernels_are_the_host_s_and_a_large_product_the_gpu_s():
    tiny = [Kernel("aten::add.Tensor", 0, 1000, "bf16", "forward")] * 100
    timed = step_time(tiny, "H200", CALIBRATION)
    assert timed["bound"] == "host" and timed["step_time_s"] == pytest.approx(100 * 10e-6 + 1000 / 1e12)
    big = [Kernel("aten::mm", int(1e13), 0, "bf16", "forward")]
    timed = step_time(big, "H200", CALIBRATION)
    assert timed["step_time_s"] == pytest.approx(10e-6 + 1e13 / 500e12)
    # another card: the measured rate scaled by the ratio of data-sheet peaks
    on_a100 = step_time(big, "A100", CALIBRATION)["matmul_s"]
    assert on_a100 == pytest.approx(1e13 / (500e12 * 312 / 989))
    # an fp32 product computes 989/67 times longer at its peak than in bf16: its share of peak is read on the
    # bf16 curve that many FLOPs further, so it is higher than a bf16 product's of the same FLOPs
    fp32 = [Kernel("aten::mm", int(1e10), 0, "fp32", "forward")]
    share = CALIBRATION.matmul_rate(1e10 * 989 / 67) / 989e12
    assert step_time(fp32, "H200", CALIBRATION)["matmul_s"] == pytest.approx(1e10 / (share * 67e12))
    assert share > CALIBRATION.matmul_rate(1e10) / 989e12
    optimizer = [Kernel("aten::_fused_adamw_", 0, 0, "fp32", "optimizer", fp32_elements=10**9)]
    assert step_time(optimizer, "H200", CALIBRATION)["optimizer_s"] == pytest.approx(1e-2)


def test_llm_int8_is_traced_as_cuda_runs_it_and_its_outlier_check_makes_the_host_wait():
    from harness.predict.kernels import HOST_WAIT, INT8_FORWARD_CALL
    from harness.predict.speed import int8_forward_kernels

    kernels = int8_forward_kernels(512, 4096, 11008)
    ops = [k.op for k in kernels]
    # MatMul8bitLt's CUDA path: cast to fp16, the outlier check and its wait, quantization, the int8 product,
    # its dequantization; not CPU's dequantized weight times the input
    assert ops[0] == INT8_FORWARD_CALL and HOST_WAIT in ops and "aten::mm" not in ops
    assert ops.index("aten::any") < ops.index(HOST_WAIT) < ops.index("bitsandbytes::int8_linear_matmul")
    (product,) = [k for k in kernels if k.flops]
    assert product.dtype == "int8" and product.flops == 2 * 512 * 4096 * 11008
    # the host waits: a kernel issued after the wait starts when the GPU is done, not when the host was
    long = Kernel("aten::mm", int(1e13), 0, "bf16", "forward")
    short = Kernel("aten::add.Tensor", 0, 1000, "bf16", "forward")
    waiting = step_time([long, Kernel(HOST_WAIT, 0, 0, "", "forward"), short], "H200", CALIBRATION)
    free = step_time([long, short], "H200", CALIBRATION)
    assert waiting["host_s"] == pytest.approx(free["step_time_s"] - 1000 / 1e12 + 10e-6, rel=1e-6)
    assert waiting["host_s"] > free["host_s"] and waiting["kernels"] == 2 and waiting["host_waits"] == 1
    # the calibration's host time of an int8 forward is charged once a call
    assert dict(calibration().call_host_seconds)[INT8_FORWARD_CALL] > 0


def test_the_calibration_reads_the_lab_s_h200_microbenchmarks():
    measured = calibration()
    rates = [rate for _, rate in measured.matmul_points]
    assert len(rates) == 3 and rates == sorted(rates) and rates[-1] < CARDS["H200"].bf16
    assert 0.3 * CARDS["H200"].bandwidth < measured.bandwidth < CARDS["H200"].bandwidth
    assert 1e-6 < measured.host_seconds_per_kernel < 1e-4
    assert measured.matmul_rate(1.0) == rates[0] and measured.matmul_rate(1e15) == rates[-1]


def test_the_host_cost_is_the_adapter_s_time_over_the_kernels_it_adds(tmp_path):
    from harness.predict.speed import lora_layer_kernels

    def bench(rank, seconds):
        return {"name": f"bench_lora_forward_backward[t8-r{rank}]", "stats": {"min": seconds, "median": 3 * seconds},
                "extra_info": {"shape": {"tokens": 8, "in_features": 16, "out_features": 32, "rank": rank},
                               "lora_dropout": 0.05}}

    data = {"benchmarks": [
        bench(0, 1e-4), bench(8, 5e-4),
        {"name": "bench_linear_forward[t8-bf16]", "stats": {"min": 1e-5, "median": 2e-5},
         "extra_info": {"layer": "bf16", "shape": {"tokens": 8, "in_features": 16, "out_features": 32}}},
        {"name": "bench_copy", "stats": {"min": 1e-5, "median": 2e-5}, "extra_info": {"shape": {"weight": [32, 16]}}},
        {"name": "bench_optimizer_step[torch-adamw]", "stats": {"min": 1e-3, "median": 2e-3},
         "extra_info": {"shape": {"parameters": 1000}}},
        {"name": "bench_optimizer_step[adamw8bit]", "stats": {"min": 2e-3, "median": 3e-3},
         "extra_info": {"shape": {"parameters": 1000, "tensors": [[10, 100]]}}},
        {"name": "bench_nf4_dequantize", "stats": {"min": 1e-6, "median": 2e-6},
         "extra_info": {"shape": {"weight": [32, 64]}, "dtype": "bf16"}},
        {"name": "bench_linear_forward[t8-int8]", "stats": {"min": 1e-3, "median": 2e-3},
         "extra_info": {"layer": "int8", "shape": {"tokens": 8, "in_features": 16, "out_features": 32}}}]}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    added = len(lora_layer_kernels(8, 16, 32, 8, 0.05)) - len(lora_layer_kernels(8, 16, 32, 0, 0.0))
    assert added > 5  # dropout, two small products, scaling, the sum, and their backward
    measured = calibration(path)
    assert measured.host_seconds_per_kernel == pytest.approx(4e-4 / added)
    assert dict(measured.optimizer_seconds_per_parameter)["aten::_fused_adamw_"] == pytest.approx(1e-6)
    # of the 8-bit kernel's time, what its bytes do not take at the copy's bandwidth is per-element work: 1,000
    # fp32 parameters (under bitsandbytes' 4,096, so two fp32 states) read and written with their states, and
    # their gradients read, is 28,000 bytes; the copy moved 2,048 bytes in 1e-5 s
    shares = dict(measured.optimizer_element_shares)
    assert shares["bitsandbytes::optimizer_update_8bit_blockwise"] == pytest.approx(1 - 28_000 / (2_048 / 1e-5) / 2e-3)
    assert "aten::_fused_adamw_" not in shares  # its benchmark names no tensors: all of its time scales with bytes
    # torchao's compiled 8-bit step at bitsandbytes' 8-bit kernel's time per parameter (no benchmark of its own)
    assert dict(measured.optimizer_seconds_per_parameter)["torchao::single_param_adam[OptimState8bit]"] == \
        pytest.approx(2e-6)
    # NF4 dequantization at its own benchmark's bandwidth: 2048 codes (1,024 bytes), 32 fp32 absmax, 4,096 bytes out
    assert dict(measured.kernel_bandwidths)["bitsandbytes::dequantize_4bit"] == pytest.approx((1024 + 128 + 4096) / 1e-6)
    # an LLM.int8 forward's host time beyond its kernels' launches: the int8 layer's time at its fewest tokens
    # less the kernels the trace records for it at the host cost of one
    from harness.predict.kernels import INT8_FORWARD_CALL, MARKS
    from harness.predict.speed import int8_forward_kernels

    launched = [k for k in int8_forward_kernels(8, 16, 32) if k.op not in MARKS]
    assert dict(measured.call_host_seconds)[INT8_FORWARD_CALL] == pytest.approx(
        1e-3 - len(launched) * measured.host_seconds_per_kernel)
    # the calibration carries its file's digest: a prediction from another file is stale
    from harness.predict.speed import calibration_digest, is_current

    assert measured.digest == calibration_digest(path) != calibration_digest()
    assert is_current({"calibration": {"digest": measured.digest}}, path)
    assert not is_current({"calibration": {"digest": calibration_digest()}}, path)
    assert is_current(None, path)  # a prediction without speed
    # once the lab times torchao's own compiled step, that time stands for it
    data["benchmarks"].append({"name": "bench_optimizer_step[ao-adamw8bit]", "stats": {"min": 5e-3, "median": 6e-3},
                               "extra_info": {"shape": {"parameters": 1000}}})
    path.write_text(json.dumps(data))
    measured = calibration(path)
    assert dict(measured.optimizer_seconds_per_parameter)["torchao::single_param_adam[OptimState8bit]"] == \
        pytest.approx(5e-6)
    assert "bench_optimizer_step[ao-adamw8bit]" in measured.source


def test_offloading_s_copies_run_on_the_side_stream_and_backward_waits_for_them_to_come_back():
    from harness.predict.kernels import FROM_HOST, TO_HOST

    link = CARDS["H200"].host_link
    mm = Kernel("aten::mm", int(1e13), 0, "bf16", "forward")  # 20 ms at the test's 500 TFLOP/s
    out = Kernel(TO_HOST, 0, int(link * 0.05), "bf16", "forward")  # 50 ms over the link
    back = Kernel(FROM_HOST, 0, int(link * 0.01), "bf16", "backward")
    # a copy out overlaps the compute after it; the step ends when the link is done
    timed = step_time([mm, out, mm], "H200", CALIBRATION)
    assert timed["host_link_s"] == pytest.approx(0.05, rel=1e-6)
    assert timed["step_time_s"] == pytest.approx(max(3 * 10e-6 + 0.04, 10e-6 + 0.02 + 0.05), rel=1e-6)
    # one stream both ways: the copy back waits for the copy out, and the compute after it for the copy back
    timed = step_time([mm, out, back, mm], "H200", CALIBRATION)
    assert timed["step_time_s"] == pytest.approx(10e-6 + 0.02 + 0.05 + 0.01 + 0.02, rel=1e-6)


def test_a_simulated_offloading_step_records_its_copies_over_the_host_link(monkeypatch):
    from harness.config import resolve
    from harness.predict import allocator
    from harness.predict.kernels import FROM_HOST, TO_HOST, KernelRecorder
    from harness.predict.prediction import predict
    from harness.predict.simulate import simulate_step
    from harness.step.models import resolve_source

    replayed = []
    replay = allocator.replay
    monkeypatch.setattr(allocator, "replay", lambda events, **options: replay(replayed.append(events) or events,
                                                                             **options))

    path = EXPERIMENTS / "bf16-pure-gc-optim-in-bwd-offload.yaml"
    offloaded = predict(path, "tiny-llama", 64, 2, "simulated", gpu="H200")
    kept = predict(path, "tiny-llama", 64, 2, "simulated", gpu="H200", overrides={"activation_offloading": False})
    assert kept.speed["host_link_s"] == 0 and offloaded.speed["host_link_s"] > 0
    # the bytes it moves out are the host memory the prediction counts; those brought back at most as many
    config = resolve(path, {"model": "tiny-llama", "seq_len": 64, "micro_batch": 2, "device": "cpu"})
    recorder = KernelRecorder()
    result = simulate_step(resolve_source("tiny-llama", False, "cuda"), config.technique, config.experiment, 64, 2,
                           "cuda", recorder=recorder)
    out = sum(k.bytes for k in recorder.kernels if k.op == TO_HOST)
    back = sum(k.bytes for k in recorder.kernels if k.op == FROM_HOST)
    assert out == result["host_bytes"] and 0 < back <= out
    # what comes back is allocated on TRL's side stream, in the allocator's segments of that stream (in
    # each of the two steps simulated; the recorder keeps the last one's kernels)
    assert sum(event[0] for event in replayed[-1] if len(event) == 3 and event[2] == 1) == 2 * back
    assert offloaded.speed["host_link_s"] == pytest.approx((out + back) / CARDS["H200"].host_link)


def test_a_liger_run_is_costed_from_the_stand_ins_kernels_not_as_its_eager_step():
    import dataclasses

    from harness.config import resolve
    from harness.predict.record_speed import predict_run

    speeds = {}
    for name in ("bf16-pure-liger", "bf16-pure"):
        config = resolve(EXPERIMENTS / f"{name}.yaml", {"model": "tiny-llama", "seq_len": 64, "micro_batch": 2,
                                                         "device": "cpu"})
        speeds[name] = predict_run({"config": dataclasses.asdict(config.experiment), "experiment": name}, "H200").speed
    liger, eager = speeds["bf16-pure-liger"], speeds["bf16-pure"]
    assert "note" not in liger  # Llama's patch is stood in for: no eager fallback
    # one fused kernel where the eager step launches several (RMSNorm, SwiGLU, RoPE, the loss); bytes can be
    # more at this size: each chunk of the loss reads lm_head's whole weight again
    assert liger["kernels"] < eager["kernels"] and liger["step_time_s"] < eager["step_time_s"]
    assert liger["flops"] == pytest.approx(eager["flops"], rel=0.02)  # the same products, the loss's in chunks


def test_fine_tune_cost():
    cost = fine_tune_cost(10_000, 100e6, 2.0)
    assert cost["hours"] == pytest.approx(100e6 / 10_000 / 3600) and cost["cost_usd"] == pytest.approx(
        2 * cost["hours"])
    assert fine_tune_cost(10_000, 1e6, None)["cost_usd"] is None


def test_a_simulated_step_gives_its_speed_from_its_own_kernels():
    from harness.predict.prediction import predict

    prediction = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 64, 2, "simulated", gpu="H100")
    speed = prediction.speed
    assert speed["method"] == "kernels" and speed["gpu"] == "H100"
    assert speed["kernels"] > 100 and speed["flops"] > 0
    assert speed["tokens_per_s"] == pytest.approx(64 * 2 / speed["step_time_s"])
    assert speed["step_time_s"] >= max(speed["host_s"], speed["device_busy_s"])
    analytic = predict(EXPERIMENTS / "lora.yaml", "tiny-llama", 64, 2, "analytic", gpu="H100").speed
    assert analytic["method"] == "analytic" and analytic["step_time_s"] < speed["step_time_s"]
    # a saved prediction without a speed still reads (older records)
    data = schema.to_dict(prediction)
    del data["speed"]
    assert schema.from_dict(data).speed is None


def test_fit_rows_carry_tokens_per_s_step_time_and_cost():
    from harness.predict.fit_table import fit_row_speed
    from harness.predict.search import setup

    found = setup(EXPERIMENTS / "qlora-gc.yaml", "tiny-llama")
    row = fit_row_speed(found, 24, 4, 1024)
    assert row["speed_shape"] == [2048, 4] and row["speed_method"] == "analytic"
    assert row["step_time_s"] == pytest.approx(2048 * 4 / row["tokens_per_s"])
    assert row["cost_usd"] == pytest.approx(row["hours_per_100m_tokens"] * CARDS[CARD_OF_SIZE[24]].price_per_hour)
    assert fit_row_speed(found, 24, 0, 0)["tokens_per_s"] is None


def test_the_report_compares_each_gpu_run_with_its_speed_prediction(tmp_path):
    from harness.report.load import load_results
    from harness.report.speed import speed_rows, speed_summary, speed_table

    times = {"median": 0.1, "mean": 0.1, "min": 0.09, "max": 0.12, "stdev": 0.01, "all": [0.09, 0.1, 0.12]}
    record = {"status": "ok", "experiment": "lora", "model": "m", "kind": "run", "schema_version": 1,
              "config": {"model": "m", "seq_len": 1024, "micro_batch": 2, "grad_accum": 1},
              "throughput": {"tokens_per_step": 2048, "tokens_per_s": 20480.0, "step_time_s": times}}
    source = Path(__file__).parent / "fixtures" / "report-results"
    run = source / "fixture-gpu" / "bf16-pure__llama-2-7b__fixture00002.json"  # an ok run
    data = json.loads(run.read_text())
    data.update({k: v for k, v in record.items() if k not in ("config", "throughput", "environment")})
    data["throughput"].update(record["throughput"])
    data["config"].update(record["config"])
    data["environment"]["device_name"] = "NVIDIA H200"
    (tmp_path / "nvidia-h200").mkdir()
    (tmp_path / "nvidia-h200" / run.name).write_text(json.dumps(data))
    speed_dir = tmp_path / schema.PREDICTIONS_FOLDER / schema.SPEED_FOLDER / "nvidia-h200"
    speed_dir.mkdir(parents=True)
    prediction = {"kind": "prediction", "method": "simulated", "experiment": "lora", "model": "m", "seq_len": 1024,
                  "micro_batch": 2, "grad_accum": 1, "gradient_checkpointing": False, "technique": {},
                  "device_type": "cuda", "total_bytes": 1, "categories": {}, "persistent": {},
                  "speed": {"gpu": "H200", "method": "kernels", "tokens_per_s": 19000.0, "bound": "device"}}
    (speed_dir / run.name).write_text(json.dumps(prediction))
    results = load_results(tmp_path)
    assert not results.skipped, results.skipped
    rows = speed_rows(results)
    assert len(rows) == 1
    assert rows[0].error == pytest.approx(19000 / 20480 - 1)
    assert rows[0].within_spread is True  # 2048 / 0.12 = 17,067 <= 19,000 <= 2048 / 0.09
    summary = speed_summary(rows)
    assert summary["large"] == {"runs": 1, "predicted": 1, "within": 1, "share": 1.0} and summary["target_met"]
    assert "-7%" in speed_table(rows).rows[0][-1].text


def test_the_analytic_fallback_adds_the_optimizer_step_and_dequantization():
    from harness.config import resolve
    from harness.predict.analytic import predict as analytic_predict
    from harness.predict.speed import analytic_speed
    from harness.step.models import resolve_source

    source = resolve_source("tiny-llama")
    answers = {}
    for name in ("bf16-pure", "qlora-gc"):
        resolved = resolve(EXPERIMENTS / f"{name}.yaml", {"model": "tiny-llama", "seq_len": 64, "micro_batch": 2,
                                                           "device": "cpu"})
        cfg, technique = resolved.experiment, resolved.technique
        parameters = analytic_predict(source.config, technique, cfg, 64, 2, "cuda")["parameters"]
        answers[name] = (analytic_speed(source.config, technique, 64, 2, 1, "H200", CALIBRATION, parameters,
                                        cfg.gradient_checkpointing), parameters)
    full, parameters = answers["bf16-pure"]
    assert full["optimizer_s"] == pytest.approx(1e-11 * parameters["trainable"] / 2)  # bf16: half an fp32 one
    assert full["memory_s"] == 0
    quantized, parameters = answers["qlora-gc"]
    # NF4: half a byte read, two written, per weight, in the forward, its recomputation and the backward
    assert quantized["memory_s"] == pytest.approx(3 * parameters["quantized"] * 2.5 / 1e12)
    assert quantized["step_time_s"] == pytest.approx(quantized["matmul_s"] + quantized["memory_s"]
                                                     + quantized["optimizer_s"])
    assert quantized["optimizer_s"] == pytest.approx(3e-11 * parameters["trainable"])  # fp32 adapters, 8-bit AdamW
    assert "note" not in quantized


def test_the_command_line_gives_speed_and_cost_and_refuses_a_bad_price():
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "harness", "predict", "--model", "tiny-llama", "--experiment", "lora",
               "--seq", "64", "--batch", "2", "--method", "analytic", "--gpu", "RTX 4090", "--tokens", "1e6",
               "--price", "0.5", "--json"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    speed = json.loads(done.stdout)["speed"]
    assert speed["gpu"] == "RTX 4090" and speed["fine_tune"]["tokens"] == 1e6
    assert speed["fine_tune"]["cost_usd"] == pytest.approx(1e6 / speed["tokens_per_s"] / 3600 * 0.5)
    refused = subprocess.run(command[:-2] + ["-1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--price: must be a positive number" in refused.stderr


def test_a_throughput_ratio_calls_a_difference_only_beyond_the_step_times_spread():
    from harness.report.evidence import throughput_ratio
    from harness.report.load import Results

    def run(experiment, tokens_per_s, fastest, slowest):
        return {"status": "ok", "experiment": experiment, "model": "m", "_file": f"gpu/{experiment}.json",
                "config": {"seq_len": 512, "micro_batch": 1}, "memory": {"source": "cuda"},
                "environment": {"device_name": "NVIDIA H200"},
                "throughput": {"tokens_per_step": 512, "tokens_per_s": tokens_per_s,
                               "step_time_s": {"min": 512 / fastest, "max": 512 / slowest}}}

    spec = {"experiment": "lora", "over": "bf16-mixed", "model": "m", "seq_len": 512, "micro_batch": 1}
    close = Results(Path("."), records=[run("lora", 1000, 1100, 900), run("bf16-mixed", 1050, 1150, 950)])
    observation = throughput_ratio(close, spec, "gpu")
    assert observation.value == pytest.approx(1000 / 1050)
    assert observation.extra["spread"] == pytest.approx([900 / 1150, 1100 / 950])
    assert "within that spread, no difference shown" in observation.note
    apart = Results(Path("."), records=[run("lora", 500, 520, 480), run("bf16-mixed", 1050, 1150, 950)])
    assert "a difference beyond that spread" in throughput_ratio(apart, spec, "gpu").note


def test_torchao_s_compiled_step_is_one_kernel_a_parameter():
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit

    import torchao.optim.adam

    from harness.predict.kernels import TORCHAO_STEP

    original = torchao.optim.adam.single_param_adam
    weight = torch.nn.Parameter(torch.randn(1024, 4))  # torchao quantizes states of 4,096 elements or more
    optimizer = AdamW8bit([weight], lr=torch.tensor(1e-3))
    weight.grad = torch.randn_like(weight)
    recorder = KernelRecorder()
    with torch.compiler.set_stance("force_eager"), recorder:  # as the simulation runs compiled code
        optimizer.step()  # creates the states
        recorder.recording = True
        optimizer.step()
    # the step counter's increment (a CPU scalar, torchao's `state["step"] += 1`), then the fused step, not the
    # eager step's dozens of ops
    assert [k.op for k in recorder.kernels] == ["aten::add_.Tensor", f"{TORCHAO_STEP}[OptimState8bit]"]
    kernel = recorder.kernels[-1]
    assert kernel.fp32_elements == 4096
    weight_bytes, codes = 4 * 4096, 2 * 4096  # fp32 weight; both moments' 8-bit codes
    # read: weight, gradient, codes; written: weight and codes (the blocks' scales and the code books are small)
    assert 2 * (weight_bytes + codes) + weight_bytes <= kernel.bytes < 2 * (weight_bytes + codes) + 2 * weight_bytes
    assert torchao.optim.adam.single_param_adam is original  # unwrapped again on leaving


def test_a_4bit_layer_is_traced_as_cuda_runs_it_dequantizing_in_forward_what_cpu_s_fused_op_does_not():
    import bitsandbytes as bnb

    from harness.measure.memory import TensorTracker
    from harness.predict.simulate import _cuda_matmul_4bit

    torch.manual_seed(0)
    weight = (torch.randn(256, 128) * 0.02).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 256, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     module=layer)._quantize("cpu")
    x = torch.randn(8, 128, dtype=torch.bfloat16, requires_grad=True)
    traced = {}
    for device_type in ("cpu", "cuda"):
        tracker, recorder = TensorTracker(), KernelRecorder()
        recorder.recording = True
        with _cuda_matmul_4bit(device_type), tracker, recorder:
            out = layer(x)
            forward_peak = tracker.peak
            out.backward(torch.ones_like(out))
        traced[device_type] = ([k.op for k in recorder.kernels], forward_peak, out.detach(), x.grad)
        x.grad = None
    cpu_ops, cpu_peak, cpu_out, cpu_grad = traced["cpu"]
    cuda_ops, cuda_peak, cuda_out, cuda_grad = traced["cuda"]
    cuda_kernels = recorder.kernels  # the last one traced
    # the same numbers (up to the CPU kernel's own rounding): only the path differs
    torch.testing.assert_close(cuda_out, cpu_out)
    torch.testing.assert_close(cuda_grad, cpu_grad)
    assert cpu_ops[0] == "bitsandbytes::gemm_4bit" and "bitsandbytes::gemm_4bit" not in cuda_ops
    # CUDA's forward: the nested absmax dequantized and its offset added, the weight dequantized, the product
    dequantize = ["bitsandbytes::dequantize_blockwise", "aten::add.Tensor", "bitsandbytes::dequantize_4bit", "aten::mm"]
    assert cuda_ops[:4] == dequantize
    (product,) = [k for k in cuda_kernels[:4] if k.flops]
    assert product.flops == 2 * 8 * 128 * 256
    # and the bf16 weight it dequantizes is held in forward, with the fp32 absmax, where CPU's op holds neither
    assert cuda_peak - cpu_peak >= weight.numel() * 2 + weight.numel() // 64 * 4


def test_bitsandbytes_optimizers_make_the_host_wait_after_each_parameter_on_cuda():
    from harness.config import resolve
    from harness.predict.kernels import HOST_WAIT
    from harness.predict.simulate import simulate_step
    from harness.step.models import resolve_source

    waits = {}
    for name in ("qlora", "lora"):  # paged 8-bit AdamW; torch's AdamW
        config = resolve(EXPERIMENTS / f"{name}.yaml", {"model": "tiny-llama", "seq_len": 32, "micro_batch": 1,
                                                         "device": "cpu"})
        recorder = KernelRecorder()
        simulate_step(resolve_source("tiny-llama", False, "cuda"), config.technique, config.experiment, 32, 1,
                      "cuda", recorder=recorder)
        optimizer = [k.op for k in recorder.kernels if k.phase == "optimizer"]
        updates = sum(op.startswith("bitsandbytes::optimizer_update_") for op in optimizer)  # 8- or 32-bit
        waits[name] = (optimizer.count(HOST_WAIT), updates)
    # Optimizer8bit.step's sync_gpu after each parameter, and a paged optimizer's once more at the end
    assert waits["qlora"][0] == waits["qlora"][1] + 1 > 1
    assert waits["lora"][0] == 0


def test_an_8bit_optimizer_s_per_element_work_does_not_halve_for_a_bf16_parameter():
    from harness.predict.speed import optimizer_seconds

    shares = dict(calibration().optimizer_element_shares)
    # on the H200, torch's fused AdamW moves its bytes at about a copy's rate: its time scales with them
    assert shares["aten::_fused_adamw_"] < 0.1
    # bitsandbytes' blockwise 8-bit kernel takes several times what its bytes take at that rate
    assert shares["bitsandbytes::optimizer_update_8bit_blockwise"] > 0.5
    fp32 = Kernel("op", 0, 0, "fp32", "optimizer", fp32_elements=1000)
    bf16 = Kernel("op", 0, 0, "bf16", "optimizer", fp32_elements=500)  # 1,000 bf16 elements
    assert optimizer_seconds(fp32, 1e-9, 0.8) == pytest.approx(1e-6)  # the benchmark's own case, whatever the share
    assert optimizer_seconds(bf16, 1e-9, 0.0) == pytest.approx(0.5e-6)  # bytes alone: half an fp32 parameter's
    assert optimizer_seconds(bf16, 1e-9, 0.8) == pytest.approx((0.8 * 1000 + 0.2 * 500) * 1e-9)
