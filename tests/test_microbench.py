import pytest

"""The kernel micro-benchmarks run at tiny sizes: every benchmark executes, checks its output, is labelled."""

import json
import math
import subprocess
import sys

from conftest import ROOT

from harness.report.microbench import device_of, format_table, ratios

pytestmark = pytest.mark.slow  # real training steps in subprocesses; `make test-fast` skips them

EXPECTED = {
    "bench_copy", "bench_nf4_quantize", "bench_nf4_dequantize", "bench_int8_quantize", "bench_int8_dequantize",
    *(f"bench_linear_forward[t16-{kind}]" for kind in ("bf16", "nf4", "int8", "fp32")),
    *(f"bench_linear_forward_backward[t16-{kind}]" for kind in ("bf16", "nf4", "int8", "bf16-trainable")),
    *(f"bench_optimizer_step[{name}]" for name in ("torch-adamw", "adamw8bit", "paged-adamw8bit")),
    *(f"bench_lora_forward_backward[t16-{rank}]" for rank in ("bare", "r8", "r64")),
    *(f"bench_host_per_kernel[{form}]" for form in ("bare", "lora", "lora-gc", "qlora")),
}
BASELINES = {
    "quantize": "bench_copy",
    "matmul-forward-t16": "bench_linear_forward[t16-bf16]",
    "matmul-forward-backward-t16": "bench_linear_forward_backward[t16-bf16]",
    "optimizer-step": "bench_optimizer_step[torch-adamw]",
    "lora-forward-backward-t16": "bench_lora_forward_backward[t16-bare]",
    "host-per-kernel": "bench_host_per_kernel[bare]",
}


def test_microbenchmarks_run_at_tiny_sizes_and_give_ratios(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.lab.microbench", "--size", "tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.endswith("-tiny.json")  # never a real measurement's name
    data = json.loads(files[0].read_text())
    assert "machine_info" in data
    benchmarks = {b["name"]: b for b in data["benchmarks"]}
    assert set(benchmarks) == EXPECTED
    device = device_of(data)
    for name, bench in benchmarks.items():
        info = bench["extra_info"]
        assert info["device"] == device and info["size"] == "tiny" and info["shape"], name
        assert info["group"] == bench["group"] and info["baseline"] == (BASELINES[info["group"]] == name)
        assert bench["stats"]["rounds"] >= 1 and bench["stats"]["median"] > 0
    host = {form: benchmarks[f"bench_host_per_kernel[{form}]"]["extra_info"] for form in ("bare", "lora", "lora-gc",
                                                                                          "qlora")}
    for info in host.values():  # each pass counts the kernels the speed model counts for it, by phase
        assert info["kernels"] == info["forward_kernels"] + info["backward_kernels"] > 100
    # checkpointing runs each layer's forward again in backward; an NF4 base dequantizes as CUDA does
    assert host["lora-gc"]["backward_kernels"] > host["lora"]["backward_kernels"] + host["lora"]["forward_kernels"] / 2
    assert host["qlora"]["forward_kernels"] > host["lora"]["forward_kernels"]
    paged = benchmarks["bench_optimizer_step[paged-adamw8bit]"]["extra_info"]
    assert paged["paged"] == (device != "cpu")

    rows = ratios(data)
    assert len(rows) == len(EXPECTED)
    for row in rows:
        assert row["baseline"] == BASELINES[row["group"]]
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        if row["name"] == row["baseline"]:
            assert row["ratio"] == 1.0
    table = format_table(rows, device)
    assert "(baseline)" in table and "optimizer-step:" in table
    assert "optimizer-step:" in done.stdout  # the run prints the same table
